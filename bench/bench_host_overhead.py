"""Host-side Python work of one TAO step of the demo's size, against the step's total time.

    python bench/bench_host_overhead.py                 # ~4 min on 2 busy cores
    python bench/bench_host_overhead.py --steps 3 --json /tmp/host_overhead.json

Is there a case for native code (csrc/)? Only if the Python that runs around the kernels is a
real share of a step. One step here is the demo's (`tao-fast demo`): the embedded
SmolLM2-135M-Instruct learner in fp32, a bf16 sampler copy (TorchEngine), 8 arithmetic prompts
x n=8 candidates, temperature 0.7, <= 32 new tokens; the arithmetic verifier; GRPO advantages;
the weight sync into the sampler; one Learner.step (ops backend "torch", micro-batches of
rl.micro_batch_tokens). The learner trains on all 64 candidates (random advantages), the demo's
largest step: its real steps train on the groups with signal, about half.

Each step runs twice per repetition (A/B): once plain (the step's time), once under cProfile,
whose cumulative times split it into
  generate: model forward (Transformer.forward_cached + logits), sampling (sample_tokens),
            decode (the tokenizer), and the rest: the decode loop's Python bookkeeping (row
            compaction, stop checks, output lists)
  learner:  host work: pack_sequences, make_packed_batch, the per-token target / advantage /
            log-prob lists (_per_token) and pack_per_token, microbatch_agg; the rest is
            forward, loss, backward and AdamW
  scoring, advantages + samples + the step's metrics (tuning's per-step bookkeeping), sync.
cProfile slows Python-heavy code more than kernels, so the host shares it reports are upper
bounds. Shares are of the profiled step (numerator and denominator from the same runs: on a
shared machine the plain runs' times move with the load); the plain runs' median and minimum
are printed beside it (the A/B). Prints a markdown table (--json: also JSON; --render: the
table of a saved JSON).
"""
from __future__ import annotations

import argparse
import cProfile
import copy
import json
import os
import pstats
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402


def _key(fn) -> tuple:
    """cProfile's key of a function: (file, first line, name)."""
    c = fn.__code__
    return (c.co_filename, c.co_firstlineno, c.co_name)


def profile_targets() -> dict:
    """The functions whose cumulative time splits generate and the learner step. Exact keys,
    so that Transformer.forward_cached is not confused with the attention module's method of
    the same name; by (file suffix, name) for the tokenizer's decode and the learner's
    per-token list builder (module-private: named here, never called)."""
    from tao_fast.models.llama import Transformer
    from tao_fast.rl import packing
    from tao_fast.rollout.torch_engine import sample_tokens

    return {"gen_model": [_key(Transformer.forward_cached), _key(Transformer.logits)],
            "gen_sampling": [_key(sample_tokens)],
            "gen_decode": [("tokenization", "decode")],
            "learner_host": [_key(f) for f in (packing.pack_sequences, packing.make_packed_batch,
                                               packing.pack_per_token, packing.microbatch_agg)]
            + [("tao_fast/rl/trainer.py", "_per_token")]}


def build(micro_batch_tokens: int):
    """The demo's parts: learner model + Learner, bf16 TorchEngine copy, prompts, scorer."""
    from tao_fast.config import RLConfig
    from tao_fast.data import arithmetic_split
    from tao_fast.data.prompts import encode_prompt
    from tao_fast.models import load_model
    from tao_fast.rl.trainer import Learner
    from tao_fast.rollout.torch_engine import TorchEngine
    from tao_fast.scoring import build_scorer

    model, tok, _ = load_model("embedded:smollm2-135m-instruct")  # fp32, as the demo's learner
    learner = Learner(model, RLConfig(lr=2e-5, micro_batch_tokens=micro_batch_tokens),
                      temperature=0.7, ops_backend="torch")
    sampler = copy.deepcopy(model).to(torch.bfloat16).requires_grad_(False)
    recs, _ = arithmetic_split(8, 0, seed=0)
    return dict(model=model, learner=learner, engine=TorchEngine(sampler, tok), recs=recs,
                prompts=[encode_prompt(r, tok) for r in recs],
                scorer=build_scorer("arithmetic"))


def one_step(ctx, seed: int) -> dict:
    """One demo-sized step; -> seconds of each part (wall clock)."""
    from tao_fast.rl.advantages import group_advantages
    from tao_fast.rl.trainer import samples_from_rollouts
    from tao_fast.rollout import SamplingParams

    t = [time.perf_counter()]
    ro = ctx["engine"].generate(ctx["prompts"], SamplingParams(n=8, temperature=0.7,
                                                               max_tokens=32, seed=seed))
    t.append(time.perf_counter())
    scores = ctx["scorer"].score(ctx["recs"], ro.texts)
    t.append(time.perf_counter())
    advs, signal = group_advantages(scores.rewards, "grpo", True)
    samples_from_rollouts(ro, advs, signal)  # what tuning trains on: the groups with signal
    flat = [r for g in scores.rewards for r in g]
    mean = sum(flat) / len(flat)
    ctx["metrics"] = {"reward_mean": mean, "reward_std": (sum((r - mean) ** 2 for r in flat)
                                                          / len(flat)) ** 0.5,
                      "zero_signal_groups": signal.count(False), **scores.stats,
                      "response_tokens_mean": ro.num_tokens / len(flat)}
    g = torch.Generator().manual_seed(seed)
    rand = [[float(torch.randn((), generator=g)) for _ in grp] for grp in ro.token_ids]
    samples = samples_from_rollouts(ro, rand, [True] * len(ro.token_ids))  # all 64 train
    t.append(time.perf_counter())
    stats = ctx["learner"].step(samples)
    t.append(time.perf_counter())
    ctx["engine"].load_weights(ctx["model"].named_parameters())
    t.append(time.perf_counter())
    names = ("generate", "scoring", "bookkeeping", "learner", "sync")
    out = {n: b - a for n, a, b in zip(names, t, t[1:])}
    out.update(total=t[-1] - t[0], train_tokens=stats["train_tokens"],
               gen_tokens=ro.num_tokens, micro_batches=stats["micro_batches"])
    return out


