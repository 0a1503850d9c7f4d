"""`tao-fast report RUN_DIR`: one markdown file and PNG plots that show whether TAO worked.

Reads what a run leaves behind (config.yaml, metrics.jsonl, eval_*.json, manifest.jsonl) and
writes RUN_DIR/report.md with RUN_DIR/report/*.png beside it:

    heldout.png     held-out accuracy (95% CI) before, after each round and at the end,
                    greedy and sampled pass@1, with the mean output tokens (inference cost)
    curves.png      mean reward, KL to the reference and zero-signal groups per step
    tasks.png       with a route scorer: each task's mean reward per step (route/<task>/...)
    throughput.png  generation and training tokens/s per step
    time_split.png  where the wall time went: generation, scoring, training, weight sync
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

from tao_fast.config import ConfigError
from tao_fast.fileio import atomic_write_text
from tao_fast.summary import scorer_check_lines, task_lines

PHASES = (("gen_seconds", "generation"), ("score_seconds", "scoring"),
          ("train_seconds", "training"), ("sync_seconds", "weight sync"))


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


METRIC_FIELDS = ("reward_mean", "zero_signal_frac", "gen_tokens_per_s")  # every step's line
EVAL_FIELDS = ("n", "mean_score", "accuracy", "ci_low", "ci_high", "mean_response_tokens")
MANIFEST_FIELDS = ("round", "n_new", "n_replay")  # and new_files, a list
PREFLIGHT_FIELDS = ("prompts", "n")  # and verdict (tao_fast/scoring/check.py)


def read_run(run_dir) -> dict:
    """What the run left: metrics lines, evals by name, config, manifest lines. A file that
    cannot be read is a ConfigError naming it (and the line): not UTF-8, not JSON/YAML, a
    record without a field the report shows. A torn *last* line of metrics.jsonl (no newline:
    the run was killed while writing it) is skipped with a warning."""
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").exists():
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl (not a tao-fast run directory)")
    evals = {f.stem[len("eval_"):]: _record(str(f), _json(_text(f), str(f)), EVAL_FIELDS)
             for f in sorted(run_dir.glob("eval_*.json"))}
    manifest = _jsonl(run_dir / "manifest.jsonl", MANIFEST_FIELDS, lists=("new_files",)) \
        if (run_dir / "manifest.jsonl").exists() else []
    pre = run_dir / "preflight.json"  # the scorer against the labels (eval.preflight)
    return {"dir": run_dir, "metrics": _jsonl(run_dir / "metrics.jsonl", METRIC_FIELDS,
                                              torn_ok=True),
            "evals": evals, "config": _config(run_dir / "config.yaml"), "manifest": manifest,
            "preflight": _record(str(pre), _json(_text(pre), str(pre)), PREFLIGHT_FIELDS)
            if pre.exists() else None}


def _text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"{path}:{line}: not UTF-8") from None


def _json(text: str, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where}: not JSON ({e.msg} at column {e.colno})") from None


def _record(where: str, obj, numbers: tuple[str, ...], lists: tuple[str, ...] = ()) -> dict:
    """obj, checked to be a mapping with a number in each of `numbers`, a list in `lists`."""
    if not isinstance(obj, dict):
        raise ConfigError(f"{where}: expected a JSON object, got a {type(obj).__name__}")
    for k in (*numbers, *lists):
        if k not in obj:
            raise ConfigError(f"{where}: no field {k!r}")
    for k in numbers:
        if isinstance(obj[k], bool) or not isinstance(obj[k], (int, float)):
            raise ConfigError(f"{where}: field {k!r} is {obj[k]!r}, not a number")
    for k in lists:
        if not isinstance(obj[k], list):
            raise ConfigError(f"{where}: field {k!r} is {obj[k]!r}, not a list")
    return obj


def _jsonl(path: Path, numbers: tuple[str, ...], lists: tuple[str, ...] = (),
           torn_ok: bool = False) -> list[dict]:
    """The records of a JSONL file; torn_ok: a last line without its newline that is not JSON
    is skipped with a warning on stderr."""
    lines = _text(path).split("\n")  # a file ending in a newline ends in ""
    out = []  # (where, object): every line's JSON first, then their fields
    for ln, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{ln}"
        if torn_ok and ln == len(lines):  # the last line, and no newline after it
            try:
                json.loads(line)
            except json.JSONDecodeError:
                print(f"tao-fast: warning: {where}: a torn last line (the run was killed while "
                      f"writing it): skipped", file=sys.stderr)
                continue
        out.append((where, _json(line, where)))
    return [_record(where, obj, numbers, lists) for where, obj in out]


def _config(path: Path) -> dict:
    """config.yaml as {section: {key: value}}; {} when the run has none."""
    if not path.exists():
        return {}
    try:
        cfg = yaml.safe_load(_text(path)) or {}
    except yaml.MarkedYAMLError as e:
        line = f":{e.problem_mark.line + 1}" if e.problem_mark else ""
        raise ConfigError(f"{path}{line}: not YAML ({e.problem})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not YAML ({e})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: not a run config (a {type(cfg).__name__}, not sections)")
    for k, v in cfg.items():
        if not isinstance(v, dict):
            raise ConfigError(f"{path}: not a run config ({k!r} is not a section of keys)")
    return cfg


def eval_points(evals: dict) -> list[str]:
    """Eval names in run order: before, round1, round2, ..., after."""
    rounds = sorted((k for k in evals if k.startswith("round") and not k.endswith("_sampled")),
                    key=lambda k: int(k[5:]))
    return [k for k in ["before", *rounds, "after"] if k in evals]


def _pct(e: dict | None) -> str:
    if not e:
        return "-"
    return f"{100 * e['accuracy']:.1f}% ({100 * e['ci_low']:.1f}-{100 * e['ci_high']:.1f})"


def plot_heldout(run: dict, path: Path) -> bool:
    points = eval_points(run["evals"])
    if not points:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.38
    for j, (suffix, label) in enumerate((("", "greedy"), ("_sampled", "sampled pass@1"))):
        es = [run["evals"].get(p + suffix) for p in points]
        xs = [i + (j - 0.5) * width for i, e in enumerate(es) if e]
        if not xs:
            continue
        ys = [100 * e["accuracy"] for e in es if e]
        err = [[100 * (e["accuracy"] - e["ci_low"]) for e in es if e],
               [100 * (e["ci_high"] - e["accuracy"]) for e in es if e]]
        bars = ax.bar(xs, ys, width, yerr=err, capsize=3, label=label)
        for b, e in zip(bars, [e for e in es if e]):  # label above the CI's upper end
            ax.annotate(f"{100 * e['accuracy']:.1f}%\n{e['mean_response_tokens']:.0f} tok",
                        (b.get_x() + b.get_width() / 2, 100 * e["ci_high"]), ha="center",
                        va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(range(len(points)), points)
    ax.set_ylabel("held-out accuracy, % (95% CI)")
    ax.set_ylim(0, 115)
    ax.set_title("Held-out accuracy (label: accuracy, mean output tokens)")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _steps(ms):
    return [m.get("global_step", i + 1) for i, m in enumerate(ms)]


def plot_curves(run: dict, path: Path) -> bool:
    ms = run["metrics"]
    if not ms:
        return False
    plt = _plt()
    xs = _steps(ms)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    r = [m["reward_mean"] for m in ms]
    axes[0].plot(xs, r, marker="o", ms=3, label="mean reward")
    k = max(1, len(r) // 5)
    smooth = [sum(r[max(0, i - k + 1):i + 1]) / len(r[max(0, i - k + 1):i + 1])
              for i in range(len(r))]
    axes[0].plot(xs, smooth, lw=2, label=f"running mean ({k})")
    probe = [(x, m["probe_accuracy"]) for x, m in zip(xs, ms) if "probe_accuracy" in m]
    if probe:  # eval.probe: the label scorer on the same candidates
        axes[0].plot(*zip(*probe), marker="s", ms=3, color="C4", label="labelled probe accuracy")
    axes[0].set_title("reward per step" + (" and the labelled probe" if probe else ""))
    axes[0].legend(fontsize=7)
    kl = [(x, m["kl"]) for x, m in zip(xs, ms) if "kl" in m]
    if kl:
        axes[1].plot(*zip(*kl), marker="o", ms=3, color="C2")
    axes[1].set_title("KL to reference (0 when rl.kl_coef=0)" if kl else "KL: no update steps")
    axes[2].plot(xs, [m["zero_signal_frac"] for m in ms], marker="o", ms=3, color="C3")
    axes[2].set_ylim(-0.05, 1.05)
    axes[2].set_title("groups with no signal (equal rewards)")
    for ax in axes:
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def task_curves(ms: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """{task: [(step, mean reward)]} from the route scorer's route/<task>/reward_mean."""
    out: dict[str, list] = {}
    for x, m in zip(_steps(ms), ms):
        for k, v in m.items():
            if k.startswith("route/") and k.endswith("/reward_mean"):
                out.setdefault(k[len("route/"):-len("/reward_mean")], []).append((x, v))
    return out


