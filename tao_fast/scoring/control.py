"""The control scorer ("random"): rewards that carry no information about quality, to show
what tuning gains from a scorer's signal and not from the update alone."""
from __future__ import annotations

import hashlib

from tao_fast.scoring.base import ScoreResult, Scorer


class RandomScorer(Scorer):
    """0/1 rewards that carry no information about quality. Each coin is a hash of (seed,
    prompt, candidate index, text), so a resumed run flips the same coins."""

    name = "random"

    def __init__(self, seed: int = 0):
        self.seed = seed

    def coin(self, prompt: str, i: int, text: str) -> float:
        h = hashlib.sha256(f"{self.seed}\0{prompt}\0{i}\0{text}".encode()).digest()
        return float(h[0] & 1)

    def score(self, prompts, candidates) -> ScoreResult:
        rewards = [[self.coin(p.text, i, t) for i, t in enumerate(group)]
                   for p, group in zip(prompts, candidates, strict=True)]
        return ScoreResult(rewards, [[{} for _ in g] for g in candidates])
