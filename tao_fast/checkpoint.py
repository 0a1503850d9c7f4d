"""Checkpoints: HF-format safetensors + config + tokenizer, written atomically.

A checkpoint directory is built under a temporary name beside its destination and renamed into
place, so a crash leaves either the old checkpoint or the new one, never half of one.
Plain transformers and vLLM load the result directly.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from tao_fast.models.loader import hf_state_dict


def save_checkpoint(model, tokenizer, out_dir, extra: dict | None = None,
                    dtype: torch.dtype | None = None) -> Path:
    """Write model (HF names, in `dtype`, default its own), config.json and tokenizer to
    out_dir, atomically (a temp dir, then rename)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
    try:
        dtype = dtype or model.embed_tokens.weight.dtype
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
        old = None
        if out_dir.exists():  # keep the old one until the new one is in place
            old = out_dir.with_name(out_dir.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