def plot_tasks(run: dict, path: Path) -> bool:
    """Each task's mean reward per step; False (nothing drawn) without a route scorer."""
    curves = task_curves(run["metrics"])
    if not curves:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for task, pts in sorted(curves.items()):
        ax.plot(*zip(*pts), marker="o", ms=3, label=task)
    ax.set_xlabel("step")
    ax.set_title("mean reward per step, by task (route scorer)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_throughput(run: dict, path: Path) -> bool:
    ms = run["metrics"]
    if not ms:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.4))
    xs = _steps(ms)
    ax.plot(xs, [m["gen_tokens_per_s"] for m in ms], marker="o", ms=3,
            label="generation (new tokens/s)")
    tr = [(x, m["train_tokens_per_s"]) for x, m in zip(xs, ms) if "train_tokens_per_s" in m]
    if tr:
        ax.plot(*zip(*tr), marker="s", ms=3, label="training (tokens/s, fwd+bwd+step)")
    ax.set_xlabel("step")
    ax.set_ylabel("tokens / s")
    ax.set_ylim(bottom=0)
    ax.set_title("Throughput per phase")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def time_split(ms: list[dict]) -> dict[str, float]:
    split = {label: sum(m.get(k, 0.0) for m in ms) for k, label in PHASES}
    split["other"] = max(0.0, sum(m.get("step_seconds", 0.0) for m in ms) - sum(split.values()))
    return split


