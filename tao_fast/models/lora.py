"""LoRA on the in-house decoder: frozen base, trainable low-rank adapters, PEFT's format.

    y = x W^T + b + (alpha / r) * dropout(x) A^T B^T        A [r, in], B [out, r], B = 0 at start

The decoder's fused linears (qkv_proj = [q; k; v], gate_up_proj = [gate; up]) get one A/B pair
per part, the layout vLLM's packed LoRA layers expect and the one PEFT saves for the HF model's
separate q_proj / k_proj / ... (`FUSED` in tao_fast/models/weights.py says which rows are
whose). A part not in model.lora.target_modules gets none. The base (every tensor of the model
but the adapters) is frozen in model.lora.base_dtype; the adapters, their gradients and AdamW
moments are fp32. Adapter parameter names: `<linear>.lora_A.<part>` / `<linear>.lora_B.<part>`,
e.g. `layers.3.self_attn.qkv_proj.lora_A.q_proj` [r, H]; `peft_name` maps them to PEFT's
`base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`.
"""
from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from tao_fast.config import LoraConfig
from tao_fast.models.config import ModelArgs
from tao_fast.models.weights import FUSED, hf_name

# the decoder's linears (inside a layer) -> the PEFT module names of their parts, in row order
LINEARS: dict[str, tuple[str, ...]] = {
    **{fused: tuple(p.rpartition(".")[2] for p in parts) for fused, (parts, _) in FUSED.items()},
    "self_attn.o_proj": ("o_proj",),
    "mlp.down_proj": ("down_proj",),
}
PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def part_rows(linear: str, args: ModelArgs, out_features: int) -> tuple[int, ...]:
    """Output rows of each part of a decoder linear (one part: all of them)."""
    return tuple(FUSED[linear][1](args)) if linear in FUSED else (out_features,)


class LoraLinear(nn.Linear):
    """An nn.Linear (the frozen base: `weight`, `bias`, the same Parameters as before) with an
    A/B adapter on each targeted part of its output rows."""

    def __init__(self, base: nn.Linear, parts: tuple[str, ...], rows: tuple[int, ...],
                 targets: tuple[str, ...], cfg: LoraConfig):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.parts, self.rows = parts, rows
        self.targeted = tuple(p in targets for p in parts)
        self.rank, self.scale = cfg.rank, cfg.alpha / cfg.rank
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()
        self.enabled = True  # adapters_off() clears it: the base alone (the KL reference)
        dev = base.weight.device
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for p, n, on in zip(parts, rows, self.targeted):
            if on:
                a = torch.empty(cfg.rank, self.in_features, device=dev)
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # PEFT's init; B = 0: the base's y
                self.lora_A[p] = nn.Parameter(a)
                self.lora_B[p] = nn.Parameter(torch.zeros(n, cfg.rank, device=dev))

    def forward(self, x):  # x [..., in] -> [..., out]
        out = F.linear(x, self.weight, self.bias)  # [..., out], the base's dtype
        if not self.enabled:
            return out
        # [..., in]: the adapters run in their own dtype (fp32), the sum in the base's
        h = self.dropout(x).to(self.adapter_dtype)
        pieces = out.split(self.rows, -1) if len(self.rows) > 1 else (out,)
        new = []
        for piece, p, on in zip(pieces, self.parts, self.targeted):
            if on:
                d = (h @ self.lora_A[p].t()) @ self.lora_B[p].t()  # [..., r] -> [..., rows]
                piece = piece + (d * self.scale).to(piece.dtype)
            new.append(piece)
        return torch.cat(new, -1) if len(new) > 1 else new[0]

    @property
    def adapter_dtype(self) -> torch.dtype:
        return next(iter(self.lora_A.values())).dtype

    def delta(self) -> torch.Tensor:
        """scale * B @ A per part, stacked [out, in] in the adapters' dtype (fp32; zeros for an
        untargeted part)."""
        rows = []
        for p, n, on in zip(self.parts, self.rows, self.targeted):
            rows.append(self.scale * (self.lora_B[p] @ self.lora_A[p]) if on else torch.zeros(
                n, self.in_features, dtype=self.adapter_dtype, device=self.weight.device))
        return torch.cat(rows)

    def merged_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W + scale * B @ A [out, in], summed in the adapters' dtype, in `dtype` (default the
        base's)."""
        return (self.weight.to(self.adapter_dtype) + self.delta()).to(dtype or self.weight.dtype)


