"""Is the scorer right? A scorer measured against labels, before compute is spent on it.

A label-free scorer can reward the wrong thing: consensus on a task the model gets right 8%
of the time raised its own reward 0.30 -> 0.48 while held-out accuracy fell 8.0% -> 6.5% (the
model learned to agree with itself). What tuning on a scorer does is bounded by how often the
candidate it scores highest is right, against one sample's accuracy. This module measures that
on a small labelled sample: N candidates per prompt, each scored by the scorer under test and
by a label scorer (eval.scorer: a verifier, or `exact` against a record field).

Statistics (pure functions of rewards [P][N] and labels [P][N], tested by hand):

    correct_mask      label reward >= 1 is correct (eval.py's accuracy rule)
    auc               P(reward of a correct candidate > an incorrect one's), ties count half;
                      None when every label is equal
    agreement         the reward thresholded at its midpoint vs correct/incorrect
    pick_accuracy     accuracy of each group's top-scored candidate (the scorer's pick; for
                      consensus the majority's answer; ties: a uniform pick among the top)
    sample_accuracy   one sample's accuracy (pass@1);  oracle_accuracy: any candidate correct
    measure, verdict  all of them with 95% Wilson intervals, and the one-line verdict
    probe_divergence  the report's flag: the reward rose while the labelled probe did not

Runners (an engine and scorers given): `check_scorer` (used by `tao-fast check-scorer` and by
the recipe's pre-flight, eval.preflight), `probe_accuracy` (the recipe's per-step probe).
"""
from __future__ import annotations

import dataclasses
import json
import time
from bisect import bisect_left, bisect_right
from pathlib import Path
from typing import Sequence

# the verdict's margin: a pick within this many accuracy points of one sample is "no better"
MARGIN = 0.02
# AUC at or below this tells correct from incorrect no better than chance
CHANCE_AUC = 0.55
# probe_divergence: the reward must rise by more than this (first third -> last third)
MIN_REWARD_RISE = 0.05


# ------------------------------------------------------------------ statistics (pure)
def correct_mask(label_rewards: Sequence[Sequence[float]]) -> list[list[bool]]:
    """Which candidates the labels count correct: label reward >= 1.0, the rule of the held-out
    accuracy (tao_fast/eval.py). [P][N] -> [P][N]."""
    return [[x >= 1.0 for x in g] for g in label_rewards]


def auc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """Area under the ROC curve of `scores` for telling labels True from False: over every
    (correct, incorrect) pair, 1 when the correct one scores higher, 0.5 on a tie, 0 below,
    averaged (the Mann-Whitney U statistic / pairs). None when every label is equal (no pair:
    undefined). 0.5 is chance; a constant score gives 0.5."""
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    if not pos or not neg:
        return None
    # rank-based, O(n log n): each positive's count of negatives below it plus half the ties
    ranked = sorted(neg)
    wins = sum(bisect_left(ranked, s) + 0.5 * (bisect_right(ranked, s) - bisect_left(ranked, s))
               for s in pos)
    return wins / (len(pos) * len(neg))


def midpoint(scores: Sequence[float]) -> float:
    """The middle of the rewards' observed range, (min + max) / 2: 0.5 for a 0/1 scorer."""
    return (min(scores) + max(scores)) / 2


def agreement(scores: Sequence[float], labels: Sequence[bool],
              threshold: float | None = None) -> float:
    """Share of candidates where the scorer's verdict (reward > threshold; default the
    midpoint of its rewards) equals the label's. Rewards all equal: every verdict is
    "incorrect", so agreement is the share labelled incorrect."""
    t = midpoint(scores) if threshold is None else threshold
    pairs = list(zip(scores, labels, strict=True))
    return sum((s > t) == y for s, y in pairs) / len(pairs)


def pick_correct(group_scores: Sequence[float], group_correct: Sequence[bool]) -> float:
    """Chance that the group's top-scored candidate is correct: the share correct among the
    candidates tied at the top score (a uniform pick among them). For consensus every
    majority candidate gives the same answer, so this is the majority answer's correctness;
    with no majority (all equal) it is the group's one-sample accuracy."""
    top = max(group_scores)
    tied = [c for s, c in zip(group_scores, group_correct, strict=True) if s == top]
    return sum(tied) / len(tied)


def pick_accuracy(rewards: Sequence[Sequence[float]],
                  correct: Sequence[Sequence[bool]]) -> float:
    """Mean over prompts of pick_correct: the accuracy of the scorer's pick (best-of-N)."""
    return sum(pick_correct(r, c) for r, c in zip(rewards, correct, strict=True)) / len(rewards)


