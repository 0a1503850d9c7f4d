"""Data-parallel runs under torchrun: the process group, rank helpers, the collectives, and
failing fast.

    torchrun --nproc-per-node 2 -m tao_fast.cli tune --config tune.yaml

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; `init()` sees them
and joins the group (gloo for CPU tensors, nccl for CUDA ones, one GPU per local rank).
Without them everything here is a no-op for one process: the single-process path is unchanged.

What a step does across ranks (see tuning.py and trainer.py):
  - rollouts: rank r generates and scores a contiguous slice of the step's prompts, gathered
    before the advantages, so every group is whole however the prompts were split and every
    rank sees the same batch (tao_fast/rl/rollout_shards.py);
  - training: every rank packs the same global batch the same way, takes its share of the
    sequences (balanced by tokens, packing.balance_tokens) and the gradients are summed
    (`all_reduce_grads`, DDP) or reduce-scattered (FSDP2, tao_fast/rl/fsdp.py) so the update
    equals the 1-rank one;
  - metrics: reduced over ranks; rank 0 alone writes metrics, states and checkpoints.

A peer that dies makes the next collective fail (gloo: the connection closes; the group's
timeout, run.dist_timeout_s, bounds every other case) and torchrun stops the other workers:
either way the surviving ranks print one clear line naming the run directory to resume.
"""
from __future__ import annotations

import datetime
import os
import signal
import sys
from typing import Any, Sequence

import torch
import torch.distributed as dist

_RESUME_HINT = {"run_dir": None}


class DistributedError(RuntimeError):
    """A collective failed: a peer died, hung past the timeout, or the group is gone."""


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched() -> bool:
    """True under torchrun (or any launcher that sets RANK and WORLD_SIZE) with > 1 process."""
    return "RANK" in os.environ and env_world_size() > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def device() -> torch.device:
    """This rank's device: cuda:LOCAL_RANK when CUDA is there, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _on_sigterm(signum, frame):  # torchrun stops the survivors with SIGTERM when one dies
    print(f"[tao-fast] rank {os.environ.get('RANK', '?')}: stopped by the launcher "
          f"(signal {signum}): another rank failed or the job was cancelled; "
          f"{_resume_text()}", file=sys.stderr, flush=True)
    os._exit(143)


def _resume_text() -> str:
    d = _RESUME_HINT["run_dir"]
    return (f"resume with `tao-fast tune --resume {d}`" if d
            else "resume with `tao-fast tune --resume RUN_DIR`")


def init(timeout_s: float = 300.0, run_dir=None) -> bool:
    """Join the process group when launched by torchrun; returns True when distributed.
    Idempotent (a second call, e.g. a resumed tune in the same process, keeps the group)."""
    if run_dir is not None:
        _RESUME_HINT["run_dir"] = str(run_dir)
    if not launched():
        return False
    if not dist.is_initialized():
        # CUDA tensors over NCCL; CPU tensors (a learner on the CPU, host-side statistics)
        # over gloo in the same group
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(device())
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        signal.signal(signal.SIGTERM, _on_sigterm)
    return True


def shutdown() -> None:
    """All ranks meet, then the group goes. A rank tearing its gloo group down while a peer was
    still at work (rank 0 writing its state or report) made a process abort() now and then
    (1 in 9 runs of the 2-rank learner test before the barrier)."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        except (RuntimeError, dist.DistBackendError, ConnectionError):
            pass  # a peer is gone already: nothing to wait for
        dist.destroy_process_group()


def collective(what: str, fn, *args, **kwargs):
    """fn(*args, **kwargs), a collective: a lost peer or a timeout becomes one DistributedError
    naming `what` and how to resume."""
    try:
        return fn(*args, **kwargs)
    except (RuntimeError, dist.DistBackendError, ConnectionError) as e:
        raise DistributedError(
            f"rank {rank()}: lost contact with the other ranks during {what} ({e}); the run "
            f"stops; the last saved state is intact: {_resume_text()}") from None


def barrier(what: str = "barrier") -> None:
    if active():
        collective(what, dist.barrier)


def all_gather_object(obj: Any, what: str = "all_gather") -> list:
    """[obj of rank 0, obj of rank 1, ...]; [obj] in one process."""
    if not active():
        return [obj]
    out: list = [None] * world_size()
    collective(what, dist.all_gather_object, out, obj)
    return out


def all_reduce_(t: torch.Tensor, op: str = "sum", what: str = "all_reduce") -> torch.Tensor:
    """In place; op: sum | max | min."""
    if active():
        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        collective(what, dist.all_reduce, t, ops[op])
    return t


def all_reduce_grads(params: Sequence[torch.nn.Parameter], what: str = "gradient all-reduce"):
    """Sum every parameter's gradient over ranks, in one flat bucket (one collective).
    A parameter without a gradient on this rank contributes zeros."""
    if not active():
        return
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    dtype = params[0].dtype
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                      .to(dtype) for p in params])
    all_reduce_(flat, "sum", what)
    off = 0
    for p in params:
        n = p.numel()
        g = flat[off:off + n].view_as(p).to(p.dtype)
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.copy_(g)
        off += n
