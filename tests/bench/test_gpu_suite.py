"""bench/gpu_suite.py (the engine of bench/device_run.sh) on the CPU: a step that crashes or runs
past its limit never stops the next, and the rows it wrote before that survive; the default
limits fit the 9-minute device run; a real dry run through device_run.sh writes at most 8
files with the run's metadata and tables."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from bench_modules import load

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"


def _suite():
    return load("gpu_suite")


FAKE = """
import argparse, sys, time
sys.path.insert(0, {bench!r})
from harness import Results
ap = argparse.ArgumentParser()
ap.add_argument("--jsonl"); ap.add_argument("--step"); ap.add_argument("--dry-run", action="store_true")
a = ap.parse_args()
res = Results(a.jsonl, a.step)
res.meta("cpu")
table = res.table("t", "fake {name}", [("provider", "provider", ""), ("ms", "ms", ".1f")])
table.add({{"provider": "{name}-row-1", "ms": 1.0}})
{then}
table.add({{"provider": "{name}-row-2", "ms": 2.0}})
"""


def _fake_step(mod, tmp_path, name, then, limit):
    script = tmp_path / f"{name}.py"
    script.write_text(FAKE.format(bench=str(BENCH), name=name, then=then))
    return mod.Step(name, str(script), f"fake {name}", limit_s=limit, estimate="test")


def test_a_crash_or_timeout_never_stops_the_next_step_and_rows_survive(tmp_path):
    mod = _suite()
    steps = [_fake_step(mod, tmp_path, "crash", "raise RuntimeError('kernel died')", 60),
             _fake_step(mod, tmp_path, "hang", "time.sleep(120)", 4),
             _fake_step(mod, tmp_path, "fine", "pass", 60)]
    out = tmp_path / "out"
    plan = mod.Plan(steps, str(out), dry_run=True, timeouts={"hang": 4}, echo=False)
    suite = mod.run_suite(plan, ["--test"])
    status = {r["name"]: r["status"] for r in suite["steps"]}
    assert status["crash"].startswith("failed (exit 1)") and "kernel died" in status["crash"]
    assert status["hang"] == "timed out after 4 s"
    assert status["fine"] == "ok" and suite["exit_code"] == 2
    recs = [json.loads(line) for line in (out / "results_dry.jsonl").read_text().splitlines()]
    rows = [r["provider"] for r in recs if r["kind"] == "row"]
    assert rows == ["crash-row-1", "hang-row-1", "fine-row-1", "fine-row-2"]
    assert [r["step"] for r in recs if r["kind"] == "step"] == ["crash", "hang", "fine"]
    md = (out / "summary_dry.md").read_text()
    for needle in ("| crash-row-1 | 1.0 |", "| hang-row-1 | 1.0 |", "| fine-row-2 | 2.0 |",
                   "timed out after 4 s", "commit:", "date:", "device: cpu"):
        assert needle in md, needle
    assert "kernel died" in (out / "crash_dry.log").read_text()
    assert sorted(os.listdir(out)) == ["crash_dry.log", "fine_dry.log", "hang_dry.log",
                                       "results_dry.jsonl", "summary_dry.md"]


def test_default_limits_fit_the_nine_minute_device_run():
    mod = _suite()
    run = [s for s in mod.STEPS if not s.optional]
    assert [s.name for s in run] == ["smoke", "loss", "attention", "learner", "lora"]
    assert mod.default_budget_s() <= mod.DEVICE_BUDGET_S == 540
    assert all(s.estimate and s.limit_s > 0 for s in mod.STEPS)
    files = 2 + len(run)  # results, summary and one log per step
    assert files <= 8  # what the device tool brings back
    sh = (BENCH / "device_run.sh").read_text()
    assert "DEVICE_RUN_LIMIT_S:-540" in sh and "--target /tmp/site .whl/*.whl" in sh


def test_step_names_and_options():
    mod = _suite()
    assert mod.canonical("gpu_attention.py") == mod.canonical("attention") == "attention"
    assert mod.canonical("gpu_loss_kernels") == "loss"
    assert mod.parse_kv(["learner=--steps 1"], "--script-args", str) == {"learner": "--steps 1"}
    with pytest.raises(SystemExit):
        mod.canonical("nope")
    plan = mod.Plan(list(mod.STEPS), "/tmp/x", extra={"loss": ["--shapes", "1x1"]})
    cmd = plan.command(mod.BY_NAME["loss"], "/tmp/x/results.jsonl")
    assert cmd[-6:] == ["--jsonl", "/tmp/x/results.jsonl", "--step", "loss", "--shapes", "1x1"]
    assert "--force" in cmd and "128256x4096,128256x32768,32000x16384" in cmd


def test_device_run_dry_run_writes_metadata_tables_and_few_files(tmp_path):
    """The one command, on the CPU: one real step's --dry-run (the loss kernels' torch rows;
    the Triton rows run in the interpreter), a few seconds."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET",)}
    env.update(OUT=str(tmp_path), PYTHON=sys.executable, TAO_FAST_COMMIT="test")
    r = subprocess.run(["bash", str(BENCH / "device_run.sh"), "--dry-run", "--only", "loss",
                        "--quiet", "--script-args", "loss=--shapes 1000x64 --providers "
                        "torch-eager,tao-fast,liger-flce"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    files = sorted(os.listdir(tmp_path))
    assert files == ["loss_dry.log", "results_dry.jsonl", "summary_dry.md"], files
    recs = [json.loads(line) for line in (tmp_path / "results_dry.jsonl").read_text().splitlines()]
    meta = next(r for r in recs if r["kind"] == "meta" and r["step"] == "loss")
    for key in ("device", "torch", "triton", "date", "commit", "command"):
        assert meta[key], key
    rows = {r["provider"]: r for r in recs
            if r["kind"] == "row" and r["table"].startswith("linear_logprob")}
    assert isinstance(rows["torch-eager"]["fwd_ms"], float)
    assert "fwd_bwd_mib" in rows["torch-eager"]
    assert "backward_info" in rows["tao-fast"] and rows["tao-fast"]["fwd_bwd_ms"] > 0
    liger = rows["liger-flce"]  # without .whl/ not importable: the error is in its row
    assert liger.get("error") or isinstance(liger.get("fwd_ms"), float)
    md = (tmp_path / "summary_dry.md").read_text()
    assert "| loss | " in md and "| ok |" in md and "| torch-eager |" in md
    assert not (tmp_path / "results.jsonl").exists()  # a dry run never overwrites GPU results


def test_gpu_lora_dry_run_checks_and_times_both_arms(tmp_path):
    """bench/gpu_lora.py's CPU dry run: the float64 check passes and both arms get a row."""
    mod = load("gpu_lora")
    out = tmp_path / "lora.jsonl"
    assert mod.main(["--dry-run", "--jsonl", str(out)]) == 0
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["ok"] for r in recs if r["kind"] == "check"] == [True]
    rows = {r["arm"]: r for r in recs if r["kind"] == "row"}
    assert set(rows) == {"lora", "full"} and all("error" not in r for r in rows.values())
    assert rows["lora"]["trained_m"] < rows["full"]["trained_m"]
    assert rows["lora"]["sync_mib"] < rows["full"]["sync_mib"] / 4
