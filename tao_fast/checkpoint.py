"""Checkpoints: HF-format safetensors + config + tokenizer, written atomically.

A checkpoint directory is built under a temporary name beside its destination and renamed into
place, so a crash leaves either the old checkpoint or the new one, never half of one.
Plain transformers and vLLM load the result directly.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from tao_fast.fileio import atomic_dir
from tao_fast.models.loader import hf_state_dict


def save_checkpoint(model, tokenizer, out_dir, extra: dict | None = None,
                    dtype: torch.dtype | None = None) -> Path:
    """Write model (HF names, in `dtype`, default its own), config.json and tokenizer to
    out_dir, atomically (a temp dir, then rename)."""
    dtype = dtype or model.embed_tokens.weight.dtype
    with atomic_dir(out_dir) as tmp:
        sd = {k: v.to(dtype) for k, v in hf_state_dict(model).items()}
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        cfg = model.args.to_hf()
        cfg["torch_dtype"] = str(dtype).replace("torch.", "")
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        gen = {"bos_token_id": model.args.bos_token_id, "eos_token_id": model.args.eos_token_id}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        tokenizer.save_pretrained(tmp)
        if extra:
            (tmp / "tao_fast.json").write_text(json.dumps(extra, indent=2))
    return Path(out_dir)
