"""Data-parallel runs under torchrun: process group, rank helpers, and failing fast.

    torchrun --nproc-per-node 2 -m tao_fast.cli tune --config tune.yaml

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; `init()` sees them
and joins the group (gloo for CPU tensors, nccl for CUDA ones, one GPU per local rank).
Without them everything here is a no-op for one process: the single-process path is unchanged.

What a step does across ranks (see tuning.py and trainer.py):
  - rollouts: rank r generates and scores a contiguous slice of the step's prompts
    (`shard_range`); the slices are gathered (`all_gather_object`) before the advantages, so
    every group is whole however the prompts were split and every rank sees the same batch;
  - training: every rank packs the same global batch the same way, takes its share of the
    sequences (balanced by tokens, `balance_tokens`) and the gradients are summed
    (`all_reduce_grads`, DDP) or reduce-scattered (FSDP2) so the update equals the 1-rank one;
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


def _call(what: str, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except (RuntimeError, dist.DistBackendError, ConnectionError) as e:
        raise DistributedError(
            f"rank {rank()}: lost contact with the other ranks during {what} ({e}); the run "
            f"stops; the last saved state is intact: {_resume_text()}") from None


def barrier(what: str = "barrier") -> None:
    if active():
        _call(what, dist.barrier)


def all_gather_object(obj: Any, what: str = "all_gather") -> list:
    """[obj of rank 0, obj of rank 1, ...]; [obj] in one process."""
    if not active():
        return [obj]
    out: list = [None] * world_size()
    _call(what, dist.all_gather_object, out, obj)
    return out


def all_reduce_(t: torch.Tensor, op: str = "sum", what: str = "all_reduce") -> torch.Tensor:
    """In place; op: sum | max | min."""
    if active():
        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        _call(what, dist.all_reduce, t, ops[op])
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


def shard_range(n: int, world: int | None = None, r: int | None = None) -> tuple[int, int]:
    """[start, stop) of rank r's contiguous share of n items; shares differ by at most one
    item, earlier ranks take the extra ones; a rank may get none when n < world."""
    world = world_size() if world is None else world
    r = rank() if r is None else r
    base, extra = divmod(n, world)
    start = r * base + min(r, extra)
    return start, start + base + (1 if r < extra else 0)


def balance_tokens(lengths: Sequence[int], world: int) -> list[list[int]]:
    """Deal sequences to `world` ranks, longest first to the rank with the fewest tokens so far
    (LPT; ties: lowest rank), so ranks get about the same number of *tokens*, not sequences.
    Deterministic: every rank computes the same assignment from the same lengths.
    Returns, per rank, the sorted indices into `lengths`."""
    loads = [0] * world
    out: list[list[int]] = [[] for _ in range(world)]
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        r = min(range(world), key=lambda r: (loads[r], r))
        out[r].append(i)
        loads[r] += lengths[i]
    return [sorted(x) for x in out]


def generate_and_score(engine, scorer, prompts: Sequence[list[int]], records: Sequence,
                       sampling, progress: bool = False):
    """One step's rollouts and rewards for all `prompts`, the work split over ranks.

    Rank r (under vLLM tensor parallel, TP group r // tp) generates and scores its contiguous
    slice (`shard_range`; a group never straddles two ranks while it is sampled and scored,
    so consensus-style scorers see whole groups),
    with sampling.prompt_index set to the slice's start so the torch engine's samples are
    those a single process would draw. The slices are then gathered, so every rank returns
    the whole step (every group, every reward) for the advantages, in prompt order.
    Returns (rollouts, scores, gen_seconds, score_seconds): this rank's seconds, the gather
    counted in score_seconds."""
    import dataclasses
    import time

    from tao_fast.profiling.trace import phase
    from tao_fast.rollout import Rollouts
    from tao_fast.scoring import ScoreResult

    # vLLM tensor parallel over torchrun ranks: the ranks of one TP group are one engine, so
    # they take the same slice (in lockstep) and only the group's first rank's results count
    tp = engine.tensor_parallel
    lo, hi = shard_range(len(prompts), world_size() // tp, rank() // tp)
    t0 = time.perf_counter()
    base = sampling.prompt_index or 0
    with phase("tao/generate"):
        if hi > lo or engine.lockstep:  # vLLM DP engines step together
            ro = engine.generate(list(prompts[lo:hi]),
                                 dataclasses.replace(sampling, prompt_index=base + lo),
                                 progress=progress)
        else:  # fewer prompts than ranks: this rank has none this step
            ro = Rollouts.empty()
    t1 = time.perf_counter()
    with phase("tao/score"):
        sc = scorer.score(list(records[lo:hi]), ro.texts) if hi > lo else ScoreResult([], [])
    if not active():
        return ro, sc, t1 - t0, time.perf_counter() - t1
    parts = all_gather_object((ro, sc), "rollout gather")[::tp]
    ros, scs = [p[0] for p in parts], [p[1] for p in parts]
    cat = lambda xs: [y for x in xs for y in x]  # noqa: E731
    secs = max(r.stats.get("seconds", 0.0) for r in ros)
    tokens = sum(r.stats.get("tokens", 0) for r in ros)
    stats = {"tokens": tokens, "seconds": secs, "tokens_per_s": tokens / secs if secs else 0.0}
    if any("peak_memory_mb" in r.stats for r in ros):
        stats["peak_memory_mb"] = max(r.stats.get("peak_memory_mb", 0.0) for r in ros)
    rollouts = Rollouts(cat(r.prompt_ids for r in ros), cat(r.token_ids for r in ros),
                        cat(r.texts for r in ros), cat(r.logprobs for r in ros),
                        cat(r.finish_reasons for r in ros), stats=stats)
    failures: dict[str, int] = {}
    for s in scs:
        for k, v in s.failures.items():
            failures[k] = failures.get(k, 0) + v
    n = [len(s.rewards) for s in scs]
    keys = sorted({k for s in scs for k in s.stats})
    mean = {k: sum(s.stats.get(k, 0.0) * w for s, w in zip(scs, n)) / max(sum(
        w for s, w in zip(scs, n) if k in s.stats), 1) for k in keys}  # per-prompt weighted
    scores = ScoreResult(cat(s.rewards for s in scs), cat(s.details for s in scs), failures, mean)
    return rollouts, scores, t1 - t0, time.perf_counter() - t1


def fully_shard_model(model: torch.nn.Module) -> torch.nn.Module:
    """FSDP2 over all ranks: each decoder layer's attention and MLP are their own units (the
    model calls them, not Block.forward, so that is where FSDP's hooks must sit), then the
    root (embedding, norms, lm_head). Gradients are reduce-scattered as a SUM (divide factor
    1): the trainer's loss weights come from global counts, so the sum is the 1-rank gradient."""
    from torch.distributed.fsdp import fully_shard

    units = [m for blk in model.layers for m in (blk.self_attn, blk.mlp)]
    for m in units:
        fully_shard(m)
    fully_shard(model)
    for m in [*units, model]:
        m.set_gradient_divide_factor(1.0)
        m.set_force_sum_reduction_for_comms(True)  # a plain SUM: gloo has no PREMUL_SUM
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    return any(type(p).__name__ == "DTensor" for p in model.parameters())


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered to a plain tensor on every rank (a collective); others unchanged."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def full_named_parameters(model: torch.nn.Module):
    """(name, full tensor) for every parameter; under FSDP every rank must iterate it fully,
    in the same order (each parameter is one all-gather)."""
    for name, p in model.named_parameters():
        yield name, _call(f"gathering {name}", full_tensor, p.detach())


def _sd_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    """FSDP: {"model_state": {name: tensor}, "opt_state": optimizer.state_dict()-shaped dict}
    gathered to rank 0 on the CPU (other ranks get {}). Optimizer keys go from parameter
    names back to indices, so the files are the same as a 1-rank run's."""
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict,
                                                         get_optimizer_state_dict)

    msd = _call("gathering the model state", get_model_state_dict, model, options=_sd_options())
    osd = _call("gathering the optimizer state", get_optimizer_state_dict, model, opt,
                options=_sd_options())
    if not is_main():
        return {}
    ids = {name: i for i, (name, _) in enumerate(model.named_parameters())}
    osd = {"state": {ids[k]: v for k, v in osd["state"].items()},
           "param_groups": [{**g, "params": [ids[n] for n in g["params"]]}
                            for g in osd["param_groups"]]}
    return {"model_state": msd, "opt_state": osd}


