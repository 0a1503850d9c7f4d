"""Route: one scorer per task, chosen by a field of each prompt record (multi-task TAO).

    {"type": "route", "field": "task",
     "routes": {"sql": {"type": "sql"}, "math": "arithmetic"},
     "default": "consensus"}

A record's `field` (a key of its prompt line beside "prompt"/"messages", e.g. "task": "sql")
picks the route; a record without the field, or with a value no route names, goes to `default`
and is an error before any generation when there is none (`check`, naming the record's file
and line). Each route's scorer scores its own records' groups in one call per batch, so a
consensus or judge route sees whole groups; the results go back in the batch's order with
details["route"] set, failures counted per route scorer, and `route/<name>/reward_mean` in the
stats for each route the batch used.
"""
from __future__ import annotations

from tao_fast.config import ConfigError
from tao_fast.scoring.base import ScoreResult, Scorer
from tao_fast.scoring.build import build_scorer

DEFAULT = "default"  # the route name of records no route names


class RouteScorer(Scorer):
    """field: the record key that names the task; routes: {task value: scorer spec}; default:
    the spec for other records, or None (they are refused by check)."""

    name = "route"

    def __init__(self, field: str, routes: dict, default=None, ctx=None,
                 where: str = "scoring.scorer"):
        if not isinstance(field, str) or not field:
            raise ConfigError(f"{where}.field: must be a record key, got {field!r}")
        if field in ("prompt", "messages"):
            raise ConfigError(f"{where}.field: {field!r} is the prompt itself, not a task tag")
        if not isinstance(routes, dict) or not routes:
            raise ConfigError(f"{where}.routes: must be a non-empty mapping {{task: scorer}}")
        self.field = field
        self.scorers = {str(k): build_scorer(v, ctx, where=f"{where}.routes.{k}")
                        for k, v in routes.items()}
        if default is not None:
            if DEFAULT in self.scorers:
                raise ConfigError(f"{where}.routes: {DEFAULT!r} is the default's name; rename "
                                  f"that route")
            self.scorers[DEFAULT] = build_scorer(default, ctx, where=f"{where}.default")

    @property
    def uses_policy(self) -> bool:
        return any(s.uses_policy for s in self.scorers.values())

    def route_of(self, rec) -> str:
        """The route of a record: its field's value when a route names it, else the default
        (a ConfigError naming the record when there is none)."""
        value = rec.meta.get(self.field)
        key = str(value) if value is not None and not isinstance(value, (dict, list)) else None
        if key in self.scorers and key != DEFAULT:
            return key
        if DEFAULT in self.scorers:
            return DEFAULT
        where = rec.source or "a prompt record"
        what = f"has no {self.field!r} field" if value is None else \
            f"has {self.field}={value!r}, which no route names"
        raise ConfigError(f"{where}: {what} (routes: {sorted(self.scorers)}; add a "
                          f"`default` scorer or fix the record)")

    def check(self, prompts) -> None:
        """Every record has a route; each route's scorer checks its own records."""
        by_route: dict[str, list] = {}
        for rec in prompts:
            by_route.setdefault(self.route_of(rec), []).append(rec)
        for key, recs in by_route.items():
            self.scorers[key].check(recs)

    def score(self, prompts, candidates) -> ScoreResult:
        rows: dict[str, list[int]] = {}
        for p, rec in enumerate(prompts):
            rows.setdefault(self.route_of(rec), []).append(p)
        rewards: list = [None] * len(prompts)  # [P][N]
        details: list = [None] * len(prompts)
        failures: dict[str, int] = {}
        stats: dict[str, float] = {}
        for key, idx in rows.items():
            res = self.scorers[key].score([prompts[p] for p in idx],
                                          [candidates[p] for p in idx])
            ds = res.details or [[{} for _ in candidates[p]] for p in idx]
            for p, rs, d in zip(idx, res.rewards, ds, strict=True):
                rewards[p] = list(rs)
                details[p] = [{**x, "route": key} for x in d]
            for k, v in res.failures.items():
                failures[k] = failures.get(k, 0) + v
            stats.update(res.stats)
            flat = [r for p in idx for r in rewards[p]]
            stats[f"route/{key}/reward_mean"] = sum(flat) / max(len(flat), 1)
        return ScoreResult(rewards, details, failures, stats)
