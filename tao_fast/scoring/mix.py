"""Mix: a weighted sum of scorers, with gates and per-scorer normalisation.

    {"type": "mix",
     "parts": [{"scorer": {"type": "json_schema", "schema": "schema.json"}, "gate": true},
               {"scorer": "consensus", "weight": 1.0},
               {"scorer": {"type": "judge"}, "weight": 0.5, "normalize": "group"}],
     "gate_fail_value": 0.0}

Gates run first: a candidate that scores below a gate's `threshold` (default 1.0) gets
`gate_fail_value` and is not shown to the other parts (no judge call is spent on a malformed
answer; votes are taken among the candidates that passed). A gate only filters unless it is
given a weight; other parts weigh 1 by default. Each other part's scores are normalised within the group ("none", "group": z-score,
"minmax": to [0, 1], "rank": to [0, 1] by rank) and weighted. Every part's score and details
are kept per candidate under details["parts"][part name]; failures and stats of the parts are
passed through, so the run's metrics count failures per scorer.
"""
from __future__ import annotations

from tao_fast.config import ConfigError
from tao_fast.scoring.base import ScoreResult, Scorer
from tao_fast.scoring.build import build_scorer

_PART_KEYS = {"scorer", "weight", "gate", "threshold", "normalize"}
_NORMS = ("none", "group", "minmax", "rank")


def normalize(xs: list[float], how: str) -> list[float]:
    """Scores of one group, normalised by `how` (equal scores map to 0 for every scheme)."""
    if how == "none" or not xs:
        return list(xs)
    lo, hi = min(xs), max(xs)
    if hi == lo:
        return [0.0] * len(xs)
    if how == "minmax":
        return [(x - lo) / (hi - lo) for x in xs]
    if how == "rank":  # ties share their average rank
        order = sorted(xs)
        return [(order.index(x) + (order.count(x) - 1) / 2) / (len(xs) - 1) for x in xs]
    mean = sum(xs) / len(xs)
    std = (sum((x - mean) ** 2 for x in xs) / len(xs)) ** 0.5
    return [(x - mean) / std for x in xs]


class Part:
    def __init__(self, scorer, weight: float | None = None, gate: bool = False,
                 threshold: float = 1.0, normalize: str = "none"):
        if normalize not in _NORMS:
            raise ValueError(f"normalize must be one of {list(_NORMS)}, got {normalize!r}")
        if weight is None:  # a gate filters; it adds to the sum only when given a weight
            weight = 0.0 if gate else 1.0
        self.scorer, self.weight, self.gate = scorer, float(weight), bool(gate)
        self.threshold, self.normalize = float(threshold), normalize
        self.name = scorer.name


class MixScorer(Scorer):
    """parts: Part objects, or mappings {scorer: a Scorer or a spec, weight, gate, threshold,
    normalize} (a spec is built with build_scorer, in `ctx`, its errors naming `where`)."""

    def __init__(self, parts: list, gate_fail_value: float = 0.0, name: str = "mix",
                 ctx=None, where: str = "scoring.scorer"):
        if not isinstance(parts, list) or not parts:
            raise ValueError("`parts` must be a non-empty list of {scorer: ..., weight: ...}")
        self.parts: list[Part] = []
        for i, spec in enumerate(parts):
            here = f"{where}.parts[{i}]"
            if isinstance(spec, Part):
                part = spec
            else:
                if not isinstance(spec, dict) or "scorer" not in spec:
                    raise ConfigError(f"{here}: expected a mapping with a 'scorer' key")
                if set(spec) - _PART_KEYS:
                    raise ConfigError(f"{here}: unknown key {sorted(set(spec) - _PART_KEYS)[0]!r}"
                                      f" (keys: {sorted(_PART_KEYS)})")
                sub = spec["scorer"]
                scorer = sub if isinstance(sub, Scorer) else \
                    build_scorer(sub, ctx, where=f"{here}.scorer")
                try:
                    part = Part(scorer, **{k: v for k, v in spec.items() if k != "scorer"})
                except (TypeError, ValueError) as e:
                    raise ConfigError(f"{here}: {e}") from None
            names = [p.name for p in self.parts]
            if part.name in names:  # keep every part's details apart
                part.name = f"{part.name}#{i}"
            self.parts.append(part)
        if all(p.gate and p.weight == 0 for p in self.parts):
            raise ValueError("every part is a zero-weight gate: nothing would be scored")
        self.gate_fail_value, self.name = float(gate_fail_value), name

    @property
    def uses_policy(self) -> bool:
        """Whether any part asks the policy's own engine (a judge on the policy)."""
        return any(p.scorer.uses_policy for p in self.parts)

    def check(self, prompts) -> None:
        """Every part's check, in order (the first ConfigError stops)."""
        for p in self.parts:
            p.scorer.check(prompts)

    def score(self, prompts, candidates) -> ScoreResult:
        P = len(candidates)
        alive = [[True] * len(g) for g in candidates]  # [P][N]: passed every gate so far
        total = [[0.0] * len(g) for g in candidates]
        details = [[{"parts": {}} for _ in g] for g in candidates]
        failures: dict[str, int] = {}
        stats: dict[str, float] = {}
        for part in sorted(self.parts, key=lambda q: not q.gate):  # gates first, stable
            # the sub-batch: each prompt with its still-alive candidates
            rows = [p for p in range(P) if any(alive[p])]
            if not rows:
                break
            cols = [[c for c in range(len(candidates[p])) if alive[p][c]] for p in rows]
            res = part.scorer.score([prompts[p] for p in rows],
                                    [[candidates[p][c] for c in cs] for p, cs in zip(rows, cols)])
            for k, v in res.failures.items():
                failures[k] = failures.get(k, 0) + v
            stats.update(res.stats)
            for p, cs, rs, ds in zip(rows, cols, res.rewards,
                                     res.details or [[{}] * len(c) for c in cols]):
                normed = normalize(rs, part.normalize)
                for c, r, n, d in zip(cs, rs, normed, ds):
                    details[p][c]["parts"][part.name] = {"score": r, **d}
                    if part.gate and r < part.threshold:
                        alive[p][c] = False
                        details[p][c]["gated_by"] = part.name
                    else:
                        total[p][c] += part.weight * n
        rewards = [[t if a else self.gate_fail_value for t, a in zip(ts, al)]
                   for ts, al in zip(total, alive)]
        n = sum(map(len, candidates))
        stats[f"{self.name}/gate_pass_rate"] = sum(map(sum, alive)) / max(n, 1)
        return ScoreResult(rewards, details, failures, stats)