def base_dtype(cfg: LoraConfig, model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """model.lora.base_dtype -> the frozen base's dtype (auto: as rollout.dtype's auto rule,
    bfloat16 on a GPU or a bf16-capable CPU, else model.dtype)."""
    from tao_fast.dtypes import sampler_dtype, torch_dtype

    if cfg.base_dtype != "auto":
        return torch_dtype(cfg.base_dtype)
    if device.type == "cuda":
        return torch.bfloat16
    return sampler_dtype("auto", model_dtype, device)


def apply_lora(model: nn.Module, cfg: LoraConfig, dtype: torch.dtype) -> nn.Module:
    """In place: the base frozen and cast to `dtype`, a LoraLinear (fp32 adapters) on every
    targeted linear of every layer. model.lora_config records cfg (the adapter's config)."""
    model.requires_grad_(False)
    model.to(dtype)  # Transformer._apply keeps the rotary frequencies fp32
    targets = cfg.targets
    for blk in model.layers:
        for linear, parts in LINEARS.items():
            if not any(p in targets for p in parts):
                continue
            owner_name, _, leaf = linear.rpartition(".")
            owner = blk.get_submodule(owner_name)
            base = getattr(owner, leaf)
            rows = part_rows(linear, model.args, base.out_features)
            setattr(owner, leaf, LoraLinear(base, parts, rows, targets, cfg))
    model.lora_config = cfg
    return model


def is_lora(model: nn.Module) -> bool:
    """Whether apply_lora put adapters on this Transformer."""
    return model.lora_config is not None


def lora_layers(model: nn.Module) -> Iterator[LoraLinear]:
    return (m for m in model.modules() if isinstance(m, LoraLinear))


@contextlib.contextmanager
def adapters_off(model: nn.Module):
    """The base model alone inside the block (the KL reference of a LoRA run)."""
    layers = list(lora_layers(model))
    for m in layers:
        m.enabled = False
    try:
        yield model
    finally:
        for m in layers:
            m.enabled = True


def is_adapter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def adapter_parameters(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every adapter parameter, in the model's order."""
    return ((n, p) for n, p in model.named_parameters() if is_adapter(n))


def peft_name(name: str) -> str:
    """`layers.3.self_attn.qkv_proj.lora_A.q_proj` -> PEFT's
    `base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`."""
    linear, which, part = name.rsplit(".", 2)
    owner = linear.rpartition(".")[0]
    return PEFT_PREFIX + hf_name(f"{owner}.{part}.{which}.weight")


def peft_tensors(named_adapters, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """(this model's adapter name, tensor) pairs -> {PEFT name: a copy, contiguous, in `dtype`
    (default its own)}. Copies: vLLM scales a loaded B by alpha / r in place."""
    return {peft_name(n): t.detach().to(dtype or t.dtype, copy=True).contiguous()
            for n, t in named_adapters}


def peft_config(cfg: LoraConfig, base_model: str, tensors: dict[str, torch.Tensor]) -> dict:
    """adapter_config.json: what peft (PeftModel.from_pretrained) and vLLM's --enable-lora read,
    for the PEFT-named adapter `tensors` (peft_tensors): their modules are its target_modules."""
    modules = {n.rsplit(".", 3)[1] for n in tensors}  # ...<module>.lora_A.weight
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.rank,
            "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "bias": "none",
            "target_modules": sorted(modules), "fan_in_fan_out": False,
            "init_lora_weights": True, "use_rslora": False, "use_dora": False,
            "base_model_name_or_path": base_model, "inference_mode": True}


def save_adapter(model: nn.Module, out: Path, base_model: str) -> None:
    """adapter_config.json + adapter_model.safetensors (fp32) into the directory `out`."""
    from safetensors.torch import save_file

    tensors = peft_tensors(adapter_parameters(model))
    (out / ADAPTER_CONFIG).write_text(json.dumps(
        peft_config(model.lora_config, base_model, tensors), indent=2))
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})


