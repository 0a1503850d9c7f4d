"""`tao-fast` command line: demo | tune | eval | check-scorer | report | scale | profile | bench |
ingest | serve."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from tao_fast.config import ConfigError, ResumeError, TaoConfig

# The demo's settings for 2 CPU cores and a 15-minute budget (see README for the measured run).
DEMO = {
    "model.path": "embedded:smollm2-135m-instruct",
    "data.train": "builtin:arithmetic",
    "data.n_eval": 200,
    "rollout.n": 8,
    # 0.7 rather than 1.0: at 1.0 one sample is right ~3% of the time and 6-7 of 8 groups
    # carry no signal; at 0.7 about half do (measured in the first demo runs).
    "rollout.temperature": 0.7,
    "rollout.max_tokens": 32,
    "eval.max_tokens": 32,
    "eval.scorer": "arithmetic",  # held-out accuracy is the verifier's, whatever trains
    "rl.prompts_per_step": 8,
    "rl.lr": 2e-5,
    "run.steps": 15,
    "run.output_dir": "runs/demo",
}



def multitask_demo() -> dict:
    """The multi-task demo's settings: the demo's, on three builtin tasks at once, each trained
    and judged by its own scorer (tao_fast/data/tasks.py: a verifier, a format gate with
    content rules, a label-free vote), each a third of every step's prompts and 64 of the 192
    held-out ones."""
    from tao_fast.data.tasks import SCORERS

    def route(role):
        return {"type": "route", "field": "task",
                "routes": {task: s[role] for task, s in SCORERS.items()}}

    return {**DEMO, "data.train": [
        {"source": f"builtin:{task}", "n_train": n, "n_eval": 64}
        for task, n in (("arithmetic", 512), ("json", 512), ("multiply", 80))],
        "scoring.scorer": route("train"), "eval.scorer": route("eval"),
        "rollout.max_tokens": 48, "eval.max_tokens": 48,  # a JSON answer is ~30 tokens
        "rl.prompts_per_step": 9, "run.output_dir": "runs/demo-multitask"}


EPILOG = """examples:
  tao-fast demo                                  # tune the embedded model on arithmetic
  tao-fast demo --task multitask                 # three tasks at once, each its own scorer
  tao-fast demo --scorer random                  # the control: no gain expected
  tao-fast tune --config tune.yaml rl.lr=1e-5 rollout.n=16
  tao-fast eval --model runs/demo/checkpoint-round1 --prompts builtin:arithmetic
  tao-fast check-scorer scoring.scorer=consensus eval.scorer=arithmetic   # before tuning on it
