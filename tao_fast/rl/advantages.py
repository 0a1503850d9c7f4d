"""Group-relative advantages: every candidate is compared with the other answers to its prompt.

grpo:     A_i = (r_i - mean) / (std + eps)   (std: the group's sample std)
centered: A_i = r_i - mean                   (Dr.GRPO: no std division; "dr-grpo" names it too)
rloo:     A_i = r_i - mean of the others = N / (N - 1) * (r_i - mean)
none:     no advantages (bon-sft picks candidates instead: `best_of_group`)

A group whose rewards are all equal (or that has a single candidate) carries no signal: its
advantages are 0, it is skipped by the trainer, and it is counted.

Shaping, applied before (rewards) or after (advantages) the above:
  overlong_penalty   DAPO's soft overlong punishment of a candidate's reward by its length
  length_adjusted    a bounded preference for shorter answers among equally scored ones
"""
from __future__ import annotations

import math

ADVANTAGES = ("grpo", "centered", "rloo", "none")
_ALIASES = {"dr-grpo": "centered"}


def group_advantages(rewards: list[list[float]], kind: str = "grpo",
                     std_normalize: bool = True, eps: float = 1e-6):
    """rewards [P][N] -> (advantages [P][N], has_signal [P]). kind: one of ADVANTAGES (or
    "dr-grpo" for centered); std_normalize=False makes grpo centered."""
    kind = _ALIASES.get(kind, kind)
    if kind not in ADVANTAGES:
        raise ValueError(f"algorithm must be one of {ADVANTAGES}, got {kind!r}")
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
        if kind == "rloo":
            a = [c * n / (n - 1) for c in centered]
        elif kind == "grpo" and std_normalize:
            std = math.sqrt(sum(c * c for c in centered) / (n - 1))
            a = [c / (std + eps) for c in centered]
        elif kind == "none":
            a = [0.0] * n
        else:
            a = centered
        advs.append(a)
        signal.append(True)
    return advs, signal


def overlong_penalty(length: int, max_tokens: int, cache: int) -> float:
    """DAPO's soft overlong punishment (its eq. 13) with L_max = max_tokens, L_cache = cache:
    0 up to max_tokens - cache tokens, then falling linearly to -1 at max_tokens."""
    start = max_tokens - cache
    if length <= start:
        return 0.0
    return max(-1.0, (start - length) / cache)


def length_adjusted(advantages: list[list[float]], lengths: list[list[int]], has_signal,
                    coef: float, max_tokens: int) -> list[list[float]]:
    """advantages [P][N] minus coef * (length - the group's mean length) / max_tokens, in the
    groups with signal only (a group of equal rewards stays untrained): shorter candidates of
    one score gain, and the shift is at most coef (lengths are at most max_tokens)."""
    if not coef:
        return advantages
    out = []
    for adv, lens, sig in zip(advantages, lengths, has_signal):
        mean = sum(lens) / len(lens)
        out.append([a - coef * (n - mean) / max_tokens for a, n in zip(adv, lens)] if sig
                   else list(adv))
    return out


def best_of_group(rewards: list[float], lengths: list[int], k: int,
                  prefer_short: bool) -> list[int]:
    """Indices of a group's k top-scored candidates (bon-sft), best first. Ties go to the
    shorter candidate when prefer_short, else to the earlier one (sampling order)."""
    key = (lambda i: (-rewards[i], lengths[i], i)) if prefer_short else (lambda i: (-rewards[i], i))
    return sorted(range(len(rewards)), key=key)[:k]