def plot_time_split(run: dict, path: Path) -> bool:
    split = time_split(run["metrics"])
    total = sum(split.values())
    if total <= 0:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 2.6))
    left = 0.0
    for i, (label, secs) in enumerate(split.items()):
        ax.barh([0], [secs], left=left, color=f"C{i}", label=f"{label} {100 * secs / total:.0f}%")
        left += secs
    ax.set_yticks([])
    ax.set_xlabel("seconds (sum over steps)")
    ax.set_title(f"Where the step time went ({total / 60:.1f} min in steps)")
    fig.legend(ncol=5, fontsize=7, loc="lower center")
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def heldout_lines(evals: dict) -> list[str]:
    """The held-out table (one row per evaluation), the change, and the per-task table."""
    points = eval_points(evals)
    if not points:
        return []
    lines = ["## Held-out evaluation", "",
             "| when | greedy accuracy (95% CI) | sampled pass@1 (95% CI) | mean score | "
             "output tokens / response |", "| --- | --- | --- | --- | --- |"]
    for p in points:
        e, s = evals[p], evals.get(p + "_sampled")
        lines.append(f"| {p} | {_pct(e)} | {_pct(s)} | {e['mean_score']:.3f} | "
                     f"{e['mean_response_tokens']:.1f} |")
    b, a = evals.get("before"), evals.get("after")
    if b and a:
        lines += ["", f"Change in greedy accuracy: {100 * (a['accuracy'] - b['accuracy']):+.1f}"
                  f" points (n={a['n']}); output tokens per response "
                  f"{b['mean_response_tokens']:.1f} -> {a['mean_response_tokens']:.1f} "
                  f"(same model size: inference cost changes only with length)."]
    lines += task_lines((b or {}).get("by_task"), (a or evals[points[-1]]).get("by_task"))
    return lines + [""]