"""


def _overrides_help():
    return ("section.key=value overrides, e.g. rl.lr=1e-5 rollout.n=16 run.steps=50 "
            "(sections: model, data, rollout, scoring, rl, eval, run)")


# what a demo run leaves in its directory: removed when the demo starts over there
DEMO_OUTPUTS = ("state", "manifest.jsonl", "metrics.jsonl", "checkpoint-round*", "eval_*.json",
                "summary.json", "summary.md", "report.md", "report", "preflight.json")


def _start_demo_over(cfg) -> None:
    """The demo always starts afresh: an earlier demo's outputs in its directory go. A
    directory holding another run (its config.yaml is not a demo's) is refused, untouched."""
    import shutil

    from tao_fast.config import load_config
    from tao_fast.tuning import holds_run

    d = Path(cfg.run.output_dir)
    if not holds_run(d):
        return
    try:
        old = load_config(d / "config.yaml")
        is_demo = (old.data.train, old.model.path) == (cfg.data.train, cfg.model.path)
    except (ConfigError, OSError):
        is_demo = False
    if not is_demo:
        raise ConfigError(f"--out {d}: holds a run that is not this demo's (see its "
                          f"config.yaml); choose another --out")
    print(f"tao-fast: starting the demo over in {d}", file=sys.stderr)
    for pattern in DEMO_OUTPUTS:
        for f in d.glob(pattern):
            shutil.rmtree(f) if f.is_dir() else f.unlink()


def cmd_demo(args) -> int:
    from tao_fast.config import load_config
    from tao_fast.tuning import tune

    if args.task == "multitask":
        if args.scorer != "arithmetic":
            raise ConfigError("demo --task multitask: its scorers are its tasks' own; "
                              "--scorer is for the arithmetic demo")
        base = multitask_demo()
    else:
        base = dict(DEMO, **{"scoring.scorer": args.scorer})
    if args.scorer != "arithmetic":
        base["run.output_dir"] = f"runs/demo-{args.scorer}"
    if args.out:
        base["run.output_dir"] = args.out
    if args.steps is not None:
        base["run.steps"] = args.steps
    cfg = load_config(None, args.overrides, base=base)  # a bad override fails here, first
    _start_demo_over(cfg)
    res = tune(cfg)
    _write_report(res.run_dir)
    if res.eval_before and res.eval_after:
        gain = 100 * (res.eval_after.accuracy - res.eval_before.accuracy)
        print(f"held-out greedy accuracy: {100 * res.eval_before.accuracy:.1f}% -> "
              f"{100 * res.eval_after.accuracy:.1f}% ({gain:+.1f} points, n={res.eval_after.n}); "
              f"wall time {res.wall_seconds / 60:.1f} min; run dir {res.run_dir}")
        for line in task_changes(res.eval_before.by_task, res.eval_after.by_task):
            print(line)
    return 0


def task_changes(before: dict, after: dict) -> list[str]:
    """Per task, held-out accuracy before -> after with 95% CIs, then the worst task's change
    and whether it lost accuracy beyond its interval (after's upper bound below before). []
    without tasks."""
    tasks = sorted(set(before) & set(after))
    if not tasks:
        return []

    def pct(e):
        return (f"{100 * e['accuracy']:.1f}% ({100 * e['ci_low']:.1f}-"
                f"{100 * e['ci_high']:.1f})")

    lines = [f"  {t}: {pct(before[t])} -> {pct(after[t])} "
             f"({100 * (after[t]['accuracy'] - before[t]['accuracy']):+.1f} points, "
             f"n={after[t]['n']})" for t in tasks]
    worst = min(tasks, key=lambda t: after[t]["accuracy"] - before[t]["accuracy"])
    change = 100 * (after[worst]["accuracy"] - before[worst]["accuracy"])
    lost = after[worst]["ci_high"] < before[worst]["accuracy"]
    lines.append(f"worst task: {worst} ({change:+.1f} points): " + (
        "LOST accuracy beyond its 95% interval" if lost else
        "no task lost accuracy beyond its 95% interval"))
    return lines


def cmd_tune(args) -> int:
    from tao_fast.tuning import tune

    if bool(args.config) == bool(args.resume):
        raise ConfigError("tune: give --config FILE for a new run or --resume RUN_DIR")
    overrides = [*args.overrides, *([f"data.follow={args.follow}"] if args.follow else [])]
    res = tune(args.config, overrides, resume=args.resume)
    from tao_fast.rl import distributed

    if res.stopped:  # SIGTERM / SIGINT: the recipe logged where it stopped; a clean exit
        print(json.dumps({"run_dir": str(res.run_dir), "checkpoint": str(res.checkpoint),
                          "stopped": res.stopped}))
        distributed.shutdown()
        return 0

    if not distributed.is_main():  # under torchrun rank 0 reports
        distributed.shutdown()
        return 0
    _write_report(res.run_dir)
    if res.scoring_always_failed:
        print(f"tao-fast: error: every candidate's scoring failed in every step: nothing was "
              f"learned (the errors: {res.run_dir / 'metrics.jsonl'}, and each eval file's "
              f"details)", file=sys.stderr)
        distributed.shutdown()
        return 1
    print(json.dumps({"run_dir": str(res.run_dir), "checkpoint": str(res.checkpoint),
                      "before": res.eval_before and res.eval_before.accuracy,
                      "after": res.eval_after and res.eval_after.accuracy,
                      "wall_seconds": round(res.wall_seconds, 1)}))
    distributed.shutdown()
    return 0


def _spec(text: str):
    """A scorer spec from the command line: a name, python:..., or a YAML/JSON mapping."""
    if text.strip().startswith("{"):
        import yaml

        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"--scorer {text!r}: not a valid mapping: {e}") from None
    return text


