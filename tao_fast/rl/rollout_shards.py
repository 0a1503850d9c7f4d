"""A step's rollouts and rewards with the prompts split over ranks, and the slices merged back.

Rank r generates and scores a contiguous slice of the step's prompts (`shard_range`), so a group
is never split while it is sampled and scored; the slices are gathered (one all_gather_object)
and merged in prompt order (`concat_rollouts`, ScoreResult.concat), so every rank returns the
whole step, as one process would. On one process nothing is split or gathered.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Sequence

from tao_fast.profiling.trace import phase
from tao_fast.rl import distributed as dist_
from tao_fast.rollout import Engine, Rollouts, SamplingParams
from tao_fast.scoring.base import ScoreResult, Scorer


def shard_range(n: int, world: int | None = None, r: int | None = None) -> tuple[int, int]:
    """[start, stop) of rank r's contiguous share of n items; shares differ by at most one
    item, earlier ranks take the extra ones; a rank may get none when n < world."""
    world = dist_.world_size() if world is None else world
    r = dist_.rank() if r is None else r
    base, extra = divmod(n, world)
    start = r * base + min(r, extra)
    return start, start + base + (1 if r < extra else 0)


def combined_stats(parts: Sequence[Rollouts], one_after_another: bool) -> dict:
    """The stats of several rollouts taken as one: tokens summed; seconds summed when the parts
    ran one after another, else the slowest part's (side by side, e.g. ranks); tokens_per_s
    from those; peak_memory_mb the largest part's."""
    secs = [r.stats.get("seconds", 0.0) for r in parts]
    secs = sum(secs) if one_after_another else max(secs)
    tokens = sum(r.stats.get("tokens", 0) for r in parts)
    stats = {"tokens": tokens, "seconds": secs, "tokens_per_s": tokens / secs if secs else 0.0}
    if any("peak_memory_mb" in r.stats for r in parts):
        stats["peak_memory_mb"] = max(r.stats.get("peak_memory_mb", 0.0) for r in parts)
    return stats


def concat_rollouts(parts: Sequence[Rollouts], one_after_another: bool = False) -> Rollouts:
    """The rollouts of consecutive slices of prompts as one, in order; stats by
    `combined_stats` (default: the parts ran side by side, as the ranks' slices do)."""
    cat = lambda xs: [y for x in xs for y in x]  # noqa: E731
    return Rollouts(cat(r.prompt_ids for r in parts), cat(r.token_ids for r in parts),
                    cat(r.texts for r in parts), cat(r.logprobs for r in parts),
                    cat(r.finish_reasons for r in parts),
                    stats=combined_stats(parts, one_after_another))


def generate_and_score(engine: Engine, scorer: Scorer, prompts: Sequence[list[int]],
                       records: Sequence, sampling: SamplingParams, progress: bool = False):
    """One step's rollouts and rewards for all `prompts` ([P] token id lists, with their P
    prompt records), the work split over ranks.

    Rank r (under vLLM tensor parallel, TP group r // tp) generates and scores its contiguous
    slice (`shard_range`; a group never straddles two ranks while it is sampled and scored,
    so consensus-style scorers see whole groups),
    with sampling.prompt_index set to the slice's start so the torch engine's samples are
    those a single process would draw. The slices are then gathered (a collective), so every
    rank returns the whole step (every group, every reward) for the advantages, in prompt
    order. Returns (rollouts [P][N], scores [P][N], gen_seconds, score_seconds): this rank's
    seconds, the gather counted in score_seconds."""
    # vLLM tensor parallel over torchrun ranks: the ranks of one TP group are one engine, so
    # they take the same slice (in lockstep) and only the group's first rank's results count
    tp = engine.tensor_parallel
    lo, hi = shard_range(len(prompts), dist_.world_size() // tp, dist_.rank() // tp)
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
    if not dist_.active():
        return ro, sc, t1 - t0, time.perf_counter() - t1
    parts = dist_.all_gather_object((ro, sc), "rollout gather")[::tp]
    rollouts = concat_rollouts([p[0] for p in parts])
    scores = ScoreResult.concat([p[1] for p in parts])
    return rollouts, scores, t1 - t0, time.perf_counter() - t1
