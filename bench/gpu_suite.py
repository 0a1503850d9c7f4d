"""The GPU benchmark suite: every step in its own process, under its own time limit, results
written as they come. bench/device_run.sh runs it on a lent GPU machine.

    python bench/gpu_suite.py                        # CUDA: ~8.5 minutes at most (limits below)
    python bench/gpu_suite.py --dry-run              # every step's --dry-run, on the CPU
    python bench/gpu_suite.py --only smoke,loss      # a subset (comma list or repeated)
    python bench/gpu_suite.py --full                 # each script's own full sweep (longer)

Steps, in this order (limit = GPU time limit in seconds; how each was sized is in STEPS):
    smoke      bench/gpu_smoke.py          each Triton op once vs a float64 oracle: PASS/FAIL
    loss       bench/gpu_loss_kernels.py   fused linear log-prob and pg_loss vs peers
    attention  bench/gpu_attention.py      varlen attention: Triton, padded SDPA, flash-attn
    learner    bench/gpu_learner_step.py   forward + backward + AdamW, tokens/s and MFU
    lora       bench/gpu_lora.py           LoRA: log-probs vs float64, step and memory vs full
    flex       bench/gpu_attention.py      FlexAttention (torch.compile): only with --only flex
    vllm_sync  bench/gpu_vllm_sync.py      weight sync into vLLM: only with --only vllm_sync
                                           (the GPU machine has no vLLM; not in the 9 minutes)
A step that crashes, fails or runs past its limit is recorded as such and the next step runs.
Every script appends its rows to one results file the moment each is measured (bench/harness.py),
so the rows a step finished before it died are kept.

Output, in --out (default: $OUT if set, else bench/out/), at most 8 files:
    results.jsonl   every record of every step: run metadata (device, torch / triton / CUDA
                    versions, date, commit, command), tables, rows, checks, notes, and one
                    "step" record per step (status, seconds, limit)
    summary.md      the metadata, the steps' status table, then each step's checks and tables;
                    rewritten after every step
    STEP.log        each step's full output (smoke.log, loss.log, ...)
A dry run writes results_dry.jsonl, summary_dry.md and STEP_dry.log instead, so a CPU smoke
run never overwrites a GPU result. The results file is started afresh by each run.
Status per step: ok | correctness failed | failed (exit N): last line | timed out after N s |
skipped: reason. Exit code: 1 if a correctness check failed; 2 if otherwise anything failed or
timed out, or no step ran; 0 if every step ran ok (or was skipped for an optional reason).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from harness import git_commit, read_records, render_tables  # noqa: E402


@dataclass(frozen=True)
class Step:
    name: str
    script: str  # under bench/ (or an absolute path)
    measures: str
    args: tuple = ()  # the suite's arguments on a GPU (trimmed sweeps; dropped by --full)
    limit_s: int = 60  # GPU time limit
    estimate: str = ""  # how limit_s was sized (no GPU has run this yet: estimates)
    common: tuple = ()  # arguments on every run (GPU, --full and --dry-run)
    dry_env: dict = field(default_factory=dict)
    optional: bool = False  # only when named in --only


STEPS = (
    Step("smoke", "gpu_smoke.py", "each Triton op once vs a float64 oracle", limit_s=75,
         estimate="10 checks (5 ops x bf16/fp32) x ~0.3 s + ~28 Triton compiles (linear_logprob "
                  "fwd/dlogits x 2 dtypes x entropy on/off, pg_loss x 2 dtypes, attention 4 "
                  "kernels x 2 head dims x 2 dtypes) x ~2 s + torch import and CUDA init ~8 s = "
                  "~65 s",
         dry_env={"TRITON_INTERPRET": "1"}),
    Step("loss", "gpu_loss_kernels.py", "fused linear log-prob + pg_loss vs peers",
         args=("--shapes", "128256x4096,128256x32768,32000x16384"), common=("--force",),
         limit_s=105, dry_env={"TRITON_INTERPRET": "1"},
         estimate="checks ~8 s + pg_loss ~3 s + 3 shapes x 6 rows x ~2.5 s (fwd ~7 calls, "
                  "fwd+bwd ~8 calls of <= 0.25 s at T=32k) = ~45 s + Liger/CCE Triton compiles "
                  "~30 s + startup ~10 s = ~95 s"),
    Step("attention", "gpu_attention.py", "varlen causal attention vs SDPA, flash-attn",
         common=("--providers", "triton,sdpa_padded,flash_attn", "--force"), limit_s=65,
         dry_env={"TRITON_INTERPRET": "1"},
         estimate="checks ~5 s + 2 D x 5 mixes x 3 providers x 2 timings x ~0.4 s (do_bench, "
                  "200 ms budget) = ~25 s + Triton compiles (cached by smoke) ~5 s + startup "
                  "~10 s = ~45 s"),
    Step("learner", "gpu_learner_step.py", "learner step: forward + backward + AdamW",
         args=("--warmup", "1", "--steps", "3", "--seqs", "32"), common=("--force",),
         limit_s=175,
         estimate="2 sizes x (HF init ~8 s + parity check of 4 models ~12 s) = ~40 s + 8 "
                  "provider-size runs x (build ~4 s + 4 steps x ~1 s at ~42k tokens) = ~65 s "
                  "+ Liger GRPO's torch.compile ~30 s + matched-memory re-runs ~15 s + startup "
                  "~15 s = ~165 s"),
    Step("lora", "gpu_lora.py", "LoRA: log-probs vs float64, step time and memory vs full",
         limit_s=65,
         estimate="1.5B-shaped init + copies ~8 s + check (4 forwards, fp64 oracle) ~8 s + 2 "
                  "arms x (1 warm-up + 3 steps) x ~2 s at ~12k tokens + Triton compiles "
                  "(cached by the earlier steps) ~5 s + startup ~10 s = ~50 s"),
    # FlexAttention, a peer: only with --only flex since the LoRA step took its 65 s
    Step("flex", "gpu_attention.py", "FlexAttention (torch.compile)",
         common=("--providers", "flex", "--force"), limit_s=65,
         estimate="check (uncompiled) ~5 s + torch.compile of fwd+bwd ~20 s x 2 head dims + "
                  "10 timings ~5 s + startup ~10 s = ~60 s", optional=True),
    Step("vllm_sync", "gpu_vllm_sync.py", "weight sync into vLLM", limit_s=120,
         estimate="not in the 9-minute run: no vLLM on the GPU machine", optional=True),
)
DEVICE_BUDGET_S = 540  # bench/device_run.sh must end within 9 minutes
KILL_GRACE_S = 5  # SIGTERM, then SIGKILL after this long
OVERHEAD_S = 25  # the device probe (~10 s) and device_run.sh's wheel install (~5 s), with room
FULL_TIMEOUT = 1200  # --full: each script's own sweep
DRY_TIMEOUT = 300  # --dry-run, per step, on a slow shared CPU
CORRECTNESS_FAILED = re.compile(r"correctness (check )?failed", re.I)
BY_NAME = {s.name: s for s in STEPS}
SCRIPT_NAMES = {"gpu_smoke": "smoke", "gpu_loss_kernels": "loss", "gpu_attention": "attention",
                "gpu_learner_step": "learner", "gpu_vllm_sync": "vllm_sync", "gpu_lora": "lora",
                "loss_kernels": "loss", "learner_step": "learner"}


def default_budget_s(steps=STEPS) -> int:
    """Worst case of a default GPU run: every limit, every kill grace, the overhead."""
    run = [s for s in steps if not s.optional]
    return sum(s.limit_s + KILL_GRACE_S for s in run) + OVERHEAD_S


def canonical(name: str) -> str:
    """'loss', 'gpu_loss_kernels' or 'gpu_loss_kernels.py' -> 'loss'."""
    n = os.path.basename(name.strip())
    n = n[:-3] if n.endswith(".py") else n
    n = SCRIPT_NAMES.get(n, n)
    if n not in BY_NAME:
        raise SystemExit(f"gpu_suite: unknown step {name!r} (known: {', '.join(BY_NAME)})")
    return n


def parse_kv(items, what, conv=str) -> dict:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise SystemExit(f"gpu_suite: {what} expects NAME=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        out[canonical(k)] = conv(v)
    return out


# ----------------------------------------------------------------------------- environment

_PROBE = ("import json, torch, harness; "
          "print('PROBE ' + json.dumps(harness.run_meta('cuda' if torch.cuda.is_available() "
          "else 'cpu', [''])))")


def probe_environment() -> dict:
    """Device and versions, asked of a child process so that this one never holds a CUDA
    context while the steps run."""
    env = {"device": "unknown (the probe failed)"}
    try:
        r = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True,
                           timeout=120, cwd=HERE, env=child_env({}))
        line = next((ln for ln in r.stdout.splitlines() if ln.startswith("PROBE ")), None)
        if line is None:
            env["probe_error"] = (r.stderr.strip().splitlines() or ["no output"])[-1][:300]
        else:
            env.update(json.loads(line[6:]))
    except subprocess.TimeoutExpired:
        env["probe_error"] = "the device probe timed out (120 s)"
    return env


def child_env(extra: dict) -> dict:
    """The steps' environment: the checkout first on PYTHONPATH, unbuffered output, and $OUT
    pointed away from the results folder (a script's stray files must not count there)."""
    path = [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    scratch = os.path.join(tempfile.gettempdir(), "tao-fast-bench-scratch")
    return dict(os.environ, PYTHONPATH=os.pathsep.join(path), PYTHONUNBUFFERED="1", OUT=scratch,
                **extra)


# ----------------------------------------------------------------------------- running

def run_script(name: str, cmd: list[str], timeout_s: float, log_path: str, env: dict,
               echo=True) -> dict:
    """Run one step's command, stream its output to log_path (and to our stdout), stop it at
    its limit; -> {"returncode", "timed_out", "seconds", "lines"}."""
    lines: list[str] = []
    t0 = time.perf_counter()
    timed_out = False
    with open(log_path, "w") as log:
        log.write("$ " + shlex.join(cmd) + "\n")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                cwd=ROOT, env=env, start_new_session=True, errors="replace")

        def pump():
            for line in proc.stdout:
                lines.append(line.rstrip("\n"))
                log.write(line)
                log.flush()
                if echo:
                    print(f"[{name}] {line}", end="", flush=True)
        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            stop(proc)
            rc = proc.returncode
        reader.join(timeout=10)
    return {"returncode": rc, "timed_out": timed_out,
            "seconds": round(time.perf_counter() - t0, 1), "lines": lines}


def stop(proc) -> None:
    """SIGTERM the step's process group, SIGKILL it if it is still there KILL_GRACE_S later."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=KILL_GRACE_S)
            return
        except subprocess.TimeoutExpired:
            continue


def classify(run: dict, timeout_s: float, n_records: int) -> str:
    lines = run["lines"]
    if run["timed_out"]:
        return f"timed out after {timeout_s:.0f} s"
    if run["returncode"] != 0 and CORRECTNESS_FAILED.search("\n".join(lines)):
        return "correctness failed"
    if run["returncode"] != 0:
        last = next((ln.strip() for ln in reversed(lines) if ln.strip()), "no output")
        return f"failed (exit {run['returncode']}): {last[:200]}"
    if n_records == 0:
        return "failed: exited 0 but wrote no results"
    return "ok"


@dataclass
class Plan:
    """What one suite run does: steps, limits, extra arguments, where results go."""
    steps: list
    out_dir: str
    dry_run: bool = False
    full: bool = False
    timeouts: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    echo: bool = True

    def path(self, stem: str, ext: str) -> str:
        return os.path.join(self.out_dir, f"{stem}{'_dry' if self.dry_run else ''}.{ext}")

    def limit(self, step: Step) -> float:
        default = DRY_TIMEOUT if self.dry_run else FULL_TIMEOUT if self.full else step.limit_s
        return self.timeouts.get(step.name, default)

    def command(self, step: Step, results: str) -> list[str]:
        cmd = [sys.executable, os.path.join(HERE, step.script), *step.common]
        if self.dry_run:
            cmd.append("--dry-run")
        elif not self.full:
            cmd += step.args
        return cmd + ["--jsonl", results, "--step", step.name] + self.extra.get(step.name, [])


def skip_reason(step: Step, plan: Plan, env: dict) -> str | None:
    if not os.path.exists(os.path.join(HERE, step.script)):
        return f"skipped: bench/{step.script} does not exist"
    if step.name == "vllm_sync":
        import importlib.util
        if importlib.util.find_spec("vllm") is None:
            return "skipped: vllm is not importable"
    if not plan.dry_run and env.get("device") == "cpu" and "probe_error" not in env:
        return ("skipped: no CUDA device (torch.cuda.is_available() is False): use --dry-run "
                "for the CPU smoke path")
    return None  # a failed probe skips nothing: each step then says what is wrong


def run_step(step: Step, plan: Plan, env: dict, results: str) -> dict:
    """Run one step (or skip it) -> its record for the results file."""
    rec = {"name": step.name, "script": step.script, "measures": step.measures,
           "limit_s": plan.limit(step), "estimate": step.estimate}
    reason = skip_reason(step, plan, env)
    if reason:
        return {**rec, "status": reason}
    cmd = plan.command(step, results)
    log = plan.path(step.name, "log")
    shown = shlex.join(["python", os.path.relpath(cmd[1], ROOT), *cmd[2:]])
    print(f"gpu_suite: {step.name}: {shown} (limit {rec['limit_s']:.0f} s)", flush=True)
    run = run_script(step.name, cmd, rec["limit_s"], log,
                     child_env(step.dry_env if plan.dry_run else {}), echo=plan.echo)
    n = sum(r.get("step") == step.name for r in read_records(results))
    return {**rec, "command": shown, "returncode": run["returncode"],
            "seconds": run["seconds"], "log": os.path.basename(log),
            "status": classify(run, rec["limit_s"], n)}


# ----------------------------------------------------------------------------- report

def append_record(path: str, rec: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(rec, default=str) + "\n")


def _env_lines(env: dict) -> list[str]:
    dev = env.get("device", "cpu")
    if dev == "cpu":
        dev = f"cpu ({env.get('cpu')}, {env.get('cpu_count')} cores)"
    elif "memory_gib" in env:
        dev += (f", {env.get('memory_gib')} GiB, compute capability {env.get('capability')}, "
                f"{env.get('sm_count')} SMs, {env.get('l2_mib')} MiB L2")
    peers = ", ".join(f"{k} {env[k]}" for k in ("transformers", "liger-kernel",
                                                 "cut-cross-entropy", "flash-attn", "vllm")
                      if k in env)
    return [f"- device: {dev}",
            f"- torch {env.get('torch')} (CUDA {env.get('cuda_runtime')}), triton "
            f"{env.get('triton')}, python {env.get('python')}" + (f"; {peers}" if peers else ""),
            *([f"- probe error: {env['probe_error']}"] if "probe_error" in env else [])]


def write_summary(path: str, suite: dict, records: list[dict]) -> None:
    """summary.md from the suite's state and the results file's records."""
    dry = " (dry run on the CPU: tiny shapes, not a GPU measurement)" if suite["dry_run"] else ""
    md = [f"# GPU suite{dry}", "", *_env_lines(suite["environment"]),
          f"- date: {suite['date']}", f"- commit: {suite['commit']}",
          f"- command: `{suite['command']}`",
          f"- total so far: {time.perf_counter() - suite['t0']:.0f} s"
          + (f"; exit code {suite['exit_code']}" if "exit_code" in suite else " (running)"),
          "", "| step | measures | status | seconds | limit s | how the limit was sized |",
          "|---|---|---|---|---|---|"]
    for r in suite["steps"]:
        md.append(f"| {r['name']} | {r['measures']} | {r['status'].replace('|', '/')} | "
                  f"{r.get('seconds', '-')} | {r['limit_s']:.0f} | {r['estimate']} |")
    for r in suite["steps"]:
        if r["status"].startswith(("skipped", "pending")):
            continue
        md += ["", f"## {r['name']}: {r['status']}", "", f"`{r.get('command', '')}`"]
        checks = [f"{c['name']}: {c['detail']} -> {'PASS' if c['ok'] else 'FAIL'}"
                  for c in records if c.get("kind") == "check" and c.get("step") == r["name"]]
        if checks:
            md += ["", "Checks:", "", "```", *checks, "```"]
        tables = render_tables(records, r["name"])
        md += tables or ["", f"(no table written; see {r.get('log')})"]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(md) + "\n")
    os.replace(tmp, path)


def exit_code(statuses: list[str]) -> int:
    if any(s == "correctness failed" for s in statuses):
        return 1
    if any(not (s == "ok" or s.startswith("skipped")) for s in statuses) or \
            not any(s == "ok" for s in statuses):
        return 2
    return 0


def run_suite(plan: Plan, argv: list[str]) -> dict:
    """Run the plan's steps in order; results and summary are rewritten after each."""
    os.makedirs(plan.out_dir, exist_ok=True)
    results, summary = plan.path("results", "jsonl"), plan.path("summary", "md")
    open(results, "w").close()  # a fresh results file per run
    env = probe_environment()
    suite = {"dry_run": plan.dry_run, "full": plan.full, "t0": time.perf_counter(),
             "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": git_commit(),
             "command": shlex.join(["python", "bench/gpu_suite.py", *argv]), "environment": env,
             "steps": [{"name": s.name, "measures": s.measures, "limit_s": plan.limit(s),
                        "estimate": s.estimate, "status": "pending"} for s in plan.steps]}
    append_record(results, {"kind": "meta", "step": "suite", **env, "date": suite["date"],
                            "commit": suite["commit"], "command": suite["command"]})
    print(f"gpu_suite: {env.get('device')}; torch {env.get('torch')}, triton "
          f"{env.get('triton')}; commit {suite['commit']}; steps "
          f"{', '.join(s.name for s in plan.steps)}", flush=True)
    write_summary(summary, suite, [])
    for i, step in enumerate(plan.steps):
        rec = run_step(step, plan, env, results)
        suite["steps"][i] = rec
        append_record(results, {"kind": "step", "step": step.name, **rec})
        print(f"gpu_suite: {step.name}: {rec['status']}"
              + (f" ({rec['seconds']:.0f} s)" if "seconds" in rec else ""), flush=True)
        write_summary(summary, suite, read_records(results))
    suite["exit_code"] = exit_code([r["status"] for r in suite["steps"]])
    write_summary(summary, suite, read_records(results))
    print("\ngpu_suite: " + "; ".join(f"{r['name']}: {r['status']}" for r in suite["steps"]))
    print(f"gpu_suite: wrote {results} and {summary} (exit {suite['exit_code']})", flush=True)
    return suite


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="steps: " + ", ".join(BY_NAME))
    ap.add_argument("--dry-run", action="store_true",
                    help="run every step's --dry-run on the CPU (tiny shapes)")
    ap.add_argument("--only", action="append", default=[], metavar="NAME[,NAME]",
                    help="run only these steps (gpu_*.py names work too)")
    ap.add_argument("--full", action="store_true",
                    help=f"each script's own full sweep, limit {FULL_TIMEOUT} s each")
    ap.add_argument("--timeout", action="append", default=[], metavar="NAME=SECONDS")
    ap.add_argument("--script-args", action="append", default=[], metavar='NAME="ARGS"',
                    help="extra arguments for one step, appended to its command")
    ap.add_argument("--out", default=None, help="output folder (default: $OUT or bench/out)")
    ap.add_argument("--quiet", action="store_true", help="don't echo the steps' output")
    a = ap.parse_args(argv)
    names = [canonical(n) for item in a.only for n in item.split(",") if n.strip()]
    steps = [s for s in STEPS if (s.name in names if names else not s.optional)]
    plan = Plan(steps, os.path.abspath(a.out or os.environ.get("OUT")
                                       or os.path.join(HERE, "out")),
                a.dry_run, a.full, parse_kv(a.timeout, "--timeout", float),
                parse_kv(a.script_args, "--script-args", shlex.split), echo=not a.quiet)
    return run_suite(plan, argv)["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
