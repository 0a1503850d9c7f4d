"""Checks on a run directory before work is spent on it, and the crash tests' fault injection."""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import torch

from tao_fast.config import ConfigError
from tao_fast.rl.state import estimate_bytes


def check_writable(run_dir: Path) -> None:
    """run_dir exists (made if need be) and takes a file, or a ConfigError naming it."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"  # ranks probe side by side
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"run.output_dir: cannot write to {run_dir}: {e.strerror}") from None


def check_space(run_dir: Path, model, states: bool,
                ckpt_dtype: torch.dtype | None = None) -> None:
    """Before a round's work: room for a new training state (written beside the old one, which
    goes once the new one is complete) and the round's checkpoint, or a clear error now rather
    than a failed save after the round's compute is spent."""
    ckpt = sum(p.numel() * (ckpt_dtype.itemsize if ckpt_dtype else p.element_size())
               for p in model.parameters())
    need = ckpt + (estimate_bytes(model) if states else 0)
    free = shutil.disk_usage(run_dir).free
    if free < need:
        what = "a training state and a checkpoint" if states else "a checkpoint"
        hint = (" (or set run.keep_states=0: no training states, so no resume)" if states
                else "")
        raise OSError(errno.ENOSPC, f"{run_dir} has {free >> 20} MiB free; {what} need about "
                      f"{need >> 20} MiB: free some space{hint}, or resume later with "
                      f"`tao-fast tune --resume {run_dir}`")


def kill_at(rank: int) -> int | None:
    """Fault injection for the crash tests: TAO_FAST_KILL_AT=STEP[@RANK] makes this process
    (only rank RANK, when given) SIGKILL itself in the middle of global step STEP, after its
    rollouts and before its update: a fixed place to die, however fast the steps run."""
    spec = os.environ.get("TAO_FAST_KILL_AT", "")
    if not spec:
        return None
    step, _, r = spec.partition("@")
    if r and int(r) != rank:
        return None
    return int(step)