# tao-fast eval's flags -> the config keys they set (a flag left out keeps the config's value)
EVAL_FLAGS = {"model": "model.path", "max_tokens": "eval.max_tokens",
              "temperature": "rollout.temperature", "samples": "eval.samples",
              "strategy": "rollout.strategy", "seed": "run.seed"}


def eval_config(args):
    """The TaoConfig an eval runs under: defaults <- --config FILE <- key=value overrides <-
    the flags given; and whether it samples (--temperature > 0) or answers greedily."""
    from tao_fast.config import load_config

    flags = {key: vars(args)[name] for name, key in EVAL_FLAGS.items()
             if vars(args)[name] is not None}
    cfg = load_config(args.config, args.overrides, values=flags)
    sampled = bool(args.temperature)
    if (args.samples or 1) > 1 and not sampled:
        raise ConfigError("eval: --samples N needs --temperature > 0 (greedy answers are all "
                          "equal)")
    return cfg, sampled


def _check_out(path: Path) -> None:
    """--out can be written, checked before the work rather than after it."""
    import tempfile

    try:
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=path.name + ".probe-"):
            pass
    except OSError as e:
        raise ConfigError(f"--out {path}: cannot write there ({e.strerror or e})") from None


def cmd_eval(args) -> int:
    from tao_fast.data import read_jsonl
    from tao_fast.data.sources import load_prompts
    from tao_fast.eval import evaluate

    cfg, sampled = eval_config(args)
    if args.n < 1:
        raise ConfigError(f"eval: --n must be >= 1, got {args.n}")
    if args.out:
        _check_out(Path(args.out))
    if args.prompts.startswith("builtin:"):
        data = dataclasses.replace(cfg.data, train=args.prompts, n_train=args.n_train_exclude,
                                   n_eval=args.n, eval="")
        _, prompts = load_prompts(data, cfg.run.seed)
    else:
        prompts = read_jsonl(args.prompts)[:args.n]
    res = evaluate(cfg.model.path, prompts, _spec(args.scorer), cfg, sampled=sampled,
                   select=_spec(args.select) if args.select else None, progress=True)
    print(res.summary())
    if args.out:
        res.save(args.out)
    return 0


def cmd_check_scorer(args) -> int:
    from tao_fast.config import load_config
    from tao_fast.scoring.check import run_check, table, write_check

    cfg = load_config(args.config, args.overrides)
    out = Path(args.out or ".")
    if not out.is_dir():
        _check_out(out)
    res = run_check(cfg, args.prompts, args.n, args.limit, progress=cfg.run.progress)
    print(table(res))
    print(f"wrote {write_check(out, res)}", file=sys.stderr)
    return 0


def _write_report(run_dir) -> None:
    from tao_fast.report import report

    print(f"tao-fast: report: {report(run_dir)}", file=sys.stderr)


def cmd_report(args) -> int:
    from tao_fast.report import report

    path = report(args.run_dir)
    print(path.read_text())
    print(f"wrote {path} and its plots in {path.parent / 'report'}", file=sys.stderr)
    return 0


