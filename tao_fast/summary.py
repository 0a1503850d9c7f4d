"""A finished run's summary.json and summary.md (the report, tao_fast/report.py, goes further)."""
from __future__ import annotations

import json

from tao_fast.config import TaoConfig
from tao_fast.fileio import atomic_write_text
from tao_fast.scoring.check import probe_divergence


def sparkline(values: list[float]) -> str:
    bars = "▁▂▃▄▅▆▇█"
    if not values:
        return ""
    lo, hi = min(values), max(values)
    return "".join(bars[0 if hi == lo else int((v - lo) / (hi - lo) * 7)] for v in values)


def _eval_fields(res) -> dict | None:
    if res is None:
        return None
    return {k: getattr(res, k) for k in ("n", "accuracy", "ci_low", "ci_high", "mean_score",
                                         "mean_response_tokens", "by_task")}


def task_lines(before: dict | None, after: dict | None) -> list[str]:
    """The per-task table of a run's held-out results (EvalResult.by_task before and after)
    and its worst task's change: what tuning on a mix cost the task it helped least. [] when
    no record names a task."""
    before, after = before or {}, after or {}
    tasks = sorted(set(before) | set(after))
    if not tasks:
        return []

    def cell(f):
        return "" if f is None else (f"{100 * f['accuracy']:.1f}% ({100 * f['ci_low']:.1f}-"
                                     f"{100 * f['ci_high']:.1f}), score {f['mean_score']:.3f}")

    lines = ["", "| task | n | held-out before (95% CI) | after (95% CI) | change | "
             "tokens/answer after |", "| --- | --- | --- | --- | --- | --- |"]
    changes = {}
    for t in tasks:
        b, a = before.get(t), after.get(t)
        if a and b:
            changes[t] = 100 * (a["accuracy"] - b["accuracy"])
        lines.append(f"| {t} | {(a or b)['n']} | {cell(b)} | {cell(a)} | "
                     + (f"{changes[t]:+.1f} points" if t in changes else "") + " | "
                     + (f"{a['mean_response_tokens']:.1f}" if a else "") + " |")
    if changes:
        worst = min(changes, key=changes.get)
        lines += ["", f"- worst task: {worst} ({changes[worst]:+.1f} points)"]
    return lines


def scorer_check_lines(metrics: list[dict], preflight: dict | None) -> list[str]:
    """What the run says of its scorer against the labels (tao_fast/scoring/check.py): the
    pre-flight's verdict (preflight.json), the labelled probe's first and last steps, and the
    flag when the reward rose while the probe did not (probe_divergence). [] when neither."""
    lines = []
    if preflight:
        lines.append(f"- pre-flight ({preflight['prompts']} held-out prompts x "
                     f"{preflight['n']} candidates): {preflight.get('verdict', '(no verdict)')}")
    probe = [m["probe_accuracy"] for m in metrics if "probe_accuracy" in m]
    if probe:
        k = max(1, len(probe) // 3)
        lines.append(f"- labelled probe (eval.scorer on the training candidates): first {k} "
                     f"steps {100 * sum(probe[:k]) / k:.1f}%, last {k} "
                     f"{100 * sum(probe[-k:]) / k:.1f}%")
    flag = probe_divergence(metrics)
    if flag:
        lines.append(f"- **warning**: {flag}")
    return lines


def write_summary(res, cfg: TaoConfig) -> str:
    """Write res.run_dir/summary.json and summary.md for a TuneResult; returns the markdown."""
    curve = [m["reward_mean"] for m in res.metrics]
    summary = {
        "wall_seconds": res.wall_seconds, "checkpoint": str(res.checkpoint or ""),
        "scorer": cfg.scoring.scorer, "steps": len(res.metrics), "reward_curve": curve,
        "before": _eval_fields(res.eval_before),
        "after": _eval_fields(res.eval_after),
        "probe_flag": probe_divergence(res.metrics),  # tao_fast/scoring/check.py
    }
    atomic_write_text(res.run_dir / "summary.json", json.dumps(summary, indent=1))
    lines = [f"# tao-fast run: {res.run_dir}", "",
             f"- scorer: `{cfg.scoring.scorer}`; {len(res.metrics)} steps x "
             f"{cfg.rl.prompts_per_step} prompts x {cfg.rollout.n} candidates; "
             f"wall time {res.wall_seconds / 60:.1f} min",
             f"- reward curve (mean reward per step): {sparkline(curve)} "
             f"({curve[0]:.3f} -> {curve[-1]:.3f})" if curve else "- no training steps"]
    if res.eval_before is not None:
        lines.append(f"- held-out before: {res.eval_before.summary()}")
    if res.eval_after is not None:
        lines.append(f"- held-out after:  {res.eval_after.summary()}")
    if res.eval_before is not None and res.eval_after is not None:
        gain = 100 * (res.eval_after.accuracy - res.eval_before.accuracy)
        lines.append(f"- change: {gain:+.1f} points")
    pre = res.run_dir / "preflight.json"
    lines += scorer_check_lines(res.metrics, json.loads(pre.read_text()) if pre.exists() else None)
    lines += task_lines(res.eval_before and res.eval_before.by_task,
                        res.eval_after and res.eval_after.by_task)
    text = "\n".join(lines) + "\n"
    atomic_write_text(res.run_dir / "summary.md", text)
    return text
