"""One step's line of metrics.jsonl, from what the step produced: a pure function of the
rollouts, their scores and the groups' signal (no model, no engine), so it is tested alone."""
from __future__ import annotations

from typing import Sequence

from tao_fast.rollout import Rollouts
from tao_fast.scoring import ScoreResult


def rollout_metrics(rollouts: Rollouts, scores: ScoreResult, signal: Sequence[bool],
                    gen_seconds: float, score_seconds: float) -> dict:
    """Reward mean/std over every candidate, groups without signal (equal rewards), scorer
    failures (in all and per scorer) and scorer statistics, response length and generation
    throughput. rewards are [P][N]; signal is [P]."""
    flat = [r for group in scores.rewards for r in group]  # [P * N]
    if not flat:
        raise ValueError("rollout_metrics needs at least one scored candidate")
    mean = sum(flat) / len(flat)
    return {
        "reward_mean": mean,
        "reward_std": (sum((r - mean) ** 2 for r in flat) / len(flat)) ** 0.5,
        "zero_signal_groups": list(signal).count(False),
        "zero_signal_frac": list(signal).count(False) / len(signal),
        "score_failures": scores.num_failures,
        "score_failure_frac": scores.num_failures / len(flat),
        **{f"score_failures/{k}": v for k, v in scores.failures.items()},
        **scores.stats,
        "response_tokens_mean": rollouts.num_tokens / len(flat),
        "gen_tokens": rollouts.stats["tokens"],
        "gen_tokens_per_s": rollouts.stats["tokens_per_s"],
        "gen_seconds": gen_seconds,
        "score_seconds": score_seconds,
    }
