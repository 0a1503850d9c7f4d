"""The one table from a dtype's name in a config (model.dtype, rollout.dtype,
run.checkpoint_dtype, ...) to torch's dtype."""
from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    """'bfloat16' -> torch.bfloat16; an unknown name is a ValueError naming the known ones."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r} (known: {sorted(DTYPES)})") from None


# CPU features that make bf16 matmuls faster than fp32 (oneDNN uses them); without them a bf16
# GEMM is slower: on an Intel Xeon with AVX-512 but no AVX512-BF16, a demo learner step took
# 2.1x longer under bf16 autocast than in fp32 (bench/RESULTS.md, bench/bench_cpu_learner.py)
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo, or the text given); empty elsewhere."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as f:
                cpuinfo = f.read()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def learner_autocast(setting: str, device: torch.device, flags: set[str] | None = None):
    """model.autocast -> the dtype the learner's forward autocasts to, or None.
    auto: bfloat16 on a CPU with native bf16 matmuls (BF16_CPU_FLAGS), else none (on a GPU
    the learner's dtype is model.dtype's); bfloat16: always; none: never."""
    if setting == "none":
        return None
    if device.type != "cpu":
        if setting == "bfloat16":
            raise ValueError("model.autocast=bfloat16 applies to a CPU learner; on a GPU set "
                             "model.dtype (the Triton kernels take bf16 weights)")
        return None
    if setting == "bfloat16":
        return torch.bfloat16
    flags = cpu_flags() if flags is None else flags
    return torch.bfloat16 if flags & set(BF16_CPU_FLAGS) else None


def sampler_dtype(setting: str, model_dtype: torch.dtype, device: torch.device,
                  flags: set[str] | None = None) -> torch.dtype:
    """rollout.dtype -> the sampler's weight dtype. auto: bfloat16 on a CPU with native bf16
    matmuls (BF16_CPU_FLAGS), else the learner's own dtype (model.dtype; on the CPU without
    them a bf16 matmul ran 4-5x slower than fp32, bench/RESULTS.md); a name: that dtype."""
    if setting != "auto":
        return torch_dtype(setting)
    if device.type == "cpu" and (cpu_flags() if flags is None else flags) & set(BF16_CPU_FLAGS):
        return torch.bfloat16
    return model_dtype


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'bfloat16' (the names of DTYPES)."""
    return next(k for k, v in DTYPES.items() if v == dtype)