def sample_accuracy(correct: Sequence[Sequence[bool]]) -> float:
    """One sample's accuracy: mean over prompts of the share of its candidates correct."""
    return sum(sum(g) / len(g) for g in correct) / len(correct)


def oracle_accuracy(correct: Sequence[Sequence[bool]]) -> float:
    """Share of prompts with any correct candidate: the best any selector could do."""
    return sum(any(g) for g in correct) / len(correct)


def _with_ci(acc: float, n: int) -> dict:
    """accuracy with its 95% Wilson interval over n prompts (as the held-out evaluation)."""
    from tao_fast.eval import wilson_interval

    lo, hi = wilson_interval(round(acc * n), n)
    return {"accuracy": acc, "ci_low": lo, "ci_high": hi}


def measure(rewards: Sequence[Sequence[float]], label_rewards: Sequence[Sequence[float]]) -> dict:
    """The scorer's rewards [P][N] against the label scorer's [P][N]: auc, agreement (at the
    midpoint threshold), the accuracy of one sample, of the scorer's pick and of the oracle
    (each with a 95% Wilson interval over the P prompts), the share correct and the verdict
    (status: harmful | weak | useful | undefined, and its line)."""
    if not rewards or any(len(r) != len(y) for r, y in zip(rewards, label_rewards, strict=True)):
        raise ValueError("measure: rewards and labels must both be [P][N], P >= 1")
    correct = correct_mask(label_rewards)
    flat_r = [x for g in rewards for x in g]
    flat_y = [x for g in correct for x in g]
    n = len(rewards)
    m = {"prompts": n, "candidates": len(flat_r), "labelled_correct": sum(flat_y) / len(flat_y),
         "auc": auc(flat_r, flat_y), "threshold": midpoint(flat_r),
         "agreement": agreement(flat_r, flat_y),
         "one_sample": _with_ci(sample_accuracy(correct), n),
         "scorer_pick": _with_ci(pick_accuracy(rewards, correct), n),
         "oracle": _with_ci(oracle_accuracy(correct), n)}
    m["status"], m["verdict"] = verdict(m)
    return m


def verdict(m: dict) -> tuple[str, str]:
    """(status, one line) from measure's figures. The rule: labels all equal -> undefined;
    the pick's accuracy below one sample's by more than MARGIN -> harmful; within MARGIN, or
    AUC <= CHANCE_AUC -> weak; else useful. The line adds when the intervals overlap."""
    one, pick = m["one_sample"]["accuracy"], m["scorer_pick"]["accuracy"]
    figures = (f"pick {100 * pick:.1f}% vs one sample {100 * one:.1f}% "
               f"(oracle {100 * m['oracle']['accuracy']:.1f}%)")
    if m["auc"] is None and m["labelled_correct"] == 0.0:
        return "undefined", ("no candidate is labelled correct (oracle 0%): there is no right "
                             "answer among the samples for any scorer to reinforce, and a "
                             "label-free one would reward something else; AUC is undefined "
                             "(more candidates, more tokens or a higher temperature may find "
                             "some)")
    if m["auc"] is None:
        return "undefined", ("every candidate is labelled correct: AUC is undefined and the "
                             "scorer cannot be judged here (harder prompts)")
    overlap = (m["scorer_pick"]["ci_low"] <= m["one_sample"]["ci_high"]
               and m["one_sample"]["ci_low"] <= m["scorer_pick"]["ci_high"])
    caveat = (f"; the 95% intervals overlap at n={m['prompts']} prompts (more with --limit)"
              if overlap else "")
    if pick < one - MARGIN:
        return "harmful", (f"the scorer's pick is less accurate than one sample ({figures}, "
                           f"AUC {m['auc']:.2f}): tuning on it is likely to lower "
                           f"accuracy{caveat}")
    if pick <= one + MARGIN or m["auc"] <= CHANCE_AUC:
        return "weak", (f"the scorer's pick is no better than one sample ({figures}, AUC "
                        f"{m['auc']:.2f}): tuning on it is unlikely to raise accuracy{caveat}")
    return "useful", (f"the scorer's pick beats one sample ({figures}, AUC {m['auc']:.2f}): "
                      f"it can guide tuning{caveat}")


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def probe_divergence(metrics: Sequence[dict], min_rise: float = MIN_REWARD_RISE) -> str | None:
    """The flag "reward rising while the labelled probe is flat or falling", or None.

    Over the steps whose line carries probe_accuracy (at least 3), the means of the first and
    the last third (k = steps // 3) of reward_mean and of probe_accuracy are compared: flagged
    when the reward rose by more than `min_rise` and the probe changed by <= 0."""
    ms = [m for m in metrics if "probe_accuracy" in m]
    k = len(ms) // 3
    if k < 1:
        return None
    r0, r1 = _mean([m["reward_mean"] for m in ms[:k]]), _mean([m["reward_mean"] for m in ms[-k:]])
    p0 = _mean([m["probe_accuracy"] for m in ms[:k]])
    p1 = _mean([m["probe_accuracy"] for m in ms[-k:]])
    if r1 - r0 > min_rise and p1 - p0 <= 0:
        return (f"reward rising while the labelled probe is flat or falling: reward {r0:.3f} -> "
                f"{r1:.3f}, probe accuracy {100 * p0:.1f}% -> {100 * p1:.1f}% (means of the "
                f"first and last {k} of {len(ms)} steps): the scorer may reward the wrong thing "
                f"(measure it: tao-fast check-scorer)")
    return None