def merged_named_parameters(model: nn.Module, dtype: torch.dtype
                            ) -> Iterator[tuple[str, torch.Tensor]]:
    """The base's (name, tensor) pairs with each adapter merged in (W + scale * B @ A, summed
    in fp32, then `dtype`), under the plain Transformer's names: what a merged checkpoint
    holds."""
    merged = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, LoraLinear)}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_adapter(name):
                continue
            m = merged.get(name)
            yield name, m.merged_weight(dtype) if m is not None else p.to(dtype)


def merge_adapters(model: nn.Module) -> nn.Module:
    """In place: every adapter merged into its base weight and each LoraLinear replaced by a
    plain nn.Linear on that weight: the plain Transformer (for evaluation and serving)."""
    with torch.no_grad():
        for name, m in list(model.named_modules()):
            if isinstance(m, LoraLinear):
                m.weight.copy_(m.merged_weight())
                plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None,
                                  device="meta")
                plain.weight, plain.bias = m.weight, m.bias
                owner, _, leaf = name.rpartition(".")
                setattr(model.get_submodule(owner), leaf, plain)
    model.lora_config = None
    return model


def is_adapter_dir(d: Path) -> bool:
    """A PEFT LoRA directory (what a model.lora run's rounds write): adapter_config.json and no
    config.json; load_model and the vLLM server take it with its base."""
    return (d / ADAPTER_CONFIG).is_file() and not (d / "config.json").exists()


def read_adapter(path: Path) -> tuple[LoraConfig, dict[str, torch.Tensor], str]:
    """A PEFT LoRA directory -> (its LoraConfig, {PEFT name: tensor}, base_model_name_or_path).
    What this model cannot apply (another PEFT type, DoRA, bias, per-module ranks) is a
    ValueError naming the file."""
    from safetensors.torch import load_file

    f = path / ADAPTER_CONFIG
    c = json.loads(f.read_text())
    unsupported = [k for k, bad in (("peft_type", c.get("peft_type") != "LORA"),
                                    ("use_dora", c.get("use_dora")),
                                    ("bias", c.get("bias", "none") != "none"),
                                    ("rank_pattern", c.get("rank_pattern")),
                                    ("alpha_pattern", c.get("alpha_pattern")),
                                    ("use_rslora", c.get("use_rslora"))) if bad]
    if unsupported:
        raise ValueError(f"{f}: {unsupported[0]}={c.get(unsupported[0])!r} is not supported "
                         f"(plain LoRA only)")
    targets = c["target_modules"]
    cfg = LoraConfig(rank=int(c["r"]), alpha=float(c["lora_alpha"]),
                     dropout=float(c.get("lora_dropout", 0.0)),
                     target_modules=targets if isinstance(targets, list) else [targets])
    return cfg, load_file(str(path / ADAPTER_WEIGHTS)), c.get("base_model_name_or_path") or ""


def load_adapter_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Copy PEFT-named adapter tensors into a LoRA model's adapters; every adapter must get one
    and every tensor must have a place (a ValueError naming `where` otherwise)."""
    params = dict(adapter_parameters(model))
    by_peft = {peft_name(n): n for n in params}
    extra = sorted(set(tensors) - set(by_peft))
    missing = sorted(set(by_peft) - set(tensors))
    if extra or missing:
        raise ValueError(f"{where}: adapter tensors do not fit the model: unexpected "
                         f"{extra[:4]}, missing {missing[:4]}")
    with torch.no_grad():
        for k, t in tensors.items():
            p = params[by_peft[k]]
            if t.shape != p.shape:
                raise ValueError(f"{where}: {k} is {tuple(t.shape)}, the model's "
                                 f"{tuple(p.shape)}")
            p.copy_(t)
