"""Crash safety and rounds: training state round-trips, a SIGKILLed tune resumes to the same
weights as an uninterrupted one, rounds pick up new prompt files, a full disk fails early."""
import errno
import json
import os
import signal
import subprocess
import sys
from collections import namedtuple

import pytest
import torch
from safetensors.torch import load_file

import tao_fast
from tao_fast.config import ConfigError, RLConfig, ResumeError, load_config
from tao_fast.models.config import ModelArgs
from tao_fast.models.llama import Transformer
from tao_fast.rl.state import latest_state, load_state, save_state
from tao_fast.rl.trainer import Learner, Sample


def tiny_learner(seed):
    torch.manual_seed(seed)
    args = ModelArgs(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1,
                     num_heads=2, num_kv_heads=1)
    model = Transformer(args)
    model.ops_backend = "torch"
    return Learner(model, RLConfig(lr=1e-2, warmup_steps=3), temperature=1.0,
                   ops_backend="torch")


def test_state_round_trip(tmp_path):
    a = tiny_learner(0)
    batch = [Sample([1, 2, 3, 4, 5], 2, 1.0, [-1.0, -2.0, -0.5]),
             Sample([1, 7, 8], 2, -1.0, [-0.3])]
    a.step(batch)
    a.step(batch)
    save_state(tmp_path, 2, a.model, a.opt, a.sched, {"note": "x"})
    torch.manual_seed(123)
    want_rng = torch.rand(3)
    b = tiny_learner(1)  # different weights, fresh optimizer
    st = load_state(latest_state(tmp_path), b.model, b.opt, b.sched)
    assert st["note"] == "x" and st["step"] == 2
    for (k, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.equal(p, q), k
    assert b.sched.last_epoch == a.sched.last_epoch == 2
    sa, sb = a.opt.state_dict(), b.opt.state_dict()
    for i in sa["state"]:
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(sa["state"][i][k], sb["state"][i][k])
    # the next step is identical too (lr from the scheduler, moments, weights)
    torch.manual_seed(123)
    a.step(batch)
    b.step(batch)
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(p, q)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), want_rng)


def test_latest_always_names_a_complete_state(tmp_path):
    a = tiny_learner(0)
    save_state(tmp_path, 1, a.model, a.opt, a.sched, {})
    (tmp_path / "state" / "step-000002.tmp-dead").mkdir()  # a writer killed mid-save
    assert latest_state(tmp_path).name == "step-000001"
    save_state(tmp_path, 2, a.model, a.opt, a.sched, {})
    names = sorted(p.name for p in (tmp_path / "state").iterdir())
    assert names == ["latest", "step-000002"]  # older state and stale temp dir cleaned up
    (tmp_path / "state" / "latest").write_text("step-000009")
    with pytest.raises(ResumeError, match="incomplete or missing"):
        latest_state(tmp_path)


Run = namedtuple("Run", "dir config")


def write_config(tmp_path, name, model, steps=5, rounds=1, train="prompts.jsonl"):
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(
        f"model:\n  path: {model}\n  ops_backend: torch\n"
        f"data:\n  train: {train}\n"
        "scoring:\n  scorer: random\n"
        "rollout:\n  engine: torch\n  n: 2\n  max_tokens: 6\n  temperature: 1.0\n"
        "rl:\n  prompts_per_step: 2\n  lr: 1.0e-4\n"
        "eval:\n  before: false\n  after: false\n"
        f"run:\n  steps: {steps}\n  rounds: {rounds}\n  output_dir: {name}\n  progress: false\n"
        "  threads: 1\n  save_every: 2\n")
    return Run(tmp_path / name, cfg)


def prompts(path, words):
    path.write_text("".join(json.dumps({"prompt": f"Say something about {w}."}) + "\n"
                            for w in words))


def cli(*args, cwd, env=None):
    return subprocess.Popen([sys.executable, "-m", "tao_fast.cli", *map(str, args)], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})


