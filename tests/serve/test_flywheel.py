"""The whole loop, on real parts: `tao-fast serve --model RUN_DIR` answers with the base model
and logs its traffic; `tao-fast tune --follow LOGDIR` waits for that traffic, runs round 1 on
it, and the server switches to checkpoint-round1; the next traffic is answered (and logged) by
round 1 and feeds round 2, which the server then serves. Two processes, the official client."""
import gzip
import json
import subprocess
import sys
import time

import openai
import pytest
import yaml

WORDS = [["tea", "owls", "rain", "salt", "maps", "bells", "kites", "moss"],
         ["jazz", "wolves", "ice", "paper", "lamps", "ferns", "coins", "clay"]]


def tune_config(path, model, run_dir, logdir):
    path.write_text(yaml.safe_dump({
        "model": {"path": str(model), "ops_backend": "torch"},
        "rollout": {"engine": "torch", "n": 2, "max_tokens": 3},
        "scoring": {"scorer": {"type": "length", "min": 1}},
        "rl": {"prompts_per_step": 2},
        "eval": {"before": False, "after": False, "samples": 0, "max_tokens": 3},
        "run": {"steps": 1, "threads": 1, "progress": False, "keep_states": 1,
                "output_dir": str(run_dir)},
        "data": {"follow": str(logdir), "min_new_prompts": 4, "follow_poll_s": 0.2,
                 "follow_rounds": 2, "replay_frac": 0.0}}))
    return path


def logged(logdir) -> list[dict]:
    return [json.loads(x) for f in sorted(logdir.glob("requests-*.jsonl.gz"))
            for x in gzip.open(f, "rt").read().splitlines()]


def wait_for(cond, timeout_s, what, procs=()):
    end = time.monotonic() + timeout_s
    while True:
        try:
            v = cond()
        except Exception:  # the server not up yet
            v = None
        if v:
            return v
        for p in procs:
            assert p.poll() is None, f"{p.args[3]} exited with {p.returncode} waiting for {what}"
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.mark.slow
def test_serve_traffic_round_then_the_server_answers_with_the_round(tmp_path, tiny_model,
                                                                   tools):
    logdir, run_dir, port = tmp_path / "logs", tmp_path / "run", tools.free_port()
    logdir.mkdir()
    cfg = tune_config(tmp_path / "tune.yaml", tiny_model, run_dir, logdir)
    out = open(tmp_path / "procs.log", "w")
    tune = subprocess.Popen([sys.executable, "-m", "tao_fast.cli", "tune", "--config", str(cfg)],
                            stdout=out, stderr=subprocess.STDOUT)
    procs = [tune]
    try:  # the follow run writes config.yaml, then waits for traffic: serve its base model
        wait_for(lambda: (run_dir / "config.yaml").exists(), 60, "config.yaml", procs)
        serve = subprocess.Popen(
            [sys.executable, "-m", "tao_fast.cli", "serve", "--model", str(run_dir), "--port",
             str(port), "--log-dir", str(logdir), "--engine", "torch", "--max-tokens", "4",
             "--log-rotate-s", "0.5", "--poll-s", "0.2"], stdout=out, stderr=subprocess.STDOUT)
        procs.append(serve)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none",
                               max_retries=0, timeout=60)

        def version():
            return client.models.list().data[0].model_dump().get("version")

        versions = []
        for rnd, words in enumerate(WORDS, 1):
            versions.append(wait_for(version, 90, f"the server before round {rnd}", procs))
            for w in words:
                r = client.chat.completions.create(
                    model="tao-fast", max_tokens=4,
                    messages=[{"role": "user", "content": f"Say a word about {w}."}])
                assert r.usage.completion_tokens >= 1
            wait_for(lambda: (run_dir / f"checkpoint-round{rnd}").is_dir(), 180,
                     f"round {rnd}'s checkpoint", [tune] if rnd == 1 else procs)
            wait_for(lambda: version() == f"checkpoint-round{rnd}", 60,
                     f"the server on round {rnd}", [serve])
        assert tune.wait(120) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait(30)
        out.close()
    assert versions == ["base", "checkpoint-round1"]
    recs = logged(logdir)
    by_version = {}
    for rec in recs:
        by_version.setdefault(rec["model_version"], []).append(rec)
    assert len(by_version.get("base", [])) == 8 and len(by_version["checkpoint-round1"]) == 8
    assert len({r["request_id"] for r in recs}) == len(recs)  # each request logged once
    man = [json.loads(x) for x in (run_dir / "manifest.jsonl").read_text().splitlines()]
    assert [m["round"] for m in man] == [1, 2] and man[1]["n_new"] >= 4
