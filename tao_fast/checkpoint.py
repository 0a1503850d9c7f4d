"""Checkpoints: HF-format safetensors + config + tokenizer, written atomically.

A checkpoint directory is built under a temporary name beside its destination and renamed into
place, so a crash leaves either the old checkpoint or the new one, never half of one.
Plain transformers and vLLM load the result directly. A LoRA model's checkpoint is its PEFT
adapter (adapter_config.json + adapter_model.safetensors, what `peft` and `vllm --enable-lora`
load) and the tokenizer; with merge=True also the merged model, an HF checkpoint in merged/.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from tao_fast.fileio import atomic_dir
from tao_fast.models import lora
from tao_fast.models.weights import to_hf


def save_checkpoint(model, tokenizer, out_dir, extra: dict | None = None,
                    dtype: torch.dtype | None = None, base_model: str = "",
                    merge: bool = False) -> Path:
    """Write model (HF names, in `dtype`, default its own), config.json and tokenizer to
    out_dir, atomically (a temp dir, then rename). A LoRA model: its adapter (fp32) for
    `base_model` (the base's directory, adapter_config.json's base_model_name_or_path) and,
    with merge, the merged model in `dtype` under merged/."""
    dtype = dtype or model.embed_tokens.weight.dtype
    with atomic_dir(out_dir) as tmp:
        if lora.is_lora(model):
            lora.save_adapter(model, tmp, base_model)
            tokenizer.save_pretrained(tmp)
            if merge:
                (tmp / "merged").mkdir()
                write_hf(lora.merged_named_parameters(model, dtype), model.args, tokenizer,
                         tmp / "merged", dtype)
        else:
            write_hf(((n, p.detach().to(dtype)) for n, p in model.named_parameters()),
                     model.args, tokenizer, tmp, dtype)
        if extra:
            (tmp / "tao_fast.json").write_text(json.dumps(extra, indent=2))
    return Path(out_dir)


def write_hf(named_tensors, args, tokenizer, out: Path, dtype: torch.dtype) -> None:
    """(name, tensor) pairs of the plain Transformer -> an HF directory `out`: weights under HF
    names, config.json, generation_config.json, the tokenizer."""
    sd = {k: v.contiguous() for k, v in to_hf(named_tensors, args)}
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = args.to_hf()
    cfg["torch_dtype"] = str(dtype).replace("torch.", "")
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    gen = {"bos_token_id": args.bos_token_id, "eos_token_id": args.eos_token_id}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    tokenizer.save_pretrained(out)
