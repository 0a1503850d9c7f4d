"""`tao-fast tune --follow LOGDIR`: rounds that start when new traffic has arrived in a request
log directory, de-duplicated against earlier rounds; SIGTERM / SIGINT stop a run after the step
in progress with a state saved (while waiting for traffic: at once), and --resume continues."""
import gzip
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tao_fast
from tao_fast.config import ConfigError, load_config
from tao_fast.data.follow import FollowTimeout, completed_logs
from tao_fast.data.ingest import IngestError
from tao_fast.rl.state import latest_state

WORDS1 = ["cats", "rain", "tea", "maps", "jazz", "snow", "figs", "owls", "clocks", "lamps"]
HELD1 = 2  # "clocks" and "lamps" fall on the held-out side of ingest's hash split
WORDS2 = ["moss", "kites", "dunes", "reefs", "bells", "forks"]


def request_line(text: str, i: int) -> str:
    """One line of tao-fast serve's request log (the wrapper form ingest reads)."""
    return json.dumps({
        "request": {"model": "m", "messages": [{"role": "user", "content": text}]},
        "response": {"choices": [{"message": {"role": "assistant", "content": "an answer"}}]},
        "request_id": f"req-{i}", "timestamp": 1_700_000_000 + i, "latency_s": 0.1,
        "usage": {"prompt_tokens": 5, "completion_tokens": 2}, "model_version": "base",
        "status": 200})


def write_log(logdir: Path, seq: int, words) -> Path:
    """A completed log file, put in place at once as serve does (os.replace)."""
    name = f"requests-20261201T12{seq:02d}00Z-{seq:06d}.jsonl.gz"
    tmp = logdir / f".{name}.tmp"
    lines = "".join(request_line(f"Say something about {w}.", k) + "\n"
                    for k, w in enumerate(words))
    tmp.write_bytes(gzip.compress(lines.encode()))
    os.replace(tmp, logdir / name)
    return logdir / name


def settings(model, out, logdir, **extra) -> dict:
    """The tiny follow run's settings (dotted keys)."""
    return {"model.path": str(model), "model.ops_backend": "torch", "rollout.engine": "torch",
            "scoring.scorer": {"type": "length", "min": 1}, "rollout.n": 2,
            "rollout.max_tokens": 3, "rollout.temperature": 1.0, "rl.prompts_per_step": 2,
            "eval.before": False, "eval.after": False, "eval.samples": 0, "eval.max_tokens": 3,
            "run.steps": 2, "run.threads": 1, "run.progress": False, "run.keep_states": 1,
            "run.save_every": 0, "run.output_dir": str(out), "data.follow": str(logdir),
            "data.min_new_prompts": 4, "data.follow_poll_s": 0.1, "data.replay_frac": 0.0,
            **extra}


def write_yaml(path: Path, values: dict) -> Path:
    import yaml

    data: dict = {}
    for k, v in values.items():
        sec, key = k.split(".", 1)
        data.setdefault(sec, {})[key] = v
    path.write_text(yaml.safe_dump(data))
    return path


def cli(*args, cwd, log, env=None):
    return subprocess.Popen([sys.executable, "-m", "tao_fast.cli", *map(str, args)], cwd=cwd,
                            stdout=log, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})


def wait_for(cond, timeout=120.0, what=""):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.05)


def manifest(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "manifest.jsonl").read_text().splitlines()]


def summary(run_dir: Path, rnd: int) -> dict:
    return json.loads((run_dir / "follow" / f"round-{rnd:03d}" / "ingest_summary.json")
                      .read_text())


