"""The algorithms table: the demo's task and budget (tao_fast/cli.py DEMO: 15 steps x 8 prompts x
8 candidates, temperature 0.7, 32 tokens, lr 2e-5) once per algorithm / setting, each a
`tao-fast demo` in its own process, one after another on the same machine.

    python bench/algorithms.py                       # every row below
    python bench/algorithms.py grpo dapo bon-sft     # some rows
    python bench/algorithms.py --out bench/out/algorithms.jsonl --engine torch
    python bench/algorithms.py dr-grpo --set rollout.dtype=bfloat16   # on top of every row

Each finished row is appended to --out at once (a killed table keeps its rows): held-out greedy
accuracy after tuning on the demo's 200 held-out prompts with its 95% Wilson interval, mean
tokens per answer, the run's wall time and its command. The first row also evaluates before
tuning (the same base model and prompts for every row). `--markdown` prints the table of a
finished --out file.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from harness import cpu_name, git_commit

ROWS = {  # name -> overrides on top of the demo's settings
    "grpo": ["rl.algorithm=grpo"],
    "dapo": ["rl.algorithm=dapo"],
    "bon-sft": ["rl.algorithm=bon-sft"],
    "gspo": ["rl.algorithm=gspo"],
    "grpo-epochs2": ["rl.algorithm=grpo", "rl.epochs=2"],
    "dr-grpo": ["rl.algorithm=dr-grpo"],
    "rloo": ["rl.algorithm=rloo"],
    "grpo-epochs4": ["rl.algorithm=grpo", "rl.epochs=4"],
    "grpo-token-mean": ["rl.algorithm=grpo", "rl.loss_agg=token-mean"],
    "grpo-shorter": ["rl.algorithm=grpo", "rl.length_penalty=0.5"],
    # TAO's form: candidates under a richer prompt, trained and evaluated on the plain one
    "tao-structured": ["rl.algorithm=grpo", "rollout.strategy=plain+structured",
                       "rollout.train_prompt=plain"],
    "tao-fewshot": ["rl.algorithm=grpo", "rollout.strategy=plain+fewshot",
                    "rollout.train_prompt=plain",
                    "rollout.fewshot_file=bench/fewshot_arithmetic.jsonl"],
}


def run_row(name: str, overrides: list[str], runs: Path, engine: str, before: bool,
            common: list[str]) -> dict:
    out = runs / name
    cmd = [sys.executable, "-m", "tao_fast.cli", "demo", "--out", str(out),
           f"rollout.engine={engine}", f"eval.before={'true' if before else 'false'}",
           "eval.samples=0", "run.progress=false", *common, *overrides]  # greedy accuracy only
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    row = {"name": name, "overrides": overrides, "set": common, "rc": proc.returncode,
           "wall_s": round(wall, 1),
           "command": "tao-fast demo --out " + str(out) + " " + " ".join(cmd[6:])}
    if proc.returncode != 0:
        row["error"] = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
        return row
    summary = json.loads((out / "summary.json").read_text())
    for k in ("before", "after"):
        if summary.get(k):
            row[k] = {f: summary[k][f] for f in ("accuracy", "ci_low", "ci_high",
                                                 "mean_response_tokens")}
    ms = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    row["reward_first_last"] = [ms[0]["reward_mean"], ms[-1]["reward_mean"]]
    row["train_seconds"] = round(sum(m.get("train_seconds", 0.0) for m in ms), 1)
    return row


def markdown(rows: list[dict]) -> str:
    lines = ["| row | settings | held-out accuracy after (95% CI) | tokens/answer | reward step 1 -> 15 "
             "| wall time | training time |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        r = {**r, "overrides": [*r.get("set", []), *r["overrides"]]}
        if r.get("rc"):
            lines.append(f"| {r['name']} | `{' '.join(r['overrides'])}` | failed: {r['error']} "
                         "| | | | |")
            continue
        a = r["after"]
        lines.append(
            f"| {r['name']} | `{' '.join(r['overrides'])}` | {100 * a['accuracy']:.1f}% "
            f"({100 * a['ci_low']:.1f}-{100 * a['ci_high']:.1f}) | "
            f"{a['mean_response_tokens']:.1f} | {r['reward_first_last'][0]:.3f} -> "
            f"{r['reward_first_last'][1]:.3f} | {r['wall_s'] / 60:.1f} min | "
            f"{r['train_seconds'] / 60:.1f} min |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("rows", nargs="*", help=f"rows to run (default all: {', '.join(ROWS)})")
    ap.add_argument("--out", default="bench/out/algorithms.jsonl", help="JSONL of the rows")
    ap.add_argument("--runs", default="runs/algorithms", help="where the runs' directories go")
    ap.add_argument("--engine", default="torch", help="rollout.engine (default torch: the "
                    "engine of the README's first command, which does not install vLLM)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a setting for every row, before the row's own (repeatable)")
    ap.add_argument("--markdown", action="store_true", help="print the table of --out, run nothing")
    a = ap.parse_args(argv)
    out = Path(a.out)
    if a.markdown:
        print(markdown([json.loads(x) for x in out.read_text().splitlines() if x.strip()]))
        return 0
    unknown = [r for r in a.rows if r not in ROWS]
    if unknown:
        ap.error(f"unknown rows {unknown}; known: {list(ROWS)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(a.rows or list(ROWS)):
        # each row's run imports the checkout as it is when the row starts: its commit then
        head = {"date": time.strftime("%Y-%m-%d"), "commit": git_commit(), "machine": cpu_name(),
                "cpus": os.cpu_count()}
        row = {**head, **run_row(name, ROWS[name], Path(a.runs), a.engine, before=i == 0,
                                 common=a.set)}
        with open(out, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
