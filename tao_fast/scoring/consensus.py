"""Label-free consensus: majority vote over a group's extracted answers (test-time RL style).

Each candidate's answer is extracted (tao_fast.scoring.extract: last_number, boxed, json:KEY,
regex:..., ...) and put in canonical form (numbers by value, text by normalised words). The
group's majority answer is the most common one when it is unique, held by at least two
candidates and by at least `min_share` of the group; candidates that give it score 1, the
others 0 (reward="share": each candidate scores the share of the group that agrees with it).
With no majority every candidate scores `no_majority_value` (0 by default: no signal, the
group is skipped by the advantage computation).

Stats for the run's metrics: how often a majority exists, its mean share, how often an answer
could be extracted at all.
"""
from __future__ import annotations

from collections import Counter

from tao_fast.scoring.base import ScoreResult, Scorer
from tao_fast.scoring.extract import canonical, extract_answer


class ConsensusScorer(Scorer):
    def __init__(self, extract: str = "last_number", min_share: float = 0.0,
                 reward: str = "binary", no_majority_value: float = 0.0,
                 name: str = "consensus"):
        extract_answer("", extract)  # unknown extractor -> error before any generation
        if not 0.0 <= min_share <= 1.0:
            raise ValueError(f"min_share must be in [0, 1], got {min_share}")
        if reward not in ("binary", "share"):
            raise ValueError(f"reward must be 'binary' or 'share', got {reward!r}")
        self.extract, self.min_share, self.reward = extract, min_share, reward
        self.no_majority_value, self.name = no_majority_value, name

    def majority(self, keys: list[str | None]) -> tuple[str | None, float]:
        """(majority key or None, its share of the whole group)."""
        counts = Counter(k for k in keys if k is not None).most_common(2)
        if not counts:
            return None, 0.0
        top, n = counts[0]
        share = n / len(keys)
        unique = len(counts) == 1 or counts[1][1] < n
        return (top if unique and n >= 2 and share >= self.min_share else None), share

    def score(self, prompts, candidates) -> ScoreResult:
        rewards, details = [], []
        n_major, shares, extracted, total = 0, [], 0, 0
        for group in candidates:
            answers = [extract_answer(t, self.extract) for t in group]
            keys = [canonical(a) for a in answers]
            top, share = self.majority(keys)
            counts = Counter(k for k in keys if k is not None)
            extracted += sum(k is not None for k in keys)
            total += len(keys)
            if top is not None:
                n_major += 1
                shares.append(share)
            rs = []
            for k in keys:
                if self.reward == "share":
                    rs.append(counts[k] / len(keys) if k is not None else 0.0)
                elif top is None:
                    rs.append(self.no_majority_value)
                else:
                    rs.append(float(k == top))
            rewards.append(rs)
            details.append([{"answer": a, "majority": top, "majority_share": round(share, 4)}
                            for a in answers])
        stats = {f"{self.name}/majority_rate": n_major / max(len(candidates), 1),
                 f"{self.name}/majority_share": sum(shares) / len(shares) if shares else 0.0,
                 f"{self.name}/extract_rate": extracted / max(total, 1)}
        return ScoreResult(rewards, details, {}, stats)
