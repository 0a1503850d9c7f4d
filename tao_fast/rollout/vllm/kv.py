"""vLLM's KV cache between rollouts: freed while the learner steps, back for the next generate.
One small object per path, chosen once (choose()) before vLLM starts, since CUDA sleep mode
is a construction argument (`sleep_mode`):

- CudaSleep "cuda-kv-cache": vLLM's sleep mode: pause, release the KV cache's memory, wake
  with tags kv_cache + scheduling; weights never sleep (they are shared with the learner).
- CpuKvFree "cpu-kv-free": the CPU backend has no sleep mode: the KV cache's storages are
  resized to 0 bytes and back.
- NoSleep "none": a GPU platform without sleep mode keeps its cache.

Either freeing path zeroes the KV cache on wake (the engine then resets the prefix cache): the
CPU attention reads whole blocks, and NaN left in reused memory by the learner turned whole
rows to NaN.
"""
from __future__ import annotations

from typing import Iterator

import torch


class KvSleep:
    """What the paths share: vLLM's LLM, its model runner (whose `kv_caches` vLLM 0.32 lists
    per layer: a tensor, or a tuple of K and V tensors) and the device."""

    path = "none"
    sleep_mode = False  # vLLM's enable_sleep_mode

    def __init__(self, llm, runner, device: torch.device):
        self.llm, self.runner, self.device = llm, runner, device

    def tensors(self) -> Iterator[torch.Tensor]:
        """Every KV-cache tensor vLLM allocated."""
        for kv in self.runner.kv_caches:
            if isinstance(kv, torch.Tensor):
                yield kv
            else:
                yield from kv

    def sleep(self) -> int:
        """Free the KV cache; returns the bytes freed."""
        return 0

    def wake(self) -> None:
        """Take the KV cache back, zeroed."""


class NoSleep(KvSleep):
    """A GPU platform without vLLM sleep mode: the cache stays."""


class CudaSleep(KvSleep):
    """vLLM's sleep mode, level 0 (the weights stay), and its KV-cache release."""

    path = "cuda-kv-cache"
    sleep_mode = True

    def sleep(self) -> int:
        before = torch.cuda.mem_get_info(self.device)[0]
        self.llm.sleep(level=0)
        self.llm.release_kv_cache_memory()
        return torch.cuda.mem_get_info(self.device)[0] - before

    def wake(self) -> None:
        self.llm.wake_up(tags=["kv_cache", "scheduling"])
        for t in self.tensors():  # remapped memory holds anything: zero it (~ms)
            t.zero_()


class CpuKvFree(KvSleep):
    """The CPU backend: each KV storage resized to 0 bytes, and back to its size on wake."""

    path = "cpu-kv-free"

    def __init__(self, llm, runner, device: torch.device):
        super().__init__(llm, runner, device)
        self.storages: list[torch.UntypedStorage] = []  # freed while asleep
        self.nbytes: list[int] = []  # their sizes, to take back

    def sleep(self) -> int:
        by_ptr = {}
        for t in self.tensors():  # K and V may share one storage: each storage once
            s = t.untyped_storage()
            by_ptr[s.data_ptr()] = s
        self.storages = list(by_ptr.values())
        self.nbytes = [s.nbytes() for s in self.storages]
        for s in self.storages:
            s.resize_(0)
        return sum(self.nbytes)

    def wake(self) -> None:
        for s, n in zip(self.storages, self.nbytes):
            s.resize_(n)
            # zeroed: the CPU attention reads whole blocks, and 0 * NaN from whatever the
            # allocator hands back (the learner's freed buffers) would poison real rows
            torch.empty(0, dtype=torch.uint8).set_(s).zero_()
        self.storages, self.nbytes = [], []


def choose(on_cpu: bool, sleep_mode_available: bool) -> type[KvSleep]:
    """The path for this platform (vLLM's current_platform: is_cpu, is_sleep_mode_available)."""
    if on_cpu:
        return CpuKvFree
    return CudaSleep if sleep_mode_available else NoSleep
