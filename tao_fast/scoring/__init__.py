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
    {"type": "route", "field": "task", "routes": {"sql": ..., "math": ...}, "default": ...}

Every scorer scores a whole batch at once. A candidate whose scoring fails gets the failure
value and an "error" in its details; `ScoreResult.failures` counts them per scorer name so
the run's metrics can report them. Bad specs raise ConfigError here, before any generation;
`Scorer.check(prompts)` checks what depends on the prompt records, e.g. that every database a
SQL prompt names exists (a no-op for scorers that need nothing of them).

Modules: base (the Scorer protocol, ScoreResult, ScorerContext, score_each, failed_batch),
build (build_scorer and the table of scorer types), control (RandomScorer), extract (answer
extraction, the candidate's JSON), then one module per kind of scorer. They import from base
and from each other, never from this package's `__init__`, which only re-exports.
"""
from tao_fast.scoring.base import ScoreResult, Scorer, ScorerContext, failed_batch, score_each
from tao_fast.scoring.build import build_scorer
from tao_fast.scoring.control import RandomScorer

__all__ = ["RandomScorer", "ScoreResult", "Scorer", "ScorerContext", "build_scorer",
           "failed_batch", "score_each"]