# ------------------------------------------------------------------ runners
def separate_label_scorer(cfg) -> bool:
    """Whether the run names a label scorer of its own: eval.scorer set and not
    scoring.scorer (the pre-flight and the probe apply only then)."""
    return bool(cfg.eval.scorer) and cfg.eval.scorer != cfg.scoring.scorer


def probe_accuracy(label_scorer, records, texts) -> float | None:
    """The labelled probe of one step: the share of the step's candidates (texts [P][N] of
    `records`) that `label_scorer` counts correct (>= 1), over the candidates it could score
    (a failed one, with an "error" in its details, is left out); None when it failed on all."""
    res = label_scorer.score(list(records), texts)
    scored = [x >= 1.0 for p, g in enumerate(res.rewards) for j, x in enumerate(g)
              if not (res.details and "error" in res.details[p][j])]
    return sum(scored) / len(scored) if scored else None


def encode_variants(records, tokenizer, cfg, fewshot, max_context: int) -> list:
    """The records' prompts as a training step generates them: PromptVariants with one id
    list per rollout.strategy (each checked to leave room for rollout.max_tokens)."""
    from tao_fast.data.prompts import encode_prompt
    from tao_fast.rollout import check_records_fit
    from tao_fast.rollout.strategies import PromptVariants

    ro = cfg.rollout
    by_strategy = []
    for s in ro.strategies:
        ids = [encode_prompt(r, tokenizer, s, cfg.data.system_prompt, fewshot) for r in records]
        check_records_fit(records, ids, ro.max_tokens, max_context, "rollout.max_tokens")
        by_strategy.append(ids)
    return [PromptVariants([ids[i] for ids in by_strategy], by_strategy[0][i])
            for i in range(len(records))]


def check_records(scorer, label_scorer, records) -> None:
    """Both scorers' check() of the records (e.g. every SQL prompt's database), a ConfigError
    naming the scorer's key."""
    from tao_fast.config import ConfigError

    for s, where in ((scorer, "scoring.scorer"), (label_scorer, "eval.scorer")):
        try:
            s.check(records)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None


def check_scorer(engine, tokenizer, records, scorer, label_scorer, cfg, *, n: int | None = None,
                 fewshot=(), progress: bool = False) -> dict:
    """Measure `scorer` against `label_scorer` on `records`: n candidates per prompt (default
    rollout.n) sampled as a training step samples them (rollout.strategy, temperature,
    max_tokens; seeded by run.seed, apart from every step's seed) with the run's engine, each
    scored by both. -> measure()'s figures, the settings, seconds and every candidate."""
    from tao_fast.rollout import SamplingParams
    from tao_fast.rollout.strategies import generate_candidates

    t0 = time.perf_counter()
    n = n or cfg.rollout.n
    check_records(scorer, label_scorer, records)
    variants = encode_variants(records, tokenizer, cfg, fewshot, engine.max_context)
    sampling = dataclasses.replace(
        SamplingParams.from_config(cfg.rollout, seed=cfg.run.seed * 1_000_003), n=n)
    ro, scores, _, _ = generate_candidates(engine, scorer, variants, records, sampling,
                                           cfg.rollout.strategies, progress=progress)
    labels = label_scorer.score(list(records), ro.texts)
    out = {"scorer": cfg.scoring.scorer, "label_scorer": cfg.eval.scorer, "n": n,
           "temperature": cfg.rollout.temperature, "max_tokens": cfg.rollout.max_tokens,
           **measure(scores.rewards, labels.rewards)}
    out["seconds"] = time.perf_counter() - t0
    out["records"] = [{"prompt": r.text, "candidates": t, "rewards": s, "labels": y}
                      for r, t, s, y in zip(records, ro.texts, scores.rewards, labels.rewards)]
    return out


