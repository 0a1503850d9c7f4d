"""What every scorer shares: the Scorer protocol, its result, the run's context, and the two
helpers that turn per-candidate work and whole-batch failures into a ScoreResult.

Scorer modules import from here (never from the package `__init__`, which re-exports these
names and `build_scorer`), so no scoring module imports another through the package.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

from tao_fast.data.prompts import PromptRecord


@dataclass
class ScoreResult:
    rewards: list[list[float]]  # [P][N]
    details: list[list[dict]] = field(default_factory=list)  # [P][N]; failed ones hold "error"
    failures: dict[str, int] = field(default_factory=dict)  # scorer name -> failed candidates
    stats: dict[str, float] = field(default_factory=dict)  # e.g. "consensus/majority_rate"

    @property
    def num_failures(self) -> int:
        return sum(self.failures.values())

    @classmethod
    def concat(cls, parts: Sequence["ScoreResult"]) -> "ScoreResult":
        """The results of consecutive slices of prompts as one: rewards and details in order,
        failures summed per scorer, each stat the mean of the parts that report it, weighted
        by their prompt counts."""
        rewards = [g for s in parts for g in s.rewards]  # [P][N]
        details = [g for s in parts for g in s.details]  # [P][N]
        failures: dict[str, int] = {}
        for s in parts:
            for k, v in s.failures.items():
                failures[k] = failures.get(k, 0) + v
        n = [len(s.rewards) for s in parts]
        keys = sorted({k for s in parts for k in s.stats})
        mean = {k: sum(s.stats.get(k, 0.0) * w for s, w in zip(parts, n)) / max(sum(
            w for s, w in zip(parts, n) if k in s.stats), 1) for k in keys}
        return cls(rewards, details, failures, mean)


@runtime_checkable  # the mix tells a scorer object from a spec to build
class Scorer(Protocol):
    """What the recipe, the evaluation and the mix need of a scorer. Scorers subclass it, so
    the attributes below have these defaults and no caller probes for them."""

    name: str
    # whether it asks the policy's own engine (a judge with model="policy", or a mix with such
    # a part): the recipe refuses that under vLLM data parallelism
    uses_policy: bool = False

    def score(self, prompts: Sequence[PromptRecord],
              candidates: Sequence[Sequence[str]]) -> ScoreResult:
        """Rewards of P prompts' candidates: candidates [P][N] -> ScoreResult [P][N]."""
        ...

    def check(self, prompts: Sequence[PromptRecord]) -> None:
        """ConfigError before any generation when the prompt records lack what scoring them
        needs (e.g. a SQL prompt's database, a code prompt's tests); by default nothing to
        check."""


@dataclass
class ScorerContext:
    """What a scorer may need from the run, beyond its own options."""
    seed: int = 0
    failure_value: float = 0.0
    timeout_s: float = 60.0  # sandboxed scorers: wall-clock limit of one batch / one candidate
    memory_mb: int = 2048  # sandboxed scorers: address-space limit
    base_dir: Path = field(default_factory=Path.cwd)  # relative paths (databases, tests, models)
    # judge: () -> (engine, tokenizer) of the policy being tuned, when the judge uses it
    policy_engine: Callable[[], tuple[Any, Any]] | None = None


def score_each(name: str, fn: Callable[[PromptRecord, str], tuple[float, dict]], prompts,
               candidates, failure_value: float = 0.0) -> ScoreResult:
    """Score candidate by candidate with fn(record, text) -> (reward, details); an exception
    on one candidate gives it `failure_value` and records the error, the rest go on.
    prompts [P], candidates [P][N] -> ScoreResult [P][N]."""
    rewards, details, failed = [], [], 0
    for rec, group in zip(prompts, candidates, strict=True):
        rs, ds = [], []
        for text in group:
            try:
                r, d = fn(rec, text)
                r = float(r)
                if not math.isfinite(r):
                    raise ValueError(f"non-finite reward {r}")
            except Exception as e:  # noqa: BLE001 - recorded on the candidate
                failed += 1
                r, d = failure_value, {"error": f"{type(e).__name__}: {e}"}
            rs.append(r)
            ds.append(d)
        rewards.append(rs)
        details.append(ds)
    return ScoreResult(rewards, details, {name: failed} if failed else {})


def failed_batch(name: str, candidates, failure_value: float, error: str) -> ScoreResult:
    """Every candidate failed (e.g. the sandbox died): failure value, the error kept on each.
    candidates [P][N] -> ScoreResult [P][N]."""
    n = sum(map(len, candidates))
    return ScoreResult([[failure_value] * len(c) for c in candidates],
                       [[{"error": error} for _ in c] for c in candidates], {name: n})