def load_full_state(model: torch.nn.Module, opt: torch.optim.Optimizer, weights: dict,
                    opt_state: dict) -> None:
    """FSDP: load a 1-rank-format state (every rank read the same files) into the shards."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                         set_model_state_dict,
                                                         set_optimizer_state_dict)

    names = [name for name, _ in model.named_parameters()]
    osd = {"state": {names[int(i)]: v for i, v in opt_state["state"].items()},
           "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]}
                            for g in opt_state["param_groups"]]}
    opts = StateDictOptions(full_state_dict=True)
    _call("loading the model state", set_model_state_dict, model, weights, options=opts)
    _call("loading the optimizer state", set_optimizer_state_dict, model, opt, osd,
          options=opts)


def choose_parallel(mode: str, model: torch.nn.Module, micro_batch_tokens: int,
                    device_bytes: int | None = None) -> str:
    """rl.parallel -> "ddp" | "fsdp". auto: DDP where a whole replica fits, i.e. the
    accounting's peak (rl/memory.py: weights, gradients, AdamW, activations of one
    micro-batch) is under 85% of the device; FSDP2 otherwise. On the CPU (no device limit
    known, device_bytes None) auto is DDP."""
    if mode in ("ddp", "fsdp"):
        return mode
    dev = next(model.parameters()).device
    if device_bytes is None and dev.type == "cuda":
        device_bytes = torch.cuda.get_device_properties(dev).total_memory
    if device_bytes is None:
        return "ddp"
    from tao_fast.rl.memory import Shape, learner_bytes

    p = next(model.parameters())
    need = learner_bytes(Shape.from_args(model.args), micro_batch_tokens,
                         master_bytes=p.element_size(), act_bytes=min(p.element_size(), 2),
                         checkpointing=bool(getattr(model, "gradient_checkpointing", False)))
    return "ddp" if need["peak"] <= 0.85 * device_bytes else "fsdp"
