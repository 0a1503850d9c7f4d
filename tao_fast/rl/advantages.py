"""Group-relative advantages: every candidate is compared with the other answers to its prompt.

grpo:    A_i = (r_i - mean) / (std + eps)   (std: the group's sample std; off with std_normalize)
dr-grpo: A_i = r_i - mean                   (no std division: Dr.GRPO)
rloo:    A_i = r_i - mean of the others = N / (N - 1) * (r_i - mean)

A group whose rewards are all equal (or that has a single candidate) carries no signal: its
advantages are 0, it is skipped by the trainer, and it is counted.
"""
from __future__ import annotations

import math

ALGORITHMS = ("grpo", "dr-grpo", "rloo")


def group_advantages(rewards: list[list[float]], algorithm: str = "grpo",
                     std_normalize: bool = True, eps: float = 1e-6):
    """rewards [P][N] -> (advantages [P][N], has_signal [P])."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    advs, signal = [], []
    for group in rewards:
        n = len(group)
        if n == 0:
            raise ValueError("a group has no candidates")
        if any(not math.isfinite(r) for r in group):
            raise ValueError(f"non-finite reward in group {group}")
        mean = sum(group) / n
        if n < 2 or max(group) - min(group) <= 1e-12:
            advs.append([0.0] * n)
            signal.append(False)
            continue
        centered = [r - mean for r in group]
        if algorithm == "rloo":
            a = [c * n / (n - 1) for c in centered]
        elif algorithm == "grpo" and std_normalize:
            std = math.sqrt(sum(c * c for c in centered) / (n - 1))
            a = [c / (std + eps) for c in centered]
        else:
            a = centered
        advs.append(a)
        signal.append(True)
    return advs, signal