def cmd_scale(args) -> int:
    from tao_fast.config import load_config
    from tao_fast.scale import scale

    try:
        ns = [int(x) for x in args.n.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--n: expected comma-separated integers, got {args.n!r}") from None
    cfg = load_config(args.config, args.overrides, base=None if args.config else DEMO)
    res = scale(cfg, ns, args.out, controls=[c for c in args.controls.split(",") if c])
    print((Path(args.out) / "scale.md").read_text())
    return 0 if res["runs"] else 1


def cmd_profile(args) -> int:
    from tao_fast.config import load_config
    from tao_fast.profiling.trace import profile_tune

    if args.steps < 1:
        raise ConfigError(f"--steps: must be >= 1, got {args.steps}")
    cfg = load_config(args.config, args.overrides, base=None if args.config else DEMO)
    path = profile_tune(cfg, args.out, steps=args.steps)
    print(path.read_text())
    print(f"wrote {path} and {path.parent / 'trace.json'}", file=sys.stderr)
    return 0


def cmd_ingest(args) -> int:
    from tao_fast.data.ingest import ingest

    s = ingest(args.paths, args.out, column=args.column, heldout_frac=args.heldout_frac,
               max_chars=args.max_chars or None,
               near_dup_threshold=None if args.no_near_dup else args.near_dup_threshold,
               progress=True, seen=args.seen)
    bad = s.malformed_lines()
    for line in bad[:20]:
        print(line, file=sys.stderr)
    if s.malformed > min(len(bad), 20):
        where = (f"counts per file in {args.out}/ingest_summary.json" if s.kept
                 else "nothing was written; the counts per file are in the summary below")
        print(f"... {s.malformed - min(len(bad), 20):,} more malformed records ({where})",
              file=sys.stderr)
    print(s.text())
    if not s.kept:
        print("tao-fast: error: no prompts kept", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tao-fast", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Tune a language model from unlabeled prompts with TAO: sample many "
                    "candidates per prompt, score them, and turn the scores into RL updates.")
    sub = p.add_subparsers(dest="cmd", required=True)
    _add_demo(sub)
    _add_tune(sub)
    _add_eval(sub)
    _add_check_scorer(sub)
    _add_report(sub)
    _add_scale(sub)
    _add_profile(sub)
    _add_ingest(sub)
    _add_bench(sub)
    _add_serve(sub)
    return p


def _add_demo(sub) -> None:
    d = sub.add_parser("demo", help="tune the embedded SmolLM2-135M on built-in arithmetic (or "
                       "three tasks at once) and show held-out accuracy before/after",
                       description="Tune the embedded SmolLM2-135M-Instruct on two-digit "
                       "additions with the prompt-only verifier, and report held-out greedy "
                       "accuracy (200 prompts, 95%% CI) before and after (~7 min on 2 cores); "
                       "--task multitask tunes on three tasks at once, each scored its own way.")
    d.add_argument("--task", choices=("arithmetic", "multitask"), default="arithmetic",
                   help="arithmetic (default), or multitask: arithmetic (verifier), JSON "
                   "extraction (format gate + content rules) and multiplication (label-free "
                   "majority vote) in one run, with per-task held-out accuracy and the worst "
                   "task's change (~19 min on 2 cores)")
    d.add_argument("--scorer", default="arithmetic",
                   help="arithmetic (default) or random (the control run: no gain expected)")
    d.add_argument("--out", help="run directory (default runs/demo, runs/demo-random, "
                   "runs/demo-multitask)")
    d.add_argument("--steps", type=int, help=f"RL steps (default {DEMO['run.steps']})")
    d.add_argument("overrides", nargs="*", help=_overrides_help())
    d.set_defaults(func=cmd_demo)


def _add_tune(sub) -> None:
    t = sub.add_parser("tune", help="tune a model from a YAML/TOML config, or resume a run",
                       description="Tune with TAO, round after round. Prompts come from "
                       "data.train: a JSONL file of {\"prompt\": ...} or {\"messages\": [...]} "
                       "lines, a directory of them (e.g. `tao-fast ingest` outputs; each round "
                       "adds the files that appeared since the last, replaying "
                       "data.replay_frac old prompts), a builtin task (builtin:arithmetic, "
                       "builtin:json, builtin:multiply), or a list of such sources with "
                       "weights (a mix; README: several tasks in one run). The scorer is "
                       "scoring.scorer (see README: rules, consensus, code/SQL execution, "
                       "reward model, judge, mixes). A training state is saved every "
                       "run.save_every steps; --resume continues a killed run from it.")
    t.add_argument("--config", help="YAML or TOML file with the run's sections (new run)")
    t.add_argument("--resume", metavar="RUN_DIR",
                   help="continue this run directory from its last saved state; overrides "
                   "such as run.rounds=3 add rounds that pick up new prompt files")
    t.add_argument("--follow", metavar="LOGDIR",
                   help="data.follow: follow this request-log directory (tao-fast serve's); "
                   "each round starts once data.min_new_prompts new prompts have arrived in "
                   "its completed requests-*.jsonl(.gz) files, and trains on them alone (with "
                   "data.replay_frac of old ones); data.follow_rounds rounds (0 = until "
                   "SIGTERM/SIGINT, which stop after the step in progress, state saved)")
    t.add_argument("overrides", nargs="*", help=_overrides_help())
    t.set_defaults(func=cmd_tune)


def _add_eval(sub) -> None:
    dflt = TaoConfig()
    e = sub.add_parser("eval", help="score a model's answers on held-out prompts",
                       description="Answer each prompt once (greedy by default), score the "
                       "answers and print accuracy with a 95%% confidence interval. Settings "
                       "are a run's (TaoConfig): the defaults, then --config FILE and "
                       "key=value overrides, then the flags given here.")
    e.add_argument("--model", help=f"checkpoint directory (HF safetensors), .gguf file, or "
                   f"embedded:NAME (model.path; default {dflt.model.path})")
    e.add_argument("--prompts", default="builtin:arithmetic",
                   help="JSONL prompt file, or builtin:arithmetic (the demo's held-out set)")
    e.add_argument("--scorer", default="arithmetic",
                   help="scorer spec, as in scoring.scorer: a name, python:module:function, "
                   "or a mapping such as '{type: consensus, extract: boxed}'")
    e.add_argument("--n", type=int, default=200, help="number of prompts (default 200)")
    e.add_argument("--config", help="a run's YAML/TOML config (e.g. RUN_DIR/config.yaml)")
    e.add_argument("--max-tokens", type=int,
                   help=f"eval.max_tokens (default {dflt.eval.max_tokens})")
    e.add_argument("--temperature", type=float,
                   help="rollout.temperature of sampled answers; 0 or absent = greedy")
    e.add_argument("--strategy",
                   help=f"rollout.strategy: plain, cot, structured, fewshot (with "
                   f"rollout.fewshot_file=FILE), or several joined with '+' "
                   f"(default {dflt.rollout.strategy}); with rollout.train_prompt=plain the "
                   f"plain prompt is answered, as a model tuned that way is asked")
    e.add_argument("--seed", type=int, help=f"run.seed: sampling and the builtin task's split "
                   f"(default {dflt.run.seed})")
    e.add_argument("--n-train-exclude", type=int, default=dflt.data.n_train,
                   help="builtin task: size of the training set whose questions are excluded")
    e.add_argument("--out", help="write the full result (every response) to this JSON file")
    e.add_argument("--samples", type=int,
                   help="eval.samples: answers per prompt (needs --temperature > 0); pass@1 "
                   "is their mean")
    e.add_argument("--select", help="with --samples N: best-of-N, keeping the answer this "
                   "scorer (a spec, e.g. consensus) rates highest")
    e.add_argument("overrides", nargs="*", help=_overrides_help())
    e.set_defaults(func=cmd_eval)


def _add_check_scorer(sub) -> None:
    c = sub.add_parser(
        "check-scorer", help="measure the training scorer against labels before tuning on it",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Sample N candidates per labelled prompt as a training step would (the run's "
        "model and engine,\nrollout.strategy, rollout.temperature, rollout.max_tokens), score "
        "each with scoring.scorer\n(the scorer under test) and eval.scorer (the labels: a "
        "verifier, or e.g. '{type: exact,\nanswer_field: answer}'), and report: AUC of the "
        "scorer's reward for telling correct from\nincorrect candidates, agreement (reward "
        "above its midpoint vs the label), and the accuracy\nof one sample, of the group's "
        "top-scored candidate (the scorer's pick: for consensus the\nmajority's answer) and "
        "of the oracle (any correct), with 95% Wilson intervals, then a\none-line verdict. "
        "Tuning on a scorer whose pick is no more accurate than one sample\ncannot be expected "
        "to raise accuracy (it may teach the model to agree with itself).",
        epilog="examples:\n  tao-fast check-scorer scoring.scorer=consensus eval.scorer=arithmetic"
        "\n  tao-fast check-scorer --config tune.yaml --prompts labelled.jsonl --limit 100 \\\n"
        "      'eval.scorer={type: exact, answer_field: answer}'")
    c.add_argument("--config", help="a run's YAML/TOML config (model, rollout, scorers)")
    c.add_argument("--prompts", help="labelled prompts: a JSONL file, or builtin:arithmetic "
                   "(its held-out split); default data.eval, else the builtin task's "
                   "held-out split")
    c.add_argument("--n", type=int, help="candidates per prompt (default rollout.n)")
    c.add_argument("--limit", type=int, default=64, help="prompts to check (default 64)")
    c.add_argument("--out", help="JSON file for the figures and every candidate, or a "
                   "directory (e.g. a run's) to hold check_scorer.json (default "
                   "./check_scorer.json)")
    c.add_argument("overrides", nargs="*", help=_overrides_help())
    c.set_defaults(func=cmd_check_scorer)


def _add_report(sub) -> None:
    r = sub.add_parser("report", help="write RUN_DIR/report.md and its plots",
                       description="Read a run directory (metrics.jsonl, eval_*.json, "
                       "manifest.jsonl) and write report.md with PNG plots in report/: "
                       "held-out accuracy before/after each round (greedy and sampled, 95%% CI, "
                       "output tokens), reward/KL curves, tokens/s per phase, time split.")
    r.add_argument("run_dir", help="a directory written by tao-fast tune or demo")
    r.set_defaults(func=cmd_report)


def _add_scale(sub) -> None:
    sc = sub.add_parser("scale", help="tune at N = 2, 4, 8, 16 candidates and plot quality "
                        "against N and tuning FLOPs",
                        description="Run the same tune once per N (candidates per prompt), "
                        "plus a random-scorer control and the base model's best-of-N at "
                        "inference, and write OUT/scale.md, scale.json and scaling.png. "
                        "Finished runs are reused and killed ones resumed.")
    sc.add_argument("--config", help="YAML/TOML run config (default: the demo's settings)")
    sc.add_argument("--n", default="2,4,8,16", help="comma-separated N values (default 2,4,8,16)")
    sc.add_argument("--out", default="runs/scale", help="output directory (default runs/scale)")
    sc.add_argument("--controls", default="random,best-of-n",
                    help="reference lines to compute: random (a random-scorer tune at N=8) "
                    "and/or best-of-n (the base model's best-of-N at inference); '' for none")
    sc.add_argument("overrides", nargs="*", help=_overrides_help())
    sc.set_defaults(func=cmd_scale)


def _add_profile(sub) -> None:
    pr = sub.add_parser(
        "profile", help="profile a few tune steps: a Chrome trace and the top ops",
        description="Set up a tune (the demo's settings, or --config), then run --steps steps "
        "under torch.profiler and write OUT/trace.json (Chrome trace: chrome://tracing or "
        "ui.perfetto.dev) and OUT/profile.md (seconds per phase: generate, score, sleep, train, "
        "sync, wake; then the top ops by self time). Each phase and each tao_fast op is a "
        "named range (tao/PHASE, tao_fast.OP), also as NVTX ranges on CUDA for Nsight Systems. "
        "Held-out evaluation and training states are off; setup (model load, engine start) is "
        "not profiled.")
    pr.add_argument("--config", help="YAML/TOML run config (default: the demo's settings)")
    pr.add_argument("--steps", type=int, default=2, help="steps to profile (default 2)")
    pr.add_argument("--out", default="runs/profile",
                    help="output directory (default runs/profile)")
    pr.add_argument("overrides", nargs="*", help=_overrides_help())
    pr.set_defaults(func=cmd_profile)


def _add_ingest(sub) -> None:
    i = sub.add_parser(
        "ingest", help="turn request logs (OpenAI JSONL, prompt JSONL, CSV, Parquet) into a "
        "cleaned prompt set with a stable held-out split",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Read request logs and prompt files; write OUT/train.jsonl, "
        "OUT/heldout.jsonl and\nOUT/ingest_summary.json (records kept and dropped by reason, "
        "per file).\n\ninputs: OpenAI chat-completions request JSONL (plain bodies, {request, "
        "response}\nwrappers, batch-API {custom_id, body} lines), {\"prompt\": ...} or "
        "{\"messages\": [...]} JSONL,\nCSV/TSV and Parquet with a prompt column, and "
        "directories of these; .gz is read\ntransparently.",
        epilog="cleaning: the prompt is the conversation up to its last user message (system\n"
        "prompts and earlier turns kept, the logged answer dropped); records with image/audio\n"
        "parts or tool turns are dropped; empty, over-long, duplicate (after normalising case,\n"
        "whitespace and punctuation) and near-duplicate prompts are dropped; malformed lines\n"
        "are reported as file:line and skipped. The held-out side of a prompt is fixed by a\n"
        "hash of its text: the same in every run and round.\n\n"
        "example:\n  tao-fast ingest logs/ extra.csv --out data/round2 --column question")
    i.add_argument("paths", nargs="+", metavar="PATH", help="files or directories to read")
    i.add_argument("--out", required=True, metavar="DIR", help="output directory")
    i.add_argument("--column", default="prompt",
                   help="CSV/Parquet column (or JSONL key) holding the prompt (default prompt)")
    i.add_argument("--heldout-frac", type=float, default=0.1,
                   help="fraction of prompts held out for evaluation (default 0.1)")
    i.add_argument("--max-chars", type=int, default=32_000,
                   help="drop prompts longer than this many characters, all messages "
                   "together (default 32000; 0 = no limit)")
    i.add_argument("--near-dup-threshold", type=float, default=0.9,
                   help="word-3-gram Jaccard similarity at which a prompt is a near-duplicate "
                   "of an earlier one (default 0.9)")
    i.add_argument("--no-near-dup", action="store_true",
                   help="keep near-duplicates (exact duplicates are still removed)")
    i.add_argument("--seen", action="append", default=[], metavar="PATH",
                   help="an earlier round's prompts (a train.jsonl / heldout.jsonl, or an "
                   "earlier --out directory; repeatable): their exact and near duplicates are "
                   "dropped as 'seen in an earlier round'")
    i.set_defaults(func=cmd_ingest)


def _add_bench(sub) -> None:
    b = sub.add_parser(
        "bench", help="run the micro-benchmarks of a checkout: pytest-benchmark JSON and a table",
        description="Run the CPU micro-benchmarks (pytest bench/ --benchmark-only) of the "
        "checkout this tao_fast comes from, and write OUT/benchmarks.json (pytest-benchmark's "
        "JSON) and OUT/benchmarks.md (median/min/max ms, rounds, throughput). --gpu runs the "
        "GPU suite (bench/gpu_suite.py) into OUT instead. Needs the repository's bench/ "
        "folder: an install from a wheel has none.")
    b.add_argument("files", nargs="*", metavar="FILE",
                   help="bench files to run, e.g. bench_pg_loss.py (default: all of bench/)")
    b.add_argument("-k", dest="keyword", help="pytest -k expression selecting benchmarks")
    b.add_argument("--out", default="runs/bench", help="output directory (default runs/bench)")
    b.add_argument("--gpu", action="store_true", help="the GPU suite instead (needs CUDA)")
    b.add_argument("--dry-run", action="store_true",
                   help="with --gpu: the suite's CPU dry run (tiny shapes)")
    b.add_argument("--root", help="checkout to benchmark (default: this tao_fast's)")
    b.set_defaults(func=cmd_bench)


def _add_serve(sub) -> None:
    import os

    v = sub.add_parser(
        "serve", help="serve the tuned model (OpenAI-compatible), log its traffic for the next "
        "round, switch to each new round",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Serve a model on an OpenAI-compatible API (POST /v1/chat/completions, "
        "streaming or not;\nGET /v1/models; GET /health) and append every request and response "
        "to LOGDIR as JSONL\n(active-<pid>.jsonl, rotated into requests-<UTC time>-<seq>.jsonl.gz"
        "), the files\n`tao-fast ingest` and `tune --follow` read. Given a run directory, it "
        "serves the newest\ncomplete checkpoint-roundN and switches to each newer one as tune "
        "writes it.",
        epilog="examples:\n  tao-fast serve --model runs/my-task --log-dir logs/live\n"
        "  tao-fast ingest logs/live --out prompts/live   # then tune --resume runs/my-task")
    v.add_argument("--model", required=True, metavar="PATH|RUN_DIR",
                   help="a model directory (HF safetensors), embedded:NAME, or a run directory "
                   "written by tao-fast tune: its newest complete checkpoint-roundN (its "
                   "config.yaml's model.path until round 1), then each newer round")
    v.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only)")
    v.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    v.add_argument("--log-dir", default="logs", metavar="DIR",
                   help="request log directory (default logs); '' turns logging off")
    v.add_argument("--engine", choices=("auto", "torch", "vllm"), default="auto",
                   help="auto (default): vLLM's own server when a supported vLLM is installed, "
                   "else the in-house torch engine; torch; vllm")
    v.add_argument("--api-key", default=os.environ.get("TAO_FAST_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: env "
                   "TAO_FAST_API_KEY; none: no key asked)")
    v.add_argument("--log-max-mb", type=float, default=64.0,
                   help="rotate the active log file once it passes this size (default 64)")
    v.add_argument("--log-rotate-s", type=float, default=300.0,
                   help="rotate a non-empty active log file this many seconds after its first "
                   "record (default 300)")
    v.add_argument("--redact", metavar="SPEC",
                   help="python:module:function (or python:file.py:function) called on each "
                   "record before it is written, in a sandbox: returns the record to write "
                   "or None to leave it out")
    v.add_argument("--max-concurrency", type=int, default=64,
                   help="requests in flight at once; more get 429 (default 64)")
    v.add_argument("--poll-s", type=float, default=5.0,
                   help="seconds between looks at RUN_DIR for a new round (default 5)")
    v.add_argument("--served-name", default="tao-fast",
                   help="the model id clients see in /v1/models and responses (default tao-fast)")
    v.add_argument("--max-tokens", type=int, default=512,
                   help="cap on a request's max_tokens, and its default (default 512)")
    v.add_argument("--max-batch", type=int, default=8,
                   help="torch engine: requests generated together in one batch (default 8)")
    v.add_argument("--max-body-mb", type=float, default=4.0,
                   help="largest request body accepted; more gets 413 (default 4)")
    v.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"tao-fast serve needs {' and '.join(missing)}: "
                          f"pip install 'tao-fast[serve]'")
    from tao_fast.serve.server import ServeOptions, serve

    names = ("model", "host", "port", "log_dir", "engine", "api_key", "log_max_mb",
             "log_rotate_s", "redact", "max_concurrency", "poll_s", "served_name", "max_tokens",
             "max_batch", "max_body_mb")
    return serve(ServeOptions(**{k: getattr(args, k) for k in names}))


def cmd_bench(args) -> int:
    from tao_fast.profiling.bench import run

    return run(args)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from tao_fast.data.prompts import PromptFileError

    try:
        return args.func(args)
    except (ConfigError, PromptFileError, ResumeError, OSError) as e:  # OSError: disk, perms
        print(f"tao-fast: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tao-fast: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as e:  # a peer rank died under torchrun: one clear line, no traceback
        if type(e).__name__ != "DistributedError":
            raise
        print(f"tao-fast: error: {e}", file=sys.stderr, flush=True)
        import os

        os._exit(3)  # no interpreter teardown: destroying a gloo group whose peer died can abort()


if __name__ == "__main__":
    sys.exit(main())
