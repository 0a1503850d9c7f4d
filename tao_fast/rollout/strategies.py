"""Candidates under several prompting strategies, and the prompt the learner trains on.

rollout.strategy names one strategy (plain | cot | structured) or several joined with '+'
(e.g. plain+cot). With k strategies, candidate j of every group is generated under strategy
j % k (`candidate_counts`, `merge_candidates`), so the group mixes the prompts and is scored,
and its advantages computed, as one group. rollout.train_prompt says which prompt the learner
trains on with those responses: the strategy's (train_prompt=strategy) or the user's plain
one (train_prompt=plain, TAO's form: the compute of the longer prompts is spent at tuning time,
and the tuned model answers the plain prompt at inference).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Sequence

from tao_fast.config import ConfigError
from tao_fast.profiling.trace import phase
from tao_fast.rl import distributed as dist_
from tao_fast.rl.rollout_shards import combined_stats, generate_and_score
from tao_fast.rollout.protocol import Engine, Rollouts, SamplingParams
from tao_fast.scoring.base import Scorer

SEED_STRIDE = 7919  # strategy s samples with seed + s * SEED_STRIDE (a prime): distinct draws


@dataclass
class PromptVariants:
    """One record's prompt token ids: `generate[s]` under strategy s of rollout.strategy
    ([k] id lists), `train` the prompt the learner trains on (rollout.train_prompt)."""
    generate: list[list[int]]
    train: list[int]


def candidate_counts(n: int, k: int) -> list[int]:
    """Candidates per strategy when n are split among k: strategy s takes j = s, s + k, ...
    (n // k each when k divides n)."""
    if not 1 <= k <= n:
        raise ConfigError(f"rollout.n: must be >= {k}, the strategies of rollout.strategy "
                          f"(one candidate each at least), got {n}")
    return [len(range(s, n, k)) for s in range(k)]


def merge_candidates(parts: Sequence[Rollouts]) -> Rollouts:
    """The k strategies' rollouts of the same P prompts as one: parts[s] is [P][n_s] with n_s
    = candidate_counts(N, k)[s]; the result is [P][N] with candidate j of prompt p taken from
    parts[j % k][p][j // k]. prompt_ids: the first strategy's (the caller sets the prompt the
    learner trains on). Stats: tokens and seconds summed (the parts ran one after another),
    peak_memory_mb the largest."""
    k, n_prompts = len(parts), len(parts[0].token_ids)
    if any(len(r.token_ids) != n_prompts for r in parts):
        raise ValueError("merge_candidates: the parts answer different numbers of prompts")

    def interleave(field: str) -> list[list]:  # [P][N]
        out = []
        for p in range(n_prompts):
            n = sum(len(getattr(r, field)[p]) for r in parts)
            if [len(getattr(r, field)[p]) for r in parts] != candidate_counts(n, k):
                raise ValueError(f"merge_candidates: prompt {p}'s candidates per strategy are "
                                 f"not the j % k split of {n}")
            out.append([getattr(parts[j % k], field)[p][j // k] for j in range(n)])
        return out

    return Rollouts(parts[0].prompt_ids, interleave("token_ids"), interleave("texts"),
                    interleave("logprobs"), interleave("finish_reasons"),
                    stats=combined_stats(parts, one_after_another=True))


def strategy_sampling(sampling: SamplingParams, s: int, k: int) -> SamplingParams:
    """Strategy s's share of a step's sampling: its candidate count and its own seed."""
    seed = None if sampling.seed is None else sampling.seed + s * SEED_STRIDE
    return dataclasses.replace(sampling, n=candidate_counts(sampling.n, k)[s], seed=seed)


def generate_candidates(engine: Engine, scorer: Scorer, prompts: Sequence[PromptVariants],
                        records: Sequence, sampling: SamplingParams, strategies: Sequence[str],
                        progress: bool = False):
    """A step's candidates and rewards: `prompts` [P] (each with k = len(strategies)
    generation prompts), sampling.n candidates per prompt, candidate j under strategy j % k.
    Returns (rollouts [P][N], scores [P][N], gen_seconds, score_seconds), as generate_and_score.

    One strategy: generate_and_score (sharded over ranks under torchrun). Several: each
    strategy's share is generated with its own seed, the shares merged (merge_candidates) and
    the whole groups scored at once, so consensus-style scorers see every candidate; on one
    process only (the recipe refuses it under torchrun). The scores' stats gain
    reward_mean/STRATEGY per strategy."""
    k = len(strategies)
    if k == 1:
        return generate_and_score(engine, scorer, [p.generate[0] for p in prompts], records,
                                  sampling, progress=progress)
    if dist_.active():
        raise ConfigError(f"rollout.strategy: {'+'.join(strategies)} runs on one process; "
                          f"under torchrun use one strategy")
    t0 = time.perf_counter()
    with phase("tao/generate"):
        parts = [engine.generate([p.generate[s] for p in prompts],
                                 strategy_sampling(sampling, s, k), progress=progress)
                 for s in range(k)]
    rollouts = merge_candidates(parts)
    t1 = time.perf_counter()
    with phase("tao/score"):
        scores = scorer.score(list(records), rollouts.texts)
    for s, name in enumerate(strategies):
        mine = [r for g in scores.rewards for j, r in enumerate(g) if j % k == s]
        scores.stats[f"reward_mean/{name}"] = sum(mine) / len(mine)
    return rollouts, scores, t1 - t0, time.perf_counter() - t1