@pytest.mark.slow
def test_two_rounds_follow_the_traffic(tmp_path, tiny_model):
    logdir, run = tmp_path / "logs", tmp_path / "run"
    logdir.mkdir()
    log1 = write_log(logdir, 1, WORDS1)
    (logdir / "active-4242.jsonl").write_text(request_line("Never read: being appended.", 0)
                                              + "\n")
    (logdir / "notes.txt").write_text("not a log")
    assert completed_logs(logdir) == [log1]

    def second_log():  # round 2's traffic arrives once round 1's checkpoint is there
        wait_for(lambda: (run / "checkpoint-round1").exists(), what="checkpoint-round1")
        time.sleep(0.3)
        write_log(logdir, 2, WORDS1[:2] + WORDS2)  # two prompts round 1 had: not again
    writer = threading.Thread(target=second_log, daemon=True)
    writer.start()
    cfg = load_config(values=settings(tiny_model, run, logdir, **{
        "data.follow_rounds": 2, "eval.after": True}))
    res = tao_fast.tune(cfg)
    writer.join(timeout=5)

    m = manifest(run)
    assert [x["round"] for x in m] == [1, 2]
    for rnd, line in zip((1, 2), m):
        (f,) = line["new_files"]
        assert f["path"] == str(run / "follow" / f"round-{rnd:03d}" / "train.jsonl")
        assert len(f["sha256"]) == 64
    s1, s2 = summary(run, 1), summary(run, 2)
    assert [Path(f["path"]).name for f in s1["files"]] == [log1.name]  # not active-*, not .txt
    assert [Path(f["path"]).name for f in s2["files"]] == ["requests-20261201T120200Z-000002"
                                                           ".jsonl.gz"]
    assert s2["dropped"] == {"seen in an earlier round": 2}
    assert m[0]["n_new"] == s1["train"] >= 4 and m[1]["n_new"] == s2["train"] >= 4
    assert m[1]["n_replay"] == 0 and not set(m[0]["prompt_ids"]) & set(m[1]["prompt_ids"])
    assert res.checkpoint == run / "checkpoint-round2"
    assert (run / "checkpoint-round1" / "model.safetensors").exists() and res.checkpoint.exists()
    # every evaluation is on round 1's held-out prompts, a fixed set
    assert s1["heldout"] == HELD1 and s2["heldout"] == 0
    assert json.loads((run / "eval_round1.json").read_text())["n"] == HELD1
    assert res.eval_after.n == HELD1
    assert [json.loads(x)["round"] for x in (run / "metrics.jsonl").read_text().splitlines()] \
        == [1, 1, 2, 2]
    assert not (run / ".follow-staging").exists()


@pytest.mark.slow
def test_sigterm_while_waiting_exits_and_resume_follows_on(tmp_path, tiny_model, monkeypatch):
    """The CLI in a subprocess, SIGTERMed while round 2 waits: exit 0 at once. Resumed (in
    this process), round 2 reads only the new log; SIGTERMed in its first step, it saves a
    state there, and a second resume finishes the round from it."""
    logdir, run = tmp_path / "logs", tmp_path / "run"
    logdir.mkdir()
    write_log(logdir, 1, WORDS1)
    values = settings(tiny_model, run, logdir)
    del values["data.follow"]  # --follow gives it
    cfg = write_yaml(tmp_path / "tune.yaml", values)
    out = tmp_path / "out.txt"
    with out.open("w") as f:
        p = cli("tune", "--config", cfg, "--follow", logdir, cwd=tmp_path, log=f)
        wait_for(lambda: "round 2: waiting for 4 new prompts" in out.read_text()
                 or p.poll() is not None, what="round 2's wait")
        t0 = time.monotonic()
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=30) == 0, out.read_text()
    assert time.monotonic() - t0 < 10
    text = out.read_text()
    assert "stopped by SIGTERM while round 2 waited for traffic" in text, text
    assert json.loads(text.strip().splitlines()[-1])["stopped"]
    assert (run / "checkpoint-round1").exists() and latest_state(run).name == "step-000002"

    write_log(logdir, 2, WORDS2)
    monkeypatch.setenv("TAO_FAST_SIGTERM_AT", "3")  # in round 2's first step
    res = tao_fast.tune(resume=run, overrides=["data.follow_rounds=2"])
    assert res.stopped.startswith("stopped by SIGTERM after step 3")
    assert latest_state(run).name == "step-000003" and not (run / "checkpoint-round2").exists()
    monkeypatch.delenv("TAO_FAST_SIGTERM_AT")
    res = tao_fast.tune(resume=run, overrides=["data.follow_rounds=2"])
    assert not res.stopped and res.checkpoint == run / "checkpoint-round2"
    m = manifest(run)
    assert [x["round"] for x in m] == [1, 2]
    assert [Path(f["path"]).name for f in summary(run, 2)["files"]] == [
        "requests-20261201T120200Z-000002.jsonl.gz"]  # log 1 was not read again
    assert m[1]["n_new"] == summary(run, 2)["train"]
    steps = [(x["round"], x["step"]) for x in map(json.loads, (run / "metrics.jsonl")
                                                 .read_text().splitlines())]
    assert steps == [(1, 1), (1, 2), (2, 1), (2, 2)]


