"""`tao-fast bench`: the micro-benchmarks of a checkout, their JSON and a readable table.

CPU (default): `pytest bench/ --benchmark-only` in the checkout this tao_fast was imported from,
writing OUT/benchmarks.json (pytest-benchmark's JSON: every round's statistics, each
benchmark's extra_info, the machine, the commit) and OUT/benchmarks.md (a table: median, min,
max, rounds and the throughput figures a benchmark records). --gpu runs the GPU suite
(bench/gpu_suite.py, the engine of bench/device_run.sh) into OUT instead.
The benchmarks live in the repository's bench/ folder, not in the package: an install from a
wheel has none, and the command says so in one line.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[2]  # tao_fast/profiling/bench.py -> the checkout
# extra_info keys shown in the table's last column (the rest stays in the JSON)
SHOWN = ("tokens_per_s", "candidates_per_s", "sequences_per_s", "ms_per_decode_step", "tokens",
         "micro_batches", "fill")


def bench_dir(root: Path | None = None) -> Path:
    """The checkout's bench/ folder; FileNotFoundError (one line) when there is none."""
    d = Path(root or CHECKOUT) / "bench"
    if not (d / "conftest.py").is_file():
        raise FileNotFoundError(
            f"no benchmarks at {d} (bench/conftest.py is missing): `tao-fast bench` runs from a "
            f"git checkout of tao-fast; an install from a wheel carries no bench/ folder")
    return d


def bench_file(name: str, bench: Path) -> str:
    """A benchmark file as given: a path that exists (absolute, or from here, e.g.
    bench/bench_pg_loss.py), else a name in bench/ (bench_pg_loss.py); a FileNotFoundError
    naming both places otherwise."""
    for p in (Path(name), bench / name):
        if p.exists():
            return str(p.resolve())
    raise FileNotFoundError(f"no benchmark file {name} (looked here and in {bench})")


def pytest_command(args, bench: Path, json_path: Path) -> list[str]:
    """pytest over the named bench files (default: all of bench/), benchmarks only."""
    targets = [bench_file(f, bench) for f in args.files] or [str(bench)]
    cmd = [sys.executable, "-m", "pytest", *targets, "--benchmark-only",
           f"--benchmark-json={json_path}", "-q", "-p", "no:cacheprovider"]
    return cmd + (["-k", args.keyword] if args.keyword else [])


def child_env(root: Path) -> dict:
    """This checkout first on PYTHONPATH (the benchmarks import tao_fast from it)."""
    path = [str(root)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(path))


def _extra(info: dict) -> str:
    return ", ".join(f"{k} {info[k]:,}" if isinstance(info[k], (int, float)) else f"{k} {info[k]}"
                     for k in SHOWN if k in info)


def benchmark_table(data: dict) -> str:
    """Markdown of a pytest-benchmark JSON: machine, date, commit, then one row a benchmark."""
    mach, commit = data.get("machine_info", {}), data.get("commit_info", {})
    cpu = mach.get("cpu", {}).get("brand_raw") or mach.get("processor") or "unknown CPU"
    head = [f"- machine: {cpu}, {mach.get('cpu', {}).get('count', '?')} cores; python "
            f"{mach.get('python_version', '?')}",
            f"- date: {data.get('datetime', '?')}; commit {commit.get('id', '?')[:10]}"
            + (" (dirty)" if commit.get("dirty") else ""), "",
            "| benchmark | median ms | min ms | max ms | rounds | figures |",
            "| --- | --- | --- | --- | --- | --- |"]
    rows = []
    for b in data.get("benchmarks", []):
        s = b["stats"]
        rows.append(f"| {b['fullname'].split('/')[-1]} | {1e3 * s['median']:,.3f} | "
                    f"{1e3 * s['min']:,.3f} | {1e3 * s['max']:,.3f} | {s['rounds']} | "
                    f"{_extra(b.get('extra_info', {}))} |")
    return "\n".join(head + rows) + "\n"


def run_gpu_suite(args, bench: Path, out: Path) -> int:
    cmd = [sys.executable, str(bench / "gpu_suite.py"), "--out", str(out)]
    return subprocess.call(cmd + (["--dry-run"] if args.dry_run else []), cwd=bench.parent,
                           env=child_env(bench.parent))


def run(args) -> int:
    """`tao-fast bench` with its parsed arguments (files, keyword, out, gpu, dry_run, root)."""
    bench = bench_dir(args.root)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.gpu:
        return run_gpu_suite(args, bench, out)
    json_path = (out / "benchmarks.json").resolve()
    json_path.unlink(missing_ok=True)  # a JSON left by an earlier run must not pass for this one
    rc = subprocess.call(pytest_command(args, bench, json_path), cwd=bench.parent,
                         env=child_env(bench.parent))
    if not json_path.is_file():
        print(f"tao-fast: error: bench: pytest exited {rc} and wrote no {json_path}",
              file=sys.stderr)
        return rc or 1
    text = benchmark_table(json.loads(json_path.read_text()))
    (out / "benchmarks.md").write_text(text)
    print("\n" + text + f"\nwrote {json_path} and {out / 'benchmarks.md'}")
    return rc
