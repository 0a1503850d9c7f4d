"""Scorers give every candidate a number. `build_scorer(spec)` turns a config string into one.

Specs: "arithmetic" (prompt-only verifier of the built-in task), "random" (the control: rewards
that carry no information), "python:module:function" or "python:path/to/file.py:function" (a
user's function `f(prompt: str, candidates: list[str]) -> list[float]`, run in a sandboxed
subprocess with CPU-time, memory and wall-clock limits).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Protocol, Sequence

from tao_fast.data.prompts import PromptRecord


@dataclass
class ScoreResult:
    rewards: list[list[float]]  # [P][N]
    details: list[list[dict]] = field(default_factory=list)  # [P][N]: what the scorer saw
    failures: int = 0  # candidates whose scoring raised; they got the failure value


class Scorer(Protocol):
    name: str

    def score(self, prompts: Sequence[PromptRecord], candidates: Sequence[Sequence[str]]) -> ScoreResult: ...


class RandomScorer:
    """Control scorer: 0/1 rewards from a seeded coin. Tuning against it must not help."""

    name = "random"

    def __init__(self, seed: int = 0):
        self.rng = random.Random(seed)

    def score(self, prompts, candidates) -> ScoreResult:
        rewards = [[float(self.rng.random() < 0.5) for _ in group] for group in candidates]
        return ScoreResult(rewards, [[{} for _ in g] for g in candidates])


def build_scorer(spec: str, *, seed: int = 0, failure_value: float = 0.0,
                 timeout_s: float = 60.0, memory_mb: int = 2048) -> Scorer:
    """Scorer from its config string; bad specs fail here, before any generation."""
    if spec == "arithmetic":
        from tao_fast.scoring.arithmetic import ArithmeticVerifier

        return ArithmeticVerifier()
    if spec == "random":
        return RandomScorer(seed)
    if spec.startswith("python:"):
        from tao_fast.scoring.python_fn import PythonFunctionScorer

        return PythonFunctionScorer(spec, failure_value=failure_value, timeout_s=timeout_s,
                                    memory_mb=memory_mb)
    raise ValueError(f"unknown scorer {spec!r}: use 'arithmetic', 'random' or "
                     f"'python:module:function'")