def cumulative(stats: pstats.Stats, targets) -> float:
    """Seconds spent in (and under) the target functions: exact cProfile keys are summed (they
    never call each other); for a (file suffix, name) pair, the outermost match (the largest
    cumulative time: a decode calling another decode is counted once)."""
    total = 0.0
    for t in targets:
        if len(t) == 3:
            total += stats.stats.get(t, (0, 0, 0, 0.0))[3]
            continue
        suffix, name = t
        total += max((v[3] for (path, _, fn), v in stats.stats.items()
                      if fn == name and suffix in path.replace(os.sep, "/")), default=0.0)
    return total


def profiled_step(ctx, seed: int, targets: dict) -> dict:
    """one_step under cProfile, with the host parts split out of generate and learner."""
    prof = cProfile.Profile()
    prof.enable()
    part = one_step(ctx, seed)
    prof.disable()
    st = pstats.Stats(prof)
    part.update({k: cumulative(st, v) for k, v in targets.items()})
    part["gen_host_loop"] = (part["generate"] - part["gen_model"] - part["gen_sampling"]
                             - part["gen_decode"])
    part["learner_compute"] = part["learner"] - part["learner_host"]
    return part


def table(plain: list[dict], prof: list[dict]) -> list[str]:
    """Markdown: each part's median ms under cProfile and its share of the profiled step (both
    measured in the same runs), then the plain runs' step time (the A/B)."""
    med = lambda rows, k: statistics.median(r[k] for r in rows)  # noqa: E731
    total = med(prof, "total")
    rows = [("step total, under cProfile (the denominator)", total, False),
            ("generate", med(prof, "generate"), False),
            ("  model forward (forward_cached + logits)", med(prof, "gen_model"), False),
            ("  sampling (sample_tokens)", med(prof, "gen_sampling"), False),
            ("  decode (tokenizer)", med(prof, "gen_decode"), True),
            ("  decode-loop Python bookkeeping (the rest)", med(prof, "gen_host_loop"), True),
            ("scoring (arithmetic verifier, 64 candidates)", med(prof, "scoring"), True),
            ("advantages + samples + metrics", med(prof, "bookkeeping"), True),
            ("learner step", med(prof, "learner"), False),
            ("  host: packing, per-token lists, tensor building", med(prof, "learner_host"),
             True),
            ("  forward + loss + backward + AdamW (the rest)", med(prof, "learner_compute"),
             False),
            ("weight sync into the bf16 sampler", med(prof, "sync"), False)]
    host = sum(v for _, v, h in rows if h)
    out = ["| part | ms per step | % of the step | host-side Python? |",
           "| --- | --- | --- | --- |"]
    out += [f"| {n} | {1e3 * v:,.1f} | {100 * v / total:.2f} | {'yes' if h else ''} |"
            for n, v, h in rows]
    out.append(f"| **host-side Python, all parts marked yes** | {1e3 * host:,.1f} | "
               f"**{100 * host / total:.2f}** | |")
    plain_t = sorted(r["total"] for r in plain)
    out.append(f"\nA/B: the same step without cProfile took {statistics.median(plain_t):.1f} s "
               f"(median; min {plain_t[0]:.1f} s, max {plain_t[-1]:.1f} s) vs "
               f"{total:.1f} s under it; host share of the fastest plain step: "
               f"{100 * host / plain_t[0]:.2f}%")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=2, help="repetitions of each of the A/B runs")
    ap.add_argument("--micro-batch-tokens", type=int, default=4096, help="rl.micro_batch_tokens")
    ap.add_argument("--json", default="", help="also write every step's parts here")
    ap.add_argument("--render", default="", help="print the table of a --json file and stop")
    a = ap.parse_args(argv)
    if a.render:
        saved = json.loads(Path(a.render).read_text())
        print("\n".join(table(saved["plain"], saved["profiled"])))
        return 0
    from harness import run_meta

    ctx = build(a.micro_batch_tokens)
    one_step(ctx, seed=0)  # warm-up: first-call allocations, AdamW state
    plain, prof, targets = [], [], profile_targets()
    for i in range(a.steps):
        plain.append(one_step(ctx, seed=1 + i))
        prof.append(profiled_step(ctx, 1 + i, targets))
        print(f"step {i + 1}/{a.steps}: plain {plain[-1]['total']:.1f} s, profiled "
              f"{prof[-1]['total']:.1f} s", flush=True)
    meta = run_meta("cpu")
    lines = table(plain, prof)
    print(f"\n{meta['cpu']} ({meta['cpu_count']} cores, torch threads "
          f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}); torch "
          f"{meta['torch']}; {meta['date']}; commit {meta['commit']}")
    print(f"{plain[-1]['gen_tokens']} generated tokens, {plain[-1]['train_tokens']} trained "
          f"tokens in {plain[-1]['micro_batches']} micro-batches per step; medians of {a.steps}\n")
    print("\n".join(lines))
    if a.json:
        Path(a.json).write_text(json.dumps({"meta": meta, "plain": plain, "profiled": prof},
                                           indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
