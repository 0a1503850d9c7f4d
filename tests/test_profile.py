"""`tao-fast profile` on the CPU: a real (tiny) tune's steps under torch.profiler."""
import json
import subprocess
import sys

import pytest


def test_profile_writes_a_trace_with_every_phase(tmp_path, tiny_model):
    (tmp_path / "p.jsonl").write_text("".join(
        json.dumps({"prompt": f"Say a word about {w}."}) + "\n" for w in ("cats", "rain")))
    out = tmp_path / "prof"
    r = subprocess.run(
        [sys.executable, "-m", "tao_fast.cli", "profile", "--steps", "2", "--out", str(out),
         f"model.path={tiny_model}", "model.ops_backend=torch", f"data.train={tmp_path / 'p.jsonl'}",
         "scoring.scorer=random", "rollout.engine=torch", "rollout.n=4", "rollout.max_tokens=6",
         "rl.prompts_per_step=2", "run.progress=false", "run.threads=1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    names = {e.get("name") for e in json.loads((out / "trace.json").read_text())["traceEvents"]}
    for phase in ("generate", "score", "sleep", "train", "sync", "wake"):
        assert f"tao/{phase}" in names, phase
    for op in ("linear_logprob", "pg_loss", "varlen_attention"):
        assert f"tao_fast.{op}" in names, op
    report = (out / "profile.md").read_text()
    assert "| train |" in report and "Self CPU" in report
    assert len((out / "run" / "metrics.jsonl").read_text().splitlines()) == 2
    assert not (out / "run" / "state").exists() and not (out / "run" / "eval_before.json").exists()


def test_profile_refuses_zero_steps(tmp_path):
    r = subprocess.run([sys.executable, "-m", "tao_fast.cli", "profile", "--steps", "0"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--steps: must be >= 1" in r.stderr


@pytest.mark.parametrize("flag", ["--help"])
def test_profile_help(flag):
    r = subprocess.run([sys.executable, "-m", "tao_fast.cli", "profile", flag],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "Chrome trace" in r.stdout
