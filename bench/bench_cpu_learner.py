"""The CPU learner's step on the demo's batch, A/B interleaved between settings.

    python bench/bench_cpu_learner.py                          # fp32 vs bf16 autocast
    python bench/bench_cpu_learner.py --rounds 3 --arms none,bfloat16 --epochs 1
    python bench/bench_cpu_learner.py --matmul                 # a bare matmul, fp32 vs bf16

The batch is the demo's: 64 candidates (8 arithmetic prompts x 8) of the embedded
SmolLM2-135M's prompts with 32-token responses, the learner in fp32 with the torch ops (what a
CPU run uses). Each round runs every arm once, in turn, on a fresh copy of the same starting
weights, so the machine's drift falls on every arm alike. Prints one JSON line per measurement
and a summary (median seconds per step and tokens/s per arm); the CPU's bf16 flags are printed
with it, since whether bf16 pays depends on them (tao_fast/dtypes.py BF16_CPU_FLAGS).
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

from harness import cpu_name


def demo_batch(tok, n_prompts: int = 8, n: int = 8, resp_tokens: int = 32):
    """The demo's training batch shape: its prompts, n candidates of resp_tokens each."""
    from tao_fast.data import arithmetic_split
    from tao_fast.data.prompts import encode_prompt
    from tao_fast.rl.trainer import Sample

    recs, _ = arithmetic_split(n_prompts, 0, seed=0)
    g = torch.Generator().manual_seed(0)
    out = []
    for r in recs:
        prompt = encode_prompt(r, tok)
        for _ in range(n):
            resp = torch.randint(0, 49152, (resp_tokens,), generator=g).tolist()
            out.append(Sample(prompt + resp, len(prompt), float(torch.randn((), generator=g)),
                              [-1.0] * resp_tokens))
    return out


def matmul_rates(reps: int = 10) -> dict:
    """TFLOP/s of a 2048x576 @ 576x1536 matmul (an MLP projection of the demo's model) in fp32
    and bf16, alternating, after 3 warm-up calls each."""
    a, b = torch.randn(2048, 576), torch.randn(576, 1536)
    out = {}
    for dt in (torch.float32, torch.bfloat16, torch.float32, torch.bfloat16):
        x, y = a.to(dt), b.to(dt)
        for _ in range(3):
            x @ y
        t0 = time.perf_counter()
        for _ in range(reps):
            x @ y
        rate = 2 * 2048 * 576 * 1536 * reps / (time.perf_counter() - t0) / 1e12
        out[str(dt).removeprefix("torch.")] = max(rate, out.get(str(dt).removeprefix("torch."), 0))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arms", default="none,bfloat16", help="model.autocast settings to compare")
    ap.add_argument("--rounds", type=int, default=2, help="A/B rounds (each runs every arm)")
    ap.add_argument("--epochs", type=int, default=1, help="rl.epochs of each step")
    ap.add_argument("--matmul", action="store_true", help="only the bare matmul's TFLOP/s")
    a = ap.parse_args(argv)
    if a.matmul:
        print(json.dumps({"threads": torch.get_num_threads(), "tflops": matmul_rates()}))
        return 0
    from tao_fast.config import RLConfig
    from tao_fast.dtypes import BF16_CPU_FLAGS, cpu_flags
    from tao_fast.models import load_model
    from tao_fast.rl.trainer import Learner

    base, tok, _ = load_model("embedded:smollm2-135m-instruct")
    samples = demo_batch(tok)
    arms = a.arms.split(",")
    times: dict[str, list[float]] = {k: [] for k in arms}
    tokens = sum(len(s.ids) for s in samples)
    for rnd in range(a.rounds):
        for arm in arms:
            learner = Learner(copy.deepcopy(base), RLConfig(lr=2e-5, epochs=a.epochs), 0.7,
                              "torch", autocast=arm)
            t0 = time.perf_counter()
            st = learner.step(samples)
            secs = time.perf_counter() - t0
            times[arm].append(secs)
            print(json.dumps({"round": rnd, "arm": arm, "seconds": round(secs, 2),
                              "tokens_per_s": round(st["train_tokens"] / secs, 1),
                              "loss": st["loss"]}), flush=True)
    flags = sorted(cpu_flags() & set(BF16_CPU_FLAGS))
    print(json.dumps({"machine": cpu_name(),
                      "threads": torch.get_num_threads(), "bf16_flags": flags,
                      "tokens_per_step": tokens * a.epochs, **{
                          f"{k}_median_s": round(statistics.median(v), 2) for k, v in times.items()},
                      **{f"{k}_tokens_per_s": round(tokens * a.epochs / statistics.median(v), 1)
                         for k, v in times.items()}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
