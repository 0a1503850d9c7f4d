"""Checks on a run directory before work is spent on it, and the crash tests' fault injection."""
from __future__ import annotations

import errno
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch

from tao_fast.config import ConfigError
from tao_fast.rl.state import estimate_bytes, trainable


def check_writable(run_dir: Path) -> None:
    """run_dir exists (made if need be) and takes a file, or a ConfigError naming it."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"  # ranks probe side by side
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"run.output_dir: cannot write to {run_dir}: {e.strerror}") from None


def check_space(run_dir: Path, model, keep_states: int,
                ckpt_dtype: torch.dtype | None = None, merged: bool = False) -> None:
    """Before a round's work: room for what the round writes, or a clear error now rather than
    a failed save after the round's compute is spent. That is its checkpoint and, with
    run.keep_states = k > 0, training states: a new one is written beside the k kept ones and
    the oldest goes once it is complete, so the disk holds up to k + 1; those already there
    take space already."""
    whole = sum(p.numel() * (ckpt_dtype.itemsize if ckpt_dtype else p.element_size())
                for p in model.parameters() if not p.requires_grad or model.lora_config is None)
    # a LoRA checkpoint: the fp32 adapters (+ the merged model with run.merge_lora)
    ckpt = whole if model.lora_config is None else (
        sum(p.numel() * 4 for p in trainable(model).values()) + (whole if merged else 0))
    have = len(list((run_dir / "state").glob("step-" + "[0-9]" * 6)))
    n_states = max(keep_states + 1 - have, 1) if keep_states else 0
    need = ckpt + n_states * estimate_bytes(model)
    free = shutil.disk_usage(run_dir).free
    if free < need:
        what = (f"{n_states} training state(s) and a checkpoint" if n_states
                else "a checkpoint")
        hint = (" (or set run.keep_states=0: no training states, so no resume)" if n_states
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


@contextmanager
def writing(what: str, run_dir: Path):
    """A failed write of `what` (a disk full, a lost mount; safetensors reports those as
    SafetensorError) as one OSError naming it and the newest complete training state, which
    the atomic writers leave intact."""
    from safetensors import SafetensorError

    from tao_fast.rl.state import latest_state

    try:
        yield
    except (OSError, SafetensorError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
        code = e.errno if isinstance(e, OSError) and e.errno else (
            errno.ENOSPC if "StorageFull" in str(e) or "No space" in str(e) else errno.EIO)
        last = latest_state(run_dir)
        raise OSError(code, f"cannot write {what}: {reason}; the last complete training state "
                      f"is {last or 'none'} (resume with `tao-fast tune --resume {run_dir}` "
                      f"once there is room)") from None