@pytest.mark.slow
def test_sigkill_mid_step_then_resume_matches_an_uninterrupted_run(tmp_path, tiny_model):
    prompts(tmp_path / "prompts.jsonl", ["cats", "rain", "tea", "maps", "jazz"])
    ref = write_config(tmp_path, "ref", tiny_model)
    killed = write_config(tmp_path, "killed", tiny_model)
    p = cli("tune", "--config", ref.config, cwd=tmp_path)
    # SIGKILLed in step 4, after its rollouts: step 3 is logged, the state of step 2 is on disk
    q = cli("tune", "--config", killed.config, cwd=tmp_path, env={"TAO_FAST_KILL_AT": "4"})
    out = q.communicate(timeout=300)[0]
    assert q.returncode == -signal.SIGKILL, out
    assert len((killed.dir / "metrics.jsonl").read_text().splitlines()) == 3
    assert p.wait(timeout=300) == 0, p.stdout.read()
    assert latest_state(killed.dir).name == "step-000002"
    assert not (killed.dir / "checkpoint-round1").exists()

    r = cli("tune", "--resume", killed.dir, cwd=tmp_path)
    out = r.communicate(timeout=300)[0]
    assert r.returncode == 0, out
    assert "resuming" in out and "round 1, step 3" in out
    steps = [json.loads(x)["step"] for x in (killed.dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]  # step 3 redone once, nothing lost or doubled
    a = load_file(str(ref.dir / "checkpoint-round1" / "model.safetensors"))
    b = load_file(str(killed.dir / "checkpoint-round1" / "model.safetensors"))
    base = load_file(str(tiny_model / "model.safetensors"))
    assert any(not torch.equal(a[k], base[k]) for k in a)  # training did move the weights
    assert all(torch.equal(a[k], b[k]) for k in a)  # and the resumed run landed on the same ones
    leftovers = [p for p in killed.dir.rglob("*") if ".tmp-" in p.name or p.name.endswith(".old")]
    assert not leftovers
    for f in ("config.yaml", "manifest.jsonl", "summary.json", "checkpoint-round1/config.json"):
        assert (killed.dir / f).exists(), f


@pytest.mark.slow
def test_rounds_pick_up_new_prompt_files(tmp_path, monkeypatch, tiny_model):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    prompts(tmp_path / "data" / "week1.jsonl", ["cats", "rain", "tea", "maps"])
    prompts(tmp_path / "data" / "heldout.jsonl", ["never trained on"])
    run = write_config(tmp_path, "flywheel", tiny_model, steps=1, train="data")
    tao_fast.tune(str(run.config))
    with pytest.raises(ConfigError, match="already holds a run"):
        tao_fast.tune(str(run.config))
    prompts(tmp_path / "data" / "week2.jsonl", ["jazz", "snow", "figs", "owls", "moss", "kites"])
    res = tao_fast.tune(resume=run.dir, overrides=["run.rounds=2", "data.replay_frac=0.25"])
    manifest = [json.loads(x) for x in (run.dir / "manifest.jsonl").read_text().splitlines()]
    assert [m["round"] for m in manifest] == [1, 2]
    assert [os.path.basename(f["path"]) for f in manifest[0]["new_files"]] == ["week1.jsonl"]
    assert [os.path.basename(f["path"]) for f in manifest[1]["new_files"]] == ["week2.jsonl"]
    assert manifest[1]["n_new"] == 6 and manifest[1]["n_replay"] == 2  # 2 / (6 + 2) = 0.25
    assert len(set(manifest[1]["prompt_ids"]) & set(manifest[0]["prompt_ids"])) == 2
    assert res.checkpoint == run.dir / "checkpoint-round2" and res.checkpoint.exists()
    assert [json.loads(x)["round"] for x in
            (run.dir / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_full_disk_fails_before_the_round(tmp_path, monkeypatch, embedded):
    """A mock stands in for a full disk (shutil.disk_usage reports 1 MiB free)."""
    import shutil

    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(1 << 40, 1 << 40, 1 << 20))
    cfg = load_config(overrides=["model.ops_backend=torch", "eval.before=false",
                                 "rollout.engine=torch",
                                 f"run.output_dir={tmp_path / 'r'}", "run.progress=false"])
    with pytest.raises(OSError, match="1 MiB free") as e:
        tao_fast.tune(cfg)
    assert e.value.errno == errno.ENOSPC
    assert not (tmp_path / "r" / "metrics.jsonl").read_text()  # no step ran


def test_space_check_counts_only_what_will_be_written(tmp_path, monkeypatch):
    """A mock stands in for the disk (shutil.disk_usage). Room for the round's checkpoint but
    not for a training state as well: fine with run.keep_states=0, a clear error otherwise.
    A new state is written beside the kept one(s), so a run with none yet needs room for two
    (keep_states=1), one with a state already for one."""
    import shutil

    from tao_fast.rl.state import estimate_bytes
    from tao_fast.run_dir import check_space

    model = tiny_learner(0).model
    ckpt = sum(p.numel() * p.element_size() for p in model.parameters())
    Usage = namedtuple("Usage", "total used free")
    free = {"bytes": ckpt + estimate_bytes(model) // 2}
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(1 << 40, 0, free["bytes"]))
    check_space(tmp_path, model, keep_states=0)
    with pytest.raises(OSError, match="2 training state.* and a checkpoint .* run.keep_states=0"):
        check_space(tmp_path, model, keep_states=1)
    free["bytes"] = ckpt + estimate_bytes(model) * 3 // 2  # one state's room, not two
    with pytest.raises(OSError, match="2 training state"):
        check_space(tmp_path, model, keep_states=1)
    (tmp_path / "state" / "step-000004").mkdir(parents=True)  # one kept already
    check_space(tmp_path, model, keep_states=1)
    with pytest.raises(OSError, match="2 training state"):
        check_space(tmp_path, model, keep_states=2)


def test_a_save_that_fails_leaves_the_last_state_and_says_so(tmp_path, monkeypatch, capsys,
                                                              tiny_model):
    """A disk that fills during the second training state's write (a fault injected into
    safetensors' writer: SafetensorError, as a full disk raises it): the run stops with one
    line naming the last complete state, which is intact, and nothing half-written stays."""
    from safetensors import SafetensorError

    import tao_fast.rl.state as state
    from tao_fast.cli import main

    monkeypatch.chdir(tmp_path)
    prompts(tmp_path / "prompts.jsonl", ["cats", "rain", "tea"])
    run = write_config(tmp_path, "full", tiny_model, steps=4)
    real, calls = state.save_file, {"n": 0}

    def filling_disk(tensors, path, *a, **k):
        calls["n"] += 1
        if calls["n"] == 4:  # the second state's first file
            raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: "
                                  "StorageFull, message: \"No space left on device\" })")
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(state, "save_file", filling_disk)
    assert main(["tune", "--config", str(run.config), "run.save_every=1"]) == 2
    err = capsys.readouterr().err
    assert "tao-fast: error: " in err and "Traceback" not in err
    assert "cannot write the training state" in err and "No space left" in err
    assert "the last complete training state is " + str(run.dir / "state" / "step-000001") in err
    assert latest_state(run.dir).name == "step-000001"
    assert sorted(p.name for p in (run.dir / "state").iterdir()) == ["latest", "step-000001"]
    kept = run.dir / "state" / "step-000001"
    assert json.loads((kept / "state.json").read_text())["step"] == 1
    assert load_file(str(kept / "model.safetensors")) and load_file(str(kept / "rng.safetensors"))


def test_unresumable_dirs_say_why(tmp_path):
    with pytest.raises(ResumeError, match="no config.yaml"):
        tao_fast.tune(resume=tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="cannot write"):
        tao_fast.tune(load_config(overrides=[f"run.output_dir={blocker / 'run'}"]))


def test_a_run_reads_its_config_and_never_changes_it(tmp_path, monkeypatch, tiny_model):
    """The TaoConfig a caller passes is the same after the run, and a resumed run takes its
    directory from where it is now, not from the run.output_dir written in config.yaml."""
    import copy
    import shutil

    monkeypatch.chdir(tmp_path)
    prompts(tmp_path / "prompts.jsonl", ["cats", "rain"])
    run = write_config(tmp_path, "first", tiny_model, steps=2)
    cfg = load_config(run.config, ["run.save_every=1"])
    before = copy.deepcopy(cfg)
    tao_fast.tune(cfg)
    assert cfg == before
    shutil.move(tmp_path / "first", tmp_path / "moved")
    res = tao_fast.tune(resume=tmp_path / "moved", overrides=["run.rounds=2"])
    assert res.run_dir == tmp_path / "moved" and (tmp_path / "moved" / "checkpoint-round2").exists()
    assert not (tmp_path / "first").exists()
    saved = load_config(tmp_path / "moved" / "config.yaml")
    assert saved.run.output_dir == str(tmp_path / "moved") and saved.run.rounds == 2


def test_a_new_run_never_overwrites_a_finished_one(tmp_path, monkeypatch, tiny_model):
    """run.keep_states=0 leaves no state to resume from; a second new run into the directory
    is refused, and the first run's metrics and checkpoint stay as they were."""
    monkeypatch.chdir(tmp_path)
    prompts(tmp_path / "prompts.jsonl", ["cats", "rain"])
    run = write_config(tmp_path, "done", tiny_model, steps=1)
    tao_fast.tune(run.config, ["run.keep_states=0"])
    metrics = (run.dir / "metrics.jsonl").read_bytes()
    weights = (run.dir / "checkpoint-round1" / "model.safetensors").read_bytes()
    with pytest.raises(ConfigError, match="already holds a run"):
        tao_fast.tune(run.config, ["run.keep_states=0", "rl.lr=1e-2"])
    assert (run.dir / "metrics.jsonl").read_bytes() == metrics
    assert (run.dir / "checkpoint-round1" / "model.safetensors").read_bytes() == weights


@pytest.mark.parametrize("where", ["train", "heldout"])
def test_an_over_long_prompt_is_refused_before_any_generation(tmp_path, monkeypatch,
                                                              tiny_model, where):
    """A 1 MB prompt (~200k tokens; the model's context is 8,192) is an error naming its file
    and line and the sizes, before the engine generates anything."""
    from tao_fast.rollout.torch_engine import TorchEngine

    def no_generate(*a, **k):
        raise AssertionError("generate() was called")

    monkeypatch.setattr(TorchEngine, "generate", no_generate)
    monkeypatch.chdir(tmp_path)
    long = json.dumps({"prompt": "word " * 200_000})
    short = json.dumps({"prompt": "Say hi."})
    (tmp_path / "train.jsonl").write_text(f"{short}\n{long if where == 'train' else short}\n")
    (tmp_path / "heldout.jsonl").write_text(f"{long if where == 'heldout' else short}\n")
    run = write_config(tmp_path, "long", tiny_model, steps=1, train="train.jsonl")
    line = "train.jsonl:2" if where == "train" else "heldout.jsonl:1"
    key = "rollout.max_tokens=6" if where == "train" else "eval.max_tokens=64"
    with pytest.raises(ConfigError, match=rf"{line}: 200,\d{{3}} prompt tokens \+ {key} exceed "
                                          r"the model's context of 8,192 tokens"):
        tao_fast.tune(run.config, ["data.eval=heldout.jsonl", "eval.before=true"])


def test_a_run_whose_scoring_always_failed_says_so(tmp_path, monkeypatch, capsys, tiny_model):
    """A user scorer that raises on every candidate: a warning at the first such step, and the
    command exits 1 with one line instead of 0."""
    from tao_fast.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "broken_scorer.py").write_text(
        "def score(prompt, candidates):\n    raise KeyError('expected')\n")
    prompts(tmp_path / "prompts.jsonl", ["cats", "rain"])
    run = write_config(tmp_path, "failing", tiny_model, steps=2)
    assert main(["tune", "--config", str(run.config), "scoring.scorer=python:broken_scorer:score",
                 "run.keep_states=0"]) == 1
    err = capsys.readouterr().err
    assert "warning: step 1: every candidate's scoring failed" in err
    assert err.count("every candidate's scoring failed (") == 1  # warned once, not per step
    assert "tao-fast: error: every candidate's scoring failed in every step" in err


def test_a_refused_resume_leaves_the_run_as_it_was(tmp_path, monkeypatch, tiny_model):
    """A resume that a check refuses (here: a prompt file changed since its round read it)
    stops before it writes anything: config.yaml, metrics.jsonl and the state stay."""
    monkeypatch.chdir(tmp_path)
    prompts(tmp_path / "prompts.jsonl", ["cats", "rain", "tea"])
    run = write_config(tmp_path, "kept", tiny_model, steps=4)
    q = cli("tune", "--config", run.config, cwd=tmp_path, env={"TAO_FAST_KILL_AT": "4"})
    q.communicate(timeout=300)
    before = {p: p.read_bytes() for p in run.dir.rglob("*") if p.is_file()}
    prompts(tmp_path / "prompts.jsonl", ["cats", "rain", "coffee"])
    with pytest.raises(ResumeError):
        tao_fast.tune(resume=run.dir, overrides=["rl.lr=1e-2"])
    assert {p: p.read_bytes() for p in run.dir.rglob("*") if p.is_file()} == before
