"""Scorers give every candidate a number. `build_scorer(spec)` turns a config value into one.

A spec is a string shorthand or a mapping with a `type` and that scorer's options:

    "arithmetic"                      prompt-only verifier of the built-in task
    "random"                          the control: rewards that carry no information
    "python:module:function"          a user's f(prompt, candidates) -> list[float], sandboxed
    {"type": "regex", "pattern": "^Answer: \\d+$"}            rules (tao_fast.scoring.rules)
    {"type": "consensus", "extract": "last_number"}           majority vote (label-free)
    {"type": "code"} / {"type": "sql"}                        execution verifiers, sandboxed
    {"type": "reward_model", "path": "dir"}                   sequence-classification model
    {"type": "judge", "mode": "pointwise"}                    LLM judge over an Engine
    {"type": "mix", "parts": [{"scorer": ..., "weight": 1, "gate": false}, ...]}

Every scorer scores a whole batch at once. A candidate whose scoring fails gets the failure
value and an "error" in its details; `ScoreResult.failures` counts them per scorer name so
the run's metrics can report them. Bad specs raise ConfigError here, before any generation;
`Scorer.check(prompts)` (optional) checks what depends on the prompt records, e.g. that every
database a SQL prompt names exists.
"""
from __future__ import annotations

import hashlib
import inspect
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

from tao_fast.config import ConfigError
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


class Scorer(Protocol):
    name: str

    def score(self, prompts: Sequence[PromptRecord],
              candidates: Sequence[Sequence[str]]) -> ScoreResult: ...


def score_each(name: str, fn: Callable[[PromptRecord, str], tuple[float, dict]], prompts,
               candidates, failure_value: float = 0.0) -> ScoreResult:
    """Score candidate by candidate with fn(record, text) -> (reward, details); an exception
    on one candidate gives it `failure_value` and records the error, the rest go on."""
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
    """Every candidate failed (e.g. the sandbox died): failure value, the error kept on each."""
    n = sum(map(len, candidates))
    return ScoreResult([[failure_value] * len(c) for c in candidates],
                       [[{"error": error} for _ in c] for c in candidates], {name: n})


class RandomScorer:
    """Control scorer: 0/1 rewards that carry no information about quality. Each coin is a
    hash of (seed, prompt, candidate index, text), so a resumed run flips the same coins."""

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


def _factories() -> dict[str, Callable]:
    from tao_fast.scoring import rules
    from tao_fast.scoring.arithmetic import ArithmeticVerifier

    def lazy(module: str, cls: str):
        def make(**kw):
            import importlib

            return getattr(importlib.import_module(f"tao_fast.scoring.{module}"), cls)(**kw)
        make.target = (f"tao_fast.scoring.{module}", cls)
        return make

    return {
        "arithmetic": ArithmeticVerifier, "random": RandomScorer,
        "python": lazy("python_fn", "PythonFunctionScorer"),
        "regex": rules.RegexScorer, "exact": rules.ExactScorer, "numeric": rules.NumericScorer,
        "json": rules.JsonScorer, "json_schema": rules.JsonSchemaScorer,
        "length": rules.LengthScorer, "phrases": rules.PhraseScorer,
        "consensus": lazy("consensus", "ConsensusScorer"),
        "code": lazy("code_exec", "CodeExecScorer"), "sql": lazy("sql_exec", "SqlExecScorer"),
        "reward_model": lazy("reward_model", "RewardModelScorer"),
        "judge": lazy("judge", "JudgeScorer"), "mix": lazy("mix", "MixScorer"),
    }


def _signature(make) -> inspect.Signature:
    if hasattr(make, "target"):
        import importlib

        mod, cls = make.target
        make = getattr(importlib.import_module(mod), cls)
    return inspect.signature(make)


# Options every scorer may take from the context when its constructor names them.
_CONTEXT_KEYS = ("seed", "failure_value", "timeout_s", "memory_mb", "base_dir", "policy_engine")


def build_scorer(spec, ctx: ScorerContext | None = None, *, where: str = "scoring.scorer",
                 **ctx_kw) -> Scorer:
    """Scorer from its spec (string shorthand or mapping with `type`); errors name `where`.

    ctx_kw: ScorerContext fields (seed, failure_value, timeout_s, memory_mb, base_dir, ...)."""
    ctx = ctx or ScorerContext(**ctx_kw)
    if isinstance(spec, str):
        if spec.startswith("python:"):
            spec = {"type": "python", "spec": spec}
        else:
            spec = {"type": spec}
    if not isinstance(spec, dict) or not isinstance(spec.get("type"), str):
        raise ConfigError(f"{where}: expected a scorer name or a mapping with a 'type', "
                          f"got {spec!r}")
    factories = _factories()
    kind = spec["type"]
    if kind not in factories:
        raise ConfigError(f"{where}: unknown scorer {kind!r} (known: {sorted(factories)}; "
                          f"a user function is 'python:module:function')")
    make = factories[kind]
    params = _signature(make).parameters
    opts = {k: v for k, v in spec.items() if k != "type"}
    unknown = sorted(set(opts) - set(params))
    if unknown:
        known = sorted(k for k in params if k not in _CONTEXT_KEYS + ("ctx", "where"))
        raise ConfigError(f"{where}: scorer {kind!r} has no option {unknown[0]!r} "
                          f"(options: {known})")
    missing = [k for k, p in params.items() if p.default is inspect.Parameter.empty
               and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
               and k not in opts and k not in _CONTEXT_KEYS + ("ctx", "where")]
    if missing:
        raise ConfigError(f"{where}: scorer {kind!r} needs the option {missing[0]!r}")
    for k in _CONTEXT_KEYS:
        if k in params and k not in opts:
            opts[k] = getattr(ctx, k)
    if "ctx" in params:
        opts["ctx"] = ctx
    if "where" in params:
        opts["where"] = where
    try:
        return make(**opts)
    except ConfigError:
        raise
    except (ValueError, TypeError, FileNotFoundError, ImportError) as e:
        raise ConfigError(f"{where}: {kind}: {e}") from None
