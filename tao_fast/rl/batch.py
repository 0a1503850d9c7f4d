"""From one step's scored rollouts to the learner's samples, as the run's algorithm says:

    rewards [P][N] -> overlong penalty (DAPO) -> group advantages -> length preference
                   -> which candidates train (all with signal; bon-sft: each group's best;
                      overlong filter: not the truncated) -> Samples

and DAPO's dynamic sampling: `fill_groups` picks, from the groups generated over one or more
rounds, those the step trains on (by `reward_signal`, the unshaped scores). Pure functions of the rollouts and rewards (no model, no
engine), so each is tested alone.
"""
from __future__ import annotations

from dataclasses import dataclass

from tao_fast.rl.advantages import (best_of_group, group_advantages, length_adjusted,
                                    overlong_penalty)
from tao_fast.rl.algorithms import Resolved
from tao_fast.rl.trainer import samples_from_rollouts
from tao_fast.rollout import Rollouts
from tao_fast.scoring.base import ScoreResult


@dataclass
class StepBatch:
    samples: list  # tao_fast.rl.trainer.Sample
    has_signal: list[bool]  # [P]
    metrics: dict


def shaped_rewards(algo: Resolved, rollouts: Rollouts, rewards: list[list[float]],
                   max_tokens: int) -> list[list[float]]:
    """rewards [P][N] with the soft overlong penalty added when the algorithm uses it."""
    if algo.overlong != "penalty":
        return rewards
    return [[r + overlong_penalty(len(t), max_tokens, algo.overlong_cache)
             for r, t in zip(rg, tg)] for rg, tg in zip(rewards, rollouts.token_ids)]


def reward_signal(rewards: list[list[float]]) -> list[bool]:
    """[P]: which groups' scores differ, before any shaping. What dynamic sampling keeps (DAPO
    drops the groups whose answers the verifier finds all right or all wrong, whatever the
    overlong penalty adds) and what a step's zero_signal_groups counts."""
    return group_advantages(rewards, "centered")[1]


def build_samples(algo: Resolved, rl, rollouts: Rollouts, rewards: list[list[float]],
                  max_tokens: int) -> StepBatch:
    """The step's samples and its metrics: overlong_frac (candidates cut at max_tokens),
    and where they apply overlong_filtered, overlong_penalty_mean, sft_chosen_reward_mean.
    rl is the RLConfig (length_penalty, sft_top_k, std_normalize via algo)."""
    lengths = [[len(t) for t in g] for g in rollouts.token_ids]  # [P][N]
    cut = [[f == "length" for f in g] for g in rollouts.finish_reasons]  # [P][N]
    flat_cut = [c for g in cut for c in g]
    m = {"overlong_frac": sum(flat_cut) / max(len(flat_cut), 1)}
    shaped = shaped_rewards(algo, rollouts, rewards, max_tokens)
    if algo.overlong == "penalty":
        flat = [s - r for sg, rg in zip(shaped, rewards) for s, r in zip(sg, rg)]
        m["overlong_penalty_mean"] = sum(flat) / max(len(flat), 1)
    advs, signal = group_advantages(shaped, algo.advantage)
    advs = length_adjusted(advs, lengths, signal, rl.length_penalty, max_tokens)
    keep = [[True] * len(g) for g in lengths]  # [P][N]
    if algo.loss == "sft":
        keep, advs = _best_of_n(shaped, lengths, signal, rl.sft_top_k, rl.length_penalty > 0)
        chosen = [r for rg, kg in zip(rewards, keep) for r, k in zip(rg, kg) if k]
        if chosen:
            m["sft_chosen_reward_mean"] = sum(chosen) / len(chosen)
    if algo.overlong == "filter":
        dropped = sum(k and c for kg, cg, sig in zip(keep, cut, signal) if sig
                      for k, c in zip(kg, cg))
        keep = [[k and not c for k, c in zip(kg, cg)] for kg, cg in zip(keep, cut)]
        m["overlong_filtered"] = dropped
    return StepBatch(samples_from_rollouts(rollouts, advs, signal, keep), signal, m)


def _best_of_n(rewards, lengths, signal, k: int, prefer_short: bool):
    """bon-sft: (keep [P][N], advantages [P][N] = 1 on the kept) for the groups with signal."""
    keep, advs = [], []
    for rg, lg, sig in zip(rewards, lengths, signal):
        top = set(best_of_group(rg, lg, k, prefer_short)) if sig else set()
        keep.append([i in top for i in range(len(rg))])
        advs.append([1.0 if i in top else 0.0 for i in range(len(rg))])
    return keep, advs


def take_groups(rollouts: Rollouts, scores: ScoreResult, idx: list[int]):
    """The groups idx (prompt indices, in that order) of rollouts and scores."""
    pick = lambda xs: [xs[i] for i in idx] if xs else xs  # noqa: E731
    ro = Rollouts(pick(rollouts.prompt_ids), pick(rollouts.token_ids), pick(rollouts.texts),
                  pick(rollouts.logprobs), pick(rollouts.finish_reasons), stats=rollouts.stats)
    sc = ScoreResult(pick(scores.rewards), pick(scores.details), scores.failures, scores.stats)
    return ro, sc


def fill_groups(signal: list[bool], want: int) -> list[int]:
    """DAPO's dynamic sampling, choosing: the first `want` groups with signal, in order (fewer
    when fewer have it; groups without signal would be skipped by the learner anyway)."""
    return [i for i, s in enumerate(signal) if s][:want]
