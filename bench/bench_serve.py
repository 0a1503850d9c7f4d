"""Benchmark of `tao-fast serve` (a script, not a pytest benchmark: it has no test_* functions
and is not run in CI):

1. requests/s and p50/p99 latency on the embedded model with the request log on vs off,
   interleaved A/B: two server processes (one logging, one with --log-dir ''), and rounds of
   load that alternate between them in one run, so drift of a shared machine hits both arms;
2. the time from a round's checkpoint appearing in the RUN_DIR the logging server watches to
   the first answer served by it (client side: from the rename that makes it appear; server
   side: /health's first_answer_s, from the checkpoint's mtime).

    python bench/bench_serve.py --seconds 60 --rounds 6 --clients 8 --out runs/bench-serve.json

Each arm gets `seconds` of load in total (rounds / 2 rounds of seconds / (rounds / 2) each).
Clients send chat requests of distinct arithmetic prompts (max_tokens, temperature 0) from
threads of this process with httpx; the servers are separate processes (their GIL is not
this one's).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def link_copy(src: Path, dest: Path) -> None:
    """A model directory 'copied' with hard links, made under a temporary name and renamed."""
    tmp = dest.with_name(dest.name + ".tmp-bench")
    tmp.mkdir()
    for f in src.iterdir():
        if f.is_file():
            os.link(f, tmp / f.name)
    tmp.rename(dest)


def start_server(model: str, log_dir: str, args) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tao_fast.cli", "serve", "--model", model,
                             "--port", str(port), "--log-dir", log_dir, "--engine", args.engine,
                             "--poll-s", "0.5", "--max-batch", str(args.clients)])
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"server on {model} did not start")


def load(url: str, seconds: float, clients: int, max_tokens: int, offset: int) -> list[float]:
    """Latencies of the requests `clients` threads complete in `seconds`."""
    import httpx

    lat, stop, errors = [], time.monotonic() + seconds, []

    def worker(k):
        with httpx.Client(timeout=120) as c:
            i = 0
            while time.monotonic() < stop:
                a, b = (offset + k * 7919 + i * 31) % 90 + 10, (k + i * 13) % 90 + 10
                t0 = time.perf_counter()
                r = c.post(url + "/v1/chat/completions", json={
                    "model": "m", "max_tokens": max_tokens, "temperature": 0,
                    "messages": [{"role": "user", "content": f"What is {a} + {b}?"}]})
                if r.status_code == 200:
                    lat.append(time.perf_counter() - t0)
                else:
                    errors.append(r.status_code)
                i += 1

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        print(f"  {len(errors)} errors: {sorted(set(errors))}", file=sys.stderr)
    return lat


def summarize(lat: list[float], seconds: float) -> dict:
    q = statistics.quantiles(lat, n=100) if len(lat) >= 2 else [lat[0]] * 99
    return {"requests": len(lat), "req_per_s": round(len(lat) / seconds, 2),
            "p50_s": round(statistics.median(lat), 3), "p99_s": round(q[98], 3)}


def ab(on_url: str, off_url: str, args) -> dict:
    """Interleaved rounds: on, off, on, off, ...; each arm's latencies pooled."""
    per = args.seconds / (args.rounds // 2)
    lat = {"on": [], "off": []}
    for r in range(args.rounds):
        arm = "on" if r % 2 == 0 else "off"
        got = load(on_url if arm == "on" else off_url, per, args.clients, args.max_tokens,
                   offset=r * 1000)
        lat[arm] += got
        print(f"round {r + 1}/{args.rounds} log {arm}: {len(got) / per:.2f} req/s",
              file=sys.stderr)
    return {arm: summarize(v, args.seconds) for arm, v in lat.items()}


def switch_time(run_dir: Path, model_dir: Path, url: str) -> dict:
    """checkpoint-round2 appears -> the first answer it serves (one client polling)."""
    import httpx

    t0 = time.time()
    link_copy(model_dir, run_dir / "checkpoint-round2")
    with httpx.Client(timeout=120) as c:
        while True:
            r = c.post(url + "/v1/chat/completions", json={
                "model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
            if r.json().get("system_fingerprint", "").startswith("checkpoint-round2"):
                break
        h = c.get(url + "/health").json()
    return {"client_s": round(time.time() - t0, 2),
            "server_first_answer_s": h["model"]["first_answer_s"],
            "load_s": h["switches"][-1]["load_s"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=60, help="load per arm (default 60)")
    p.add_argument("--rounds", type=int, default=6, help="A/B rounds, even (default 6)")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    p.add_argument("--max-tokens", type=int, default=16, help="per request (default 16)")
    p.add_argument("--model", default="embedded:smollm2-135m-instruct")
    p.add_argument("--engine", default="torch")
    p.add_argument("--work", default="runs/bench-serve", help="scratch directory")
    p.add_argument("--out", help="write the figures to this JSON file")
    args = p.parse_args()
    from tao_fast.models.loader import resolve_model_path

    model_dir = resolve_model_path(args.model)
    work = Path(args.work)
    run_dir = work / "run"
    if work.exists():
        import shutil

        shutil.rmtree(work)
    run_dir.mkdir(parents=True)
    link_copy(model_dir, run_dir / "checkpoint-round1")
    on, on_url = start_server(str(run_dir), str(work / "logs"), args)
    off, off_url = start_server(str(model_dir), "", args)
    try:
        res = {"ab": ab(on_url, off_url, args), "switch": switch_time(run_dir, model_dir, on_url),
               "settings": vars(args)}
    finally:
        for proc in (on, off):
            proc.terminate()
            proc.wait(120)
    print(json.dumps(res, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
