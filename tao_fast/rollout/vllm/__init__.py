"""The colocated vLLM rollout engine, one role per module:

  compat.py   which vLLM: the supported range, vllm_status(), import_vllm(), VllmUnavailable
  weights.py  the learner's tensors bound to vLLM's and each sync: alias / cast / reload
  kv.py       the KV cache's sleep and wake: CudaSleep / CpuKvFree / NoSleep, chosen once
  engine.py   VllmEngine: construction, generate, and the Engine protocol over the above

Nothing here imports vLLM until an engine is made (compat.import_vllm).
"""
from tao_fast.rollout.vllm.compat import VllmUnavailable, vllm_installed, vllm_status
from tao_fast.rollout.vllm.engine import VllmEngine

__all__ = ["VllmEngine", "VllmUnavailable", "vllm_installed", "vllm_status"]
