"""One provider at one micro-batch budget, the OOM fallback over budgets, and the matched-memory
re-runs of tao-fast."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from harness import error_text, free_device
from learner.losses import eager_loss, make_grpo_loss, tao_loss
from learner.loop import time_steps
from learner.models import build_hf, build_tao
from learner.workload import Workload, packed_microbatches, padded_microbatches
from tao_fast.rl.packing import pack_sequences

NOMINAL_TFLOPS = 989.0  # H100 / H200 SXM dense bf16, the vendor's datasheet
PROVIDERS = ("tao-fast", "hf-sdpa", "liger", "liger-grpo")  # run in this order (Liger patches)
PEERS = PROVIDERS[1:]


@dataclass
class StepSetup:
    """What every run of one model size shares (the CLI's settings for the step loop)."""
    args: object  # ModelArgs
    weights: dict  # HF state dict in the run dtype
    workload: Workload
    device: torch.device
    dtype: torch.dtype
    ops_backend: str  # the in-house model's: "triton" on a GPU
    warmup: int
    steps: int
    flops: float  # useful FLOPs of one step
    peak_tflops: float  # the measured dense matmul rate


def run_once(provider: str, s: StepSetup, budget: int) -> dict:
    """One provider at one micro-batch budget -> row fields (raises on OOM)."""
    wl = s.workload
    bins = pack_sequences(wl.lengths, budget)
    if provider == "tao-fast":
        model = build_tao(s.args, s.weights, s.device, s.dtype, s.ops_backend)
        mbs = packed_microbatches(wl, bins, s.device)
        loss_fn, batch_tokens = tao_loss, sum(wl.lengths)
    else:
        model = build_hf(s.args, s.weights, s.device, s.dtype)
        mbs = padded_microbatches(wl, bins, s.device)
        loss_fn = eager_loss if provider in ("hf-sdpa", "liger") else make_grpo_loss()
        batch_tokens = sum(m["ids"].numel() for m in mbs)
    try:
        secs, peak, loss = time_steps(model, mbs, loss_fn, wl.n_counted, s.device, s.warmup,
                                      s.steps)
    finally:
        del model, mbs
    if loss != loss or abs(loss) == float("inf"):
        raise RuntimeError(f"non-finite loss {loss}")
    return dict(mb_tokens=budget, micro_batches=len(bins), step_s=secs, peak_bytes=peak,
                loss=loss, computed_tokens=batch_tokens)


def finish_row(row: dict, s: StepSetup) -> dict:
    """Throughput, MFU and padding of a row that ran."""
    tokens = sum(s.workload.lengths)
    row["status"] = "ok"
    row["tokens_per_s"] = tokens / row["step_s"]
    row["tflops"] = s.flops / row["step_s"] / 1e12
    row["mfu_measured"] = row["tflops"] / s.peak_tflops
    row["mfu_nominal"] = row["tflops"] / NOMINAL_TFLOPS
    row["padding_overhead"] = row["computed_tokens"] / tokens - 1.0
    if row["peak_bytes"] is not None:
        row["peak_gib"] = row["peak_bytes"] / 2 ** 30
    return row


def run_provider(provider: str, size: str, s: StepSetup, budgets: list[int]) -> dict:
    """Try each budget (largest first) until one fits; returns the table row (an error or an
    OOM at every budget is in its status)."""
    row = {"provider": provider, "model": size, "oom_at": []}
    for budget in budgets:
        try:
            row.update(run_once(provider, s, budget))
            break
        except torch.cuda.OutOfMemoryError:
            row["oom_at"].append(budget)
        except Exception as e:  # noqa: BLE001 (one provider failing must not stop the table)
            row["status"] = f"error: {error_text(e)}"
            break
        finally:
            free_device(s.device)
    if "step_s" not in row:
        row.setdefault("status", "OOM")
        return row
    return finish_row(row, s)


def best_peer(rows: list[dict]) -> dict | None:
    ok = [r for r in rows if r["provider"] in PEERS and r.get("status") == "ok"]
    return max(ok, key=lambda r: r["tokens_per_s"]) if ok else None


def matched_memory_runs(size: str, s: StepSetup, rows: list[dict], min_mb_tokens: int):
    """If tao-fast's peak memory exceeds the best peer's, re-run it at halved budgets until it
    uses no more (or the floor is reached); yields each new row."""
    peer = best_peer(rows)
    tao = [r for r in rows if r["provider"] == "tao-fast" and r.get("status") == "ok"]
    if not (peer and tao and peer.get("peak_gib") is not None):
        return
    cur = tao[0]
    while cur["peak_gib"] > peer["peak_gib"] and cur["mb_tokens"] // 2 >= min_mb_tokens:
        row = run_provider("tao-fast", size, s, [cur["mb_tokens"] // 2])
        row["matched_memory"] = True
        yield row
        if row["status"] != "ok":
            break
        cur = row