@pytest.mark.slow
def test_sigterm_mid_round_saves_a_state_and_resume_matches(tmp_path, tiny_model, monkeypatch):
    """A plain tune (no --follow): SIGTERM in step 2 of 4 -> the step ends, a state is saved,
    the run returns; --resume ends on the same weights as an uninterrupted run."""
    (tmp_path / "prompts.jsonl").write_text("".join(
        json.dumps({"prompt": f"Say something about {w}."}) + "\n" for w in WORDS1[:5]))
    base = settings(tiny_model, "", "", **{"run.steps": 4, "run.save_every": 3,
                                          "data.train": str(tmp_path / "prompts.jsonl"),
                                          "scoring.scorer": "random"})  # rewards that differ
    del base["data.follow"]
    ref = tao_fast.tune(load_config(values={**base, "run.output_dir": str(tmp_path / "ref")}))
    run = tmp_path / "cut"
    monkeypatch.setenv("TAO_FAST_SIGTERM_AT", "2")
    res = tao_fast.tune(load_config(values={**base, "run.output_dir": str(run)}))
    assert res.stopped.startswith("stopped by SIGTERM after step 2; the training state is saved")
    assert latest_state(run).name == "step-000002"
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    assert not (run / "checkpoint-round1").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are put back
    monkeypatch.delenv("TAO_FAST_SIGTERM_AT")
    res = tao_fast.tune(resume=run)
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    a = load_file(str(ref.checkpoint / "model.safetensors"))
    b = load_file(str(res.checkpoint / "model.safetensors"))
    start = load_file(str(tiny_model / "model.safetensors"))
    assert any(not torch.equal(a[k], start[k]) for k in a)  # training moved the weights
    assert all(torch.equal(a[k], b[k]) for k in a)  # and the resumed run landed on the same


def test_a_bad_log_directory_is_one_line_before_any_model_loads(tmp_path, capsys):
    from tao_fast.cli import main

    def tune(logdir, **extra):  # the model path does not exist: loading it would fail
        tao_fast.tune(load_config(values=settings(tmp_path / "no-model", tmp_path / "run",
                                                  logdir, **extra)))

    with pytest.raises(ConfigError, match=r"^data.follow: log directory .*missing does not "
                       r"exist$"):
        tune(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="data.follow: .*file is not a directory"):
        tune(tmp_path / "file")
    logdir = tmp_path / "logs"
    logdir.mkdir()
    (logdir / "requests-20261201T120000Z-000001.jsonl.gz").write_bytes(b"\x1f\x8bnot gzip")
    with pytest.raises(IngestError, match="requests-20261201T120000Z-000001.jsonl.gz"):
        tune(logdir)
    (logdir / "requests-20261201T120000Z-000001.jsonl.gz").unlink()
    t0 = time.monotonic()
    with pytest.raises(FollowTimeout, match="data.follow_max_wait_s: .*no round ran"):
        tune(logdir, **{"data.follow_max_wait_s": 0.3})
    assert time.monotonic() - t0 < 10
    with pytest.raises(ConfigError, match="data.train: .* with data.follow"):
        tune(logdir, **{"data.train": str(tmp_path / "p.jsonl")})
    with pytest.raises(ConfigError, match="run.rounds: 3 with data.follow"):
        tune(logdir, **{"run.rounds": 3})
    cfg = write_yaml(tmp_path / "t.yaml", {k: v for k, v in settings(
        tmp_path / "no-model", tmp_path / "run2", "").items() if k != "data.follow"})
    capsys.readouterr()
    assert main(["tune", "--config", str(cfg), "--follow", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.follow: log directory" in err[0]


def test_stop_request_sets_a_flag_and_cuts_a_wait_short():
    from tao_fast.stop import StopRequest

    stop = StopRequest()
    before = signal.getsignal(signal.SIGINT)
    with stop.handling_signals():
        threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)).start()
        t0 = time.monotonic()
        assert stop.sleep(30) is True and time.monotonic() - t0 < 5
        assert stop.requested and stop.name == "SIGINT"
    assert signal.getsignal(signal.SIGINT) is before
    assert StopRequest().sleep(0.01) is False
