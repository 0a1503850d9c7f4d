"""Which rollout engine a run gets, from its rollout section: build_engine."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

from tao_fast.config import ConfigError, RolloutConfig
from tao_fast.dtypes import sampler_dtype
from tao_fast.rollout.protocol import Engine
from tao_fast.rollout.torch_engine import TorchEngine
from tao_fast.rollout.vllm import compat
from tao_fast.rollout.vllm.engine import VllmEngine


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build_engine(ro: RolloutConfig, model, tokenizer, *, model_dir: str | Path,
                 seed: int) -> Engine:
    """The rollout engine for `model` (the learner's tao_fast Transformer, whole weights).

    vLLM in-process (VllmEngine on model_dir, seeded with `seed`) when rollout.engine=vllm, or
    auto with a supported vLLM installed, but for a LoRA model on the CPU (see
    tao_fast/rollout/vllm/ for its weight-sync and sleep paths); else the torch engine, which
    shares the learner's tensors when rollout.dtype is the model's, or keeps a copy in
    rollout.dtype that each sync casts into in place.
    rollout.engine=vllm without a usable vLLM, or rollout.tensor_parallel > 1 without vLLM,
    is a ConfigError naming the key."""
    why = ""
    if ro.engine == "auto" and model.lora_config is not None and \
            model.embed_tokens.weight.device.type == "cpu":
        # vLLM's CPU LoRA ops (torch_ops.bgmv_*) gather every token's adapter weights before an
        # einsum: with a rank-16 adapter vLLM generated 36.8 tokens/s, 95.9 without it, the
        # torch engine 156.3 with it (the demo's rollout shape, bench/bench_lora.py). The torch
        # engine applies the adapter itself
        _log("[tao-fast] rollout engine: torch (model.lora on the CPU, where vLLM's LoRA "
             "kernels are slow; rollout.engine=vllm forces it)")
    elif ro.engine in ("auto", "vllm"):  # auto: vLLM whenever it is installed and supported
        ok, why = compat.vllm_status()
        if ok:
            try:
                return VllmEngine(model_dir, model, tokenizer, ro, seed=seed)
            except compat.VllmUnavailable as e:
                why = str(e)
        if ro.engine == "vllm":
            raise ConfigError(f"rollout.engine=vllm: {why}")
        if compat.vllm_installed():
            _log(f"[tao-fast] rollout engine: torch (vLLM not used: {why})")
    if ro.tensor_parallel > 1:
        raise ConfigError(f"rollout.tensor_parallel={ro.tensor_parallel} shards vLLM across ranks; "
                          f"the torch engine has no tensor parallelism (rollout.engine="
                          f"{ro.engine}{'' if ro.engine == 'torch' else ': ' + why})")
    return TorchEngine(_sampler(ro, model), tokenizer, max_batch_rows=ro.max_batch_rows)


def _sampler(ro: RolloutConfig, model):
    """The model itself when rollout.dtype is its dtype, else a frozen copy in rollout.dtype."""
    w = model.embed_tokens.weight
    dtype = sampler_dtype(ro.dtype, w.dtype, w.device)
    if dtype == w.dtype:
        return model
    return copy.deepcopy(model).to(dtype).requires_grad_(False)
