"""Peak memory of a block of work: the process's RSS on the CPU, the device's memory in use on
CUDA, sampled by a thread (what a step's metrics report as peak_memory_mb)."""
from __future__ import annotations

import os
import threading

import torch


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory while a block runs, sampled by a thread every `interval` s: the process's RSS
    on CPU; on CUDA the device's memory in use (total - free, all processes: vLLM's cumem pools
    are not in torch's allocator statistics)."""

    def __init__(self, device: str | torch.device = "cpu", interval: float = 0.01):
        self.cuda = torch.device(device).type == "cuda"
        self.device = torch.device(device)
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def used(self) -> int:
        if self.cuda:
            free, total = torch.cuda.mem_get_info(self.device)
            return total - free
        return _rss_bytes()

    def _run(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.used())

    def __enter__(self):
        self.peak = self.used()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.used())
        return False

    @property
    def peak_mb(self) -> float:
        return self.peak / 2**20