def render(run: dict, plots: dict[str, bool]) -> str:
    cfg, ms, evals = run["config"], run["metrics"], run["evals"]
    c = {k: cfg.get(k, {}) for k in ("model", "data", "rollout", "rl", "scoring", "run")}
    lines = [f"# TAO report: {run['dir'].name}", "",
             f"- model `{c['model'].get('path', '?')}`, data `{c['data'].get('train', '?')}`, "
             f"scorer `{json.dumps(c['scoring'].get('scorer', '?'))}`",
             f"- {len(ms)} steps x {c['rl'].get('prompts_per_step', '?')} prompts x "
             f"{c['rollout'].get('n', '?')} candidates (temperature "
             f"{c['rollout'].get('temperature', '?')}), algorithm {c['rl'].get('algorithm', '?')},"
             f" lr {c['rl'].get('lr', '?')}", ""]
    lines += heldout_lines(evals)
    if plots.get("heldout"):
        lines += ["![held-out accuracy](report/heldout.png)", ""]
    if ms:
        r = [m["reward_mean"] for m in ms]
        k = max(1, len(r) // 4)
        lines += ["## Training", "",
                  f"- mean reward: first {k} steps {sum(r[:k]) / k:.3f}, last {k} steps "
                  f"{sum(r[-k:]) / k:.3f}",
                  f"- steps skipped (every group equal): {sum('skipped' in m for m in ms)}; "
                  f"mean zero-signal fraction "
                  f"{sum(m['zero_signal_frac'] for m in ms) / len(ms):.2f}"]
        ent = [m["entropy"] for m in ms if "entropy" in m]
        if ent:
            j = max(1, len(ent) // 4)
            lines.append(f"- policy entropy (nats per response token, at the sampling "
                         f"temperature): first {j} steps {sum(ent[:j]) / j:.3f}, last {j} "
                         f"{sum(ent[-j:]) / j:.3f}")
        clips = [m["clip_frac"] for m in ms if m.get("optimizer_steps", 1) > 1]
        if clips:
            lines.append(f"- clipped tokens over the steps with several updates (rl.epochs x "
                         f"rl.minibatches): {100 * sum(clips) / len(clips):.2f}%")
        diffs = [m["sampler_logprob_abs_diff"] for m in ms if "sampler_logprob_abs_diff" in m]
        outs = [m["sampler_ratio_outside"] for m in ms if "sampler_ratio_outside" in m]
        if diffs:
            lines.append(f"- sampler vs learner log-probs: mean |diff| "
                         f"{sum(diffs) / len(diffs):.4f}, tokens with ratio outside "
                         f"[0.8, 1.25]: {100 * sum(outs) / len(outs):.2f}%")
        fails: dict[str, int] = {}
        for m in ms:
            for key, v in m.items():
                if key.startswith("score_failures/"):
                    fails[key.split("/", 1)[1]] = fails.get(key.split("/", 1)[1], 0) + v
        lines.append("- scoring failures: " + (", ".join(f"{k} {v}" for k, v in fails.items())
                                               if fails else "none"))
        lines += scorer_check_lines(ms, run["preflight"])
        stat_keys = sorted({k for m in ms for k in m if "/" in k
                            and not k.startswith("score_failures/")})
        for key in stat_keys:
            vals = [m[key] for m in ms if key in m]
            lines.append(f"- {key}: mean {sum(vals) / len(vals):.3f} over {len(vals)} steps")
        lines.append("")
        for name, title in (("curves", "reward, KL, zero-signal groups"),
                            ("tasks", "reward per task")):
            if plots.get(name):
                lines += [f"![{title}](report/{name}.png)", ""]
        split = time_split(ms)
        total = sum(split.values()) or 1.0
        lines += ["## Where the time went", "", "| phase | seconds | share |",
                  "| --- | --- | --- |"]
        lines += [f"| {k} | {v:.1f} | {100 * v / total:.0f}% |" for k, v in split.items()]
        gen = [m["gen_tokens_per_s"] for m in ms]
        tr = [m["train_tokens_per_s"] for m in ms if "train_tokens_per_s" in m]
        lines += ["", f"Generation {sum(gen) / len(gen):.0f} tokens/s mean"
                  + (f", training {sum(tr) / len(tr):.0f} tokens/s mean." if tr else "."), ""]
        for name, title in (("throughput", "tokens/s per phase"), ("time_split", "time split")):
            if plots.get(name):
                lines += [f"![{title}](report/{name}.png)", ""]
    if run["manifest"]:
        lines += ["## Data per round", "", "| round | new files | new prompts | replayed |",
                  "| --- | --- | --- | --- |"]
        lines += [f"| {m['round']} | {len(m['new_files'])} | {m['n_new']} | {m['n_replay']} |"
                  for m in run["manifest"]]
        lines.append("")
    return "\n".join(lines)


def report(run_dir) -> Path:
    """Write RUN_DIR/report.md and RUN_DIR/report/*.png; returns the markdown path."""
    run = read_run(run_dir)
    out = run["dir"] / "report"
    out.mkdir(exist_ok=True)
    plots = {name: fn(run, out / f"{name}.png") for name, fn in
             (("heldout", plot_heldout), ("curves", plot_curves), ("tasks", plot_tasks),
              ("throughput", plot_throughput), ("time_split", plot_time_split))}
    path = run["dir"] / "report.md"
    atomic_write_text(path, render(run, plots))
    return path