def labelled_prompts(cfg, prompts: str | None, limit: int) -> list:
    """The check's first `limit` prompts: `prompts` (a JSONL file, or builtin:NAME: that
    task's held-out split), else the run's held-out prompts (data.eval, else the builtin
    task's held-out split, as tune evaluates on)."""
    from tao_fast.config import ConfigError
    from tao_fast.data import read_jsonl
    from tao_fast.data.sources import load_prompts

    if prompts and prompts.startswith("builtin:"):
        data = dataclasses.replace(cfg.data, train=prompts, eval="", n_eval=limit)
        recs, where = load_prompts(data, cfg.run.seed)[1], prompts
    elif prompts:
        recs, where = read_jsonl(prompts), prompts
    else:
        recs, where = load_prompts(cfg.data, cfg.run.seed)[1], "the run's held-out set"
    if not recs:
        raise ConfigError(f"check-scorer: no prompts in {where}: give --prompts FILE (JSONL "
                          f"of labelled prompts) or set data.eval")
    return recs[:limit]


def run_check(cfg, prompts: str | None = None, n: int | None = None, limit: int = 64,
              progress: bool = True) -> dict:
    """`tao-fast check-scorer`: scoring.scorer against eval.scorer on `limit` labelled
    prompts (labelled_prompts), n candidates each (default rollout.n), sampled by the run's
    model and engine (load_model, build_engine) as a training step samples. -> check_scorer's
    result."""
    from tao_fast.config import ConfigError
    from tao_fast.data.prompts import read_fewshot
    from tao_fast.models import load_model
    from tao_fast.rollout import build_engine
    from tao_fast.scoring.base import ScorerContext
    from tao_fast.scoring.build import build_scorer

    if not cfg.eval.scorer:
        raise ConfigError("eval.scorer: check-scorer measures scoring.scorer against this label "
                          "scorer; set it, e.g. eval.scorer=arithmetic or "
                          "'eval.scorer={type: exact, answer_field: answer}'")
    if limit < 1 or (n is not None and n < 1):
        raise ConfigError(f"check-scorer: --limit and --n must be >= 1, got {limit} and {n}")
    sc, live = cfg.scoring, {}
    ctx = ScorerContext(seed=cfg.run.seed, failure_value=sc.failure_value,
                        timeout_s=sc.timeout_s, memory_mb=sc.memory_mb, base_dir=Path.cwd(),
                        policy_engine=lambda: (live["engine"], live["tokenizer"]))
    scorer = build_scorer(sc.scorer, ctx, where="scoring.scorer")
    label_scorer = build_scorer(cfg.eval.scorer, ctx, where="eval.scorer")
    records = labelled_prompts(cfg, prompts, limit)
    check_records(scorer, label_scorer, records)  # before the model loads
    fewshot = read_fewshot(cfg.rollout.fewshot_file)
    model, tokenizer, model_dir = load_model(cfg.model)
    engine = build_engine(cfg.rollout, model.requires_grad_(False), tokenizer,
                          model_dir=model_dir, seed=cfg.run.seed)
    live.update(engine=engine, tokenizer=tokenizer)
    try:
        return check_scorer(engine, tokenizer, records, scorer, label_scorer, cfg, n=n,
                            fewshot=fewshot, progress=progress)
    finally:
        engine.close()


def table(m: dict) -> str:
    """check_scorer's figures as a short table and the verdict line."""
    def row(name, key):
        e = m[key]
        return (f"| {name} | {100 * e['accuracy']:.1f}% ({100 * e['ci_low']:.1f}-"
                f"{100 * e['ci_high']:.1f}) |")

    a = "undefined (every label equal)" if m["auc"] is None else f"{m['auc']:.3f}"
    return "\n".join([
        f"scorer {json.dumps(m['scorer'])} against labels {json.dumps(m['label_scorer'])}: "
        f"{m['prompts']} prompts x {m['n']} candidates at T={m['temperature']:g}, "
        f"{100 * m['labelled_correct']:.1f}% labelled correct",
        "", "| | accuracy (95% CI) |", "| --- | --- |",
        row("one sample", "one_sample"), row("scorer's pick", "scorer_pick"),
        row("oracle (any correct)", "oracle"), "",
        f"AUC {a}; agreement {100 * m['agreement']:.1f}% (reward > {m['threshold']:.3g} "
        f"vs label); {m['seconds']:.0f} s", "", f"verdict: {m['verdict']}"])


def write_check(path, m: dict) -> Path:
    """check_scorer's result as JSON at `path` (a directory: path/check_scorer.json)."""
    from tao_fast.fileio import atomic_write_text

    path = Path(path)
    if path.is_dir():
        path = path / "check_scorer.json"
    atomic_write_text(path, json.dumps(m, indent=1))
    return path
