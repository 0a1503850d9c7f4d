"""The one map between this model's parameter names and Hugging Face checkpoint names.

The in-house decoder keeps attention's q/k/v and the MLP's gate/up projections fused, as vLLM
lays them out (`qkv_proj`, `gate_up_proj`); HF checkpoints keep them apart. `FUSED` below says,
as data, which HF tensors each fused tensor stacks (along dim 0, in this order) and how many
rows each takes. Every other tensor has the same name under HF's `model.` prefix (the LM head
at the top level); vLLM's Llama/Qwen2 parameters use that prefix too, fused or not.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator

import torch

from tao_fast.models.config import ModelArgs

# fused module (inside a decoder layer) -> (HF modules it stacks, rows of each given the args)
FUSED: dict[str, tuple[tuple[str, ...], Callable[[ModelArgs], tuple[int, ...]]]] = {
    "self_attn.qkv_proj": (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                           lambda a: (a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim,
                                      a.num_kv_heads * a.head_dim)),
    "mlp.gate_up_proj": (("mlp.gate_proj", "mlp.up_proj"),
                         lambda a: (a.intermediate_size, a.intermediate_size)),
}
# HF tensors that carry nothing to load: rotary frequencies (recomputed), a tied LM head
_DERIVED = ("rotary_emb.inv_freq",)


def hf_name(name: str) -> str:
    """An unfused parameter's HF (and vLLM) name: `model.` + name, the LM head as it is."""
    return name if name.startswith("lm_head.") else "model." + name


def _fused_part(name: str):
    """(prefix, fused module, leaf) for a fused parameter name, else None."""
    prefix, _, leaf = name.rpartition(".")
    for fused in FUSED:
        if prefix.endswith("." + fused):
            return prefix[: -len(fused)], fused, leaf
    return None


def hf_names(name: str) -> list[str]:
    """The HF names a parameter of this model is made of, in stacking order."""
    part = _fused_part(name)
    if part is None:
        return [hf_name(name)]
    prefix, fused, leaf = part
    return [hf_name(f"{prefix}{p}.{leaf}") for p in FUSED[fused][0]]


def to_hf(named_tensors: Iterable[tuple[str, torch.Tensor]],
          args: ModelArgs) -> Iterator[tuple[str, torch.Tensor]]:
    """This model's (name, tensor) pairs -> HF (name, tensor) pairs; fused tensors are split
    into views (no copy)."""
    for name, t in named_tensors:
        part = _fused_part(name)
        if part is None:
            yield hf_name(name), t
            continue
        _, fused, _ = part
        yield from zip(hf_names(name), t.split(list(FUSED[fused][1](args))))


def from_hf(state_dict: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """An HF state dict -> this model's parameters (fused tensors concatenated). A tensor the
    model has no place for is an error naming it."""
    from tao_fast.models.llama import Transformer

    sd = dict(state_dict)
    with torch.device("meta"):
        names = [n for n, _ in Transformer(args).named_parameters()]
    out = {}
    for name in names:
        parts = hf_names(name)
        missing = [p for p in parts if p not in sd]
        if missing:
            raise ValueError(f"checkpoint has no tensor {missing[0]!r}")
        out[name] = torch.cat([sd.pop(p) for p in parts]) if len(parts) > 1 else sd.pop(parts[0])
    if args.tie_word_embeddings:
        sd.pop("lm_head.weight", None)  # tied copies some exporters write
    left = sorted(k for k in sd if not k.endswith(_DERIVED))
    if left:
        raise ValueError(f"unexpected tensors in checkpoint: {left[:8]}")
    return out
