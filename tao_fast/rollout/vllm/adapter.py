"""The learner's LoRA adapters into vLLM (`enable_lora`), after each update; the base is never
synced again (vLLM's base tensors are the learner's frozen ones, weights.py).

rollout.lora_sync picks the path (the engine's `sync_path` says which ran):
- "lora-memory": the adapter tensors become vLLM's LoRA model in place: built from the tensors
  (no file), the old one removed from the worker's adapter manager and the new one activated
  in the same slot. vLLM 0.32's worker internals (`model_runner.lora_manager`), so it is
  guarded: any failure falls back to disk once, with a warning.
- "lora-disk": the adapter written in PEFT format to a scratch directory and reloaded by
  vLLM's public `add_lora` (load_inplace). Slower (a file round trip), version-proof.
Requests name the adapter by one LoRARequest (id 1); each sync resets the prefix cache (the
engine does), so no cached KV of an older adapter is reused.
"""
from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import torch

from tao_fast.config import ConfigError, LoraConfig
from tao_fast.models import lora

# vLLM 0.32's LoRAConfig.max_lora_rank choices (its MaxLoRARanks)
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
ADAPTER_ID = 1


def max_lora_rank(rank: int) -> int:
    """The smallest of vLLM's max_lora_rank choices that holds an adapter of `rank`."""
    fits = [r for r in VLLM_RANKS if r >= rank]
    if not fits:
        raise ConfigError(f"model.lora.rank={rank}: vLLM serves adapters up to rank "
                          f"{VLLM_RANKS[-1]}; use rollout.engine=torch or a smaller rank")
    return fits[0]


def vllm_lora_kwargs(cfg: LoraConfig) -> dict:
    """vllm.LLM's LoRA arguments for an adapter of cfg.rank: one adapter, the smallest
    max_lora_rank that holds it."""
    return dict(enable_lora=True, max_lora_rank=max_lora_rank(cfg.rank), max_loras=1,
                max_cpu_loras=1)


class AdapterSync:
    """Bound once per engine: `load(named_adapters)` puts the learner's adapter into vLLM;
    `request` is the LoRARequest every generate call passes."""

    def __init__(self, llm, runner, cfg: LoraConfig, base_model: str, mode: str):
        from vllm.lora.request import LoRARequest

        self.llm, self.runner, self.cfg, self.base_model = llm, runner, cfg, base_model
        self.scratch = Path(tempfile.mkdtemp(prefix="tao-fast-adapter-"))
        self.request = LoRARequest("tao-fast", ADAPTER_ID, lora_path=str(self.scratch))
        self.path = "lora-disk" if mode == "disk" else "lora-memory"
        self.dtype = runner.lora_config.lora_dtype  # vLLM's resolved LoRA dtype

    def load(self, named_adapters) -> None:
        tensors = lora.peft_tensors(named_adapters, self.dtype)
        if self.path == "lora-memory":
            try:
                return self._in_memory(tensors)
            except (AttributeError, TypeError, KeyError, ImportError) as e:
                why = f"{type(e).__name__}: {e}"
                print(f"[tao-fast] warning: vLLM's in-memory adapter load failed ({why}); "
                      f"syncing the adapter through a PEFT directory instead",
                      file=sys.stderr, flush=True)
                self.path = "lora-disk"
        self._via_disk(tensors)

    def _config(self, tensors: dict) -> dict:
        return lora.peft_config(self.cfg, self.base_model, tensors)

    def _in_memory(self, tensors: dict[str, torch.Tensor]) -> None:
        """vLLM 0.32: LoRAModel.from_lora_tensors, then the worker's adapter manager swaps it
        in (what its own add_adapter does after reading a directory)."""
        from vllm.lora.lora_model import LoRAModel
        from vllm.lora.peft_helper import PEFTHelper

        wm = self.runner.lora_manager  # the worker's LoRA manager
        model = LoRAModel.from_lora_tensors(
            ADAPTER_ID, tensors, PEFTHelper.from_dict(self._config(tensors)), device="cpu",
            dtype=self.dtype, model_vocab_size=wm.vocab_size)
        am = wm._adapter_manager
        am.remove_adapter(ADAPTER_ID)
        am.add_adapter(model)
        am.activate_adapter(ADAPTER_ID)

    def _via_disk(self, tensors: dict[str, torch.Tensor]) -> None:
        import json

        from safetensors.torch import save_file
        from vllm.lora.request import LoRARequest

        save_file(tensors, str(self.scratch / lora.ADAPTER_WEIGHTS))
        (self.scratch / lora.ADAPTER_CONFIG).write_text(json.dumps(self._config(tensors)))
        self.llm.llm_engine.add_lora(LoRARequest("tao-fast", ADAPTER_ID,
                                                 lora_path=str(self.scratch), load_inplace=True))

    def close(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)
