"""`build_scorer(spec)`: a scorer from its config value, with the errors naming the config key.

The table below names each scorer type's module and class; a module is imported when a spec
asks for its type, so building a rule scorer never imports torch, sqlglot or transformers.
"""
from __future__ import annotations

import importlib
import inspect

from tao_fast.config import ConfigError
from tao_fast.scoring.base import Scorer, ScorerContext

# spec type -> (module under tao_fast.scoring, class)
SCORER_TYPES: dict[str, tuple[str, str]] = {
    "arithmetic": ("arithmetic", "ArithmeticVerifier"), "random": ("control", "RandomScorer"),
    "python": ("python_fn", "PythonFunctionScorer"),
    "regex": ("rules", "RegexScorer"), "exact": ("rules", "ExactScorer"),
    "numeric": ("rules", "NumericScorer"), "json": ("rules", "JsonScorer"),
    "json_schema": ("rules", "JsonSchemaScorer"), "length": ("rules", "LengthScorer"),
    "phrases": ("rules", "PhraseScorer"),
    "consensus": ("consensus", "ConsensusScorer"),
    "code": ("code_exec", "CodeExecScorer"), "sql": ("sql_exec", "SqlExecScorer"),
    "reward_model": ("reward_model", "RewardModelScorer"),
    "judge": ("judge", "JudgeScorer"), "mix": ("mix", "MixScorer"),
    "route": ("route", "RouteScorer"),
}

# Options every scorer may take from the context when its constructor names them.
_CONTEXT_KEYS = ("seed", "failure_value", "timeout_s", "memory_mb", "base_dir", "policy_engine")
# Filled in by build_scorer itself, never by the spec.
_BUILDER_KEYS = ("ctx", "where")


def scorer_class(kind: str) -> type:
    """The class of spec type `kind` (imports its module)."""
    module, cls = SCORER_TYPES[kind]
    return getattr(importlib.import_module(f"tao_fast.scoring.{module}"), cls)


def _as_mapping(spec, where: str) -> dict:
    if isinstance(spec, str):
        spec = {"type": "python", "spec": spec} if spec.startswith("python:") else {"type": spec}
    if not isinstance(spec, dict) or not isinstance(spec.get("type"), str):
        raise ConfigError(f"{where}: expected a scorer name or a mapping with a 'type', "
                          f"got {spec!r}")
    if spec["type"] not in SCORER_TYPES:
        raise ConfigError(f"{where}: unknown scorer {spec['type']!r} (known: "
                          f"{sorted(SCORER_TYPES)}; a user function is 'python:module:function')")
    return spec


def _options(kind: str, params, spec: dict, ctx: ScorerContext, where: str) -> dict:
    """The constructor's keyword arguments: the spec's options, checked against the
    constructor's parameters, then the context's fields it names."""
    opts = {k: v for k, v in spec.items() if k != "type"}
    own = _CONTEXT_KEYS + _BUILDER_KEYS
    unknown = sorted(set(opts) - set(params))
    if unknown:
        known = sorted(k for k in params if k not in own)
        raise ConfigError(f"{where}: scorer {kind!r} has no option {unknown[0]!r} "
                          f"(options: {known})")
    missing = [k for k, p in params.items() if p.default is inspect.Parameter.empty
               and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
               and k not in opts and k not in own]
    if missing:
        raise ConfigError(f"{where}: scorer {kind!r} needs the option {missing[0]!r}")
    for k in _CONTEXT_KEYS:
        if k in params and k not in opts:
            opts[k] = getattr(ctx, k)
    if "ctx" in params:
        opts["ctx"] = ctx
    if "where" in params:
        opts["where"] = where
    return opts


def build_scorer(spec, ctx: ScorerContext | None = None, *, where: str = "scoring.scorer",
                 **ctx_kw) -> Scorer:
    """Scorer from its spec (string shorthand or mapping with `type`); errors name `where`.

    ctx_kw: ScorerContext fields (seed, failure_value, timeout_s, memory_mb, base_dir, ...)."""
    ctx = ctx or ScorerContext(**ctx_kw)
    spec = _as_mapping(spec, where)
    kind = spec["type"]
    make = scorer_class(kind)
    # named parameters only: a scorer without its own __init__ shows the Scorer protocol's
    # (*args, **kwargs), which takes no option
    params = {k: p for k, p in inspect.signature(make).parameters.items()
              if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    opts = _options(kind, params, spec, ctx, where)
    try:
        return make(**opts)
    except ConfigError:
        raise
    except (ValueError, TypeError, FileNotFoundError, ImportError) as e:
        raise ConfigError(f"{where}: {kind}: {e}") from None
