"""run.report_to: the experiment trackers of tao_fast/tracking.py. TensorBoard for real (its own
reader parses what was written); wandb and trackio through stand-ins that record their calls."""
import importlib.machinery
import json
import sys
import types

import pytest

import tao_fast
from tao_fast.config import ConfigError, RunConfig, load_config
from tao_fast.eval import EvalResult
from tao_fast.tracking import (BACKENDS, PACKAGES, Tensorboard, Trackers, check_installed,
                               flat_config, open_trackers)


def scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(log_dir))
    ea.Reload()
    return {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}


def hparams(log_dir) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    ea = EventAccumulator(str(log_dir))
    ea.Reload()
    content = ea.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    info = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    return {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind"))
            for k, v in info.hparams.items()}


def result(accuracy, mode="greedy", **kw) -> EvalResult:
    return EvalResult(n=4, mean_score=accuracy / 2, accuracy=accuracy, ci_low=0.0, ci_high=1.0,
                      mean_response_tokens=3.0, seconds=0.1, mode=mode, **kw)


def stand_in_wandb(fail_at_log: int | None = None):
    """A stand-in for the wandb package (not installed in CI, and it needs its service binary):
    records init's arguments, the config and each log call; its log raises OSError at call
    number fail_at_log."""
    calls = {"init": [], "config": {}, "log": [], "define_metric": [], "finished": 0}

    class Config(dict):
        def update(self, d, allow_val_change=False):
            calls["config"].update(d)

    class Run:
        config = Config()

        def define_metric(self, name, **kw):
            calls["define_metric"].append((name, kw))

        def log(self, d):
            calls["log"].append(dict(d))
            if len(calls["log"]) == fail_at_log:
                raise OSError("No space left on device")

        def finish(self):
            calls["finished"] += 1

    mod = types.ModuleType("wandb")
    mod.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    mod.init = lambda **kw: calls["init"].append(kw) or Run()
    mod.calls = calls
    return mod


def tiny_cfg(tmp_path, **over):
    return load_config(overrides=[f"run.output_dir={tmp_path / 'run'}",
                                  *(f"{k}={v}" for k, v in over.items())])


def test_report_to_is_none_or_known_names_joined_by_commas():
    assert RunConfig().report_to == "none" and RunConfig().trackers == ()
    assert RunConfig(report_to="tensorboard, wandb,tensorboard").trackers == ("tensorboard",
                                                                              "wandb")
    for bad in ("tensorbord", "none,wandb", "", "WandB"):
        with pytest.raises(ConfigError, match=r"run\.report_to: must be none or some of"):
            load_config(overrides=[f"run.report_to={bad}"])
    assert set(BACKENDS) == set(RunConfig.REPORT_TO) == set(PACKAGES)


def test_tensorboard_writes_what_its_own_reader_parses(tmp_path):
    cfg = tiny_cfg(tmp_path, **{"run.report_to": "tensorboard", "run.seed": 7})
    t = open_trackers(cfg, tmp_path)
    assert list(t.trackers) == ["tensorboard"]
    t.log_eval(result(0.25), 0)
    t.log({"round": 1, "step": 1, "global_step": 1, "reward_mean": 0.5, "loss": -1.25,
           "sync_path": "shared", "skipped": "why", "flag": True}, 1)
    t.log({"round": 1, "step": 2, "global_step": 2, "reward_mean": 0.75, "loss": 2.0}, 2)
    t.log_eval(result(0.5, by_task={"math": {"n": 2, "accuracy": 1.0, "mean_score": 0.9}}), 2)
    t.log_eval(result(0.375, mode="sampled"), 2)
    t.close()
    got = scalars(tmp_path / "tensorboard")
    assert got["reward_mean"] == [(1, 0.5), (2, 0.75)] and got["loss"] == [(1, -1.25), (2, 2.0)]
    assert got["round"] == [(1, 1.0), (2, 1.0)]
    assert not {"global_step", "sync_path", "skipped", "flag"} & set(got)  # numbers alone
    assert got["eval/accuracy"] == [(0, 0.25), (2, 0.5)]
    assert got["eval/mean_score"] == [(0, 0.125), (2, 0.25)]
    assert got["eval/math/accuracy"] == [(2, 1.0)]
    assert got["eval_sampled/accuracy"] == [(2, 0.375)]
    hp = hparams(tmp_path / "tensorboard")
    assert hp["run.seed"] == 7 and hp["run.report_to"] == "tensorboard"
    assert hp["rl.algorithm"] == cfg.rl.algorithm
    assert [p.name for p in tmp_path.iterdir()] == ["tensorboard"]  # nothing elsewhere


def test_a_resumed_runs_tensorboard_replaces_the_steps_it_redoes(tmp_path):
    t = Tensorboard(tmp_path, {}, None)
    for s in (1, 2, 3):
        t.log({"reward_mean": float(s)}, s)
    t.close()
    t = Tensorboard(tmp_path, {}, 3)  # the resumed run kept 2 lines: it redoes step 3
    for s in (3, 4):
        t.log({"reward_mean": 10.0 * s}, s)
    t.close()
    assert len(list((tmp_path / "tensorboard").iterdir())) == 2  # appended: a new event file
    assert scalars(tmp_path / "tensorboard")["reward_mean"] == [(1, 1.0), (2, 2.0), (3, 30.0),
                                                                (4, 40.0)]


def test_wandb_stand_in_is_offline_gets_the_config_and_metrics_by_step(tmp_path, monkeypatch):
    """wandb is a stand-in module (the package is not installed in CI): what tao-fast calls."""
    wandb = stand_in_wandb()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = tiny_cfg(tmp_path, **{"run.report_to": "wandb", "run.steps": 3})
    t = open_trackers(cfg, tmp_path / "run")
    t.log({"global_step": 1, "reward_mean": 0.5, "sync_path": "shared"}, 1)
    t.log_eval(result(0.5), 1)
    t.close()
    (init,) = wandb.calls["init"]
    assert init["mode"] == "offline" and init["dir"] == str(tmp_path / "run")
    assert init["resume"] == "allow" and init["name"] == "run"
    run_id = (tmp_path / "run" / "wandb" / "run_id").read_text().strip()
    assert init["id"] == run_id
    assert wandb.calls["config"]["run.steps"] == 3 == cfg.run.steps
    assert wandb.calls["config"] == flat_config(cfg.to_dict())
    assert ("*", {"step_metric": "global_step"}) in wandb.calls["define_metric"]
    assert wandb.calls["log"][0] == {"reward_mean": 0.5, "global_step": 1}
    assert wandb.calls["log"][1]["eval/accuracy"] == 0.5
    assert wandb.calls["log"][1]["global_step"] == 1 and wandb.calls["finished"] == 1
    monkeypatch.setenv("WANDB_MODE", "online")  # the user's choice wins; a resume: same id
    open_trackers(cfg, tmp_path / "run", first_step=2).close()
    assert wandb.calls["init"][1]["mode"] == "online" and wandb.calls["init"][1]["id"] == run_id


STAND_IN_TRACKIO = '''
import os
calls = {"dir_at_import": os.environ.get("TRACKIO_DIR"), "init": [], "log": [], "finished": 0}

def init(project, name=None, group=None, space_id=None, dataset_id=None, config=None,
         resume="never", settings=None, embed=True):
    calls["init"].append(dict(project=project, name=name, space_id=space_id,
                              dataset_id=dataset_id, config=config, resume=resume, embed=embed))

def log(metrics, step=None):
    calls["log"].append((dict(metrics), step))

def finish():
    calls["finished"] += 1
'''


def test_trackio_stand_in_is_local_under_the_run_dir(tmp_path, monkeypatch):
    """trackio is a stand-in module (the package is not installed in CI), imported from a file
    as the real one would be: TRACKIO_DIR is set before its import."""
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / "trackio.py").write_text(STAND_IN_TRACKIO)
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))
    monkeypatch.setenv("TRACKIO_DIR", "")  # unset; restored when the test ends
    assert "trackio" not in sys.modules
    try:
        cfg = tiny_cfg(tmp_path, **{"run.report_to": "trackio"})
        t = open_trackers(cfg, tmp_path / "run")
        t.log({"global_step": 2, "reward_mean": 0.25, "skipped": "no candidate"}, 2)
        t.close()
        calls = sys.modules["trackio"].calls
    finally:
        sys.modules.pop("trackio", None)
    assert calls["dir_at_import"] == str(tmp_path / "run" / "trackio")
    (init,) = calls["init"]
    assert init["space_id"] is None and init["dataset_id"] is None and init["embed"] is False
    assert init["resume"] == "allow" and init["name"] == "run"
    assert init["config"] == flat_config(cfg.to_dict()) and init["config"]["run.seed"] == 0
    assert calls["log"] == [({"reward_mean": 0.25}, 2)] and calls["finished"] == 1


def test_a_missing_package_is_a_config_error_before_any_model_loads(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    for name in ("wandb", "trackio"):
        monkeypatch.setitem(sys.modules, name, None)
        with pytest.raises(ConfigError, match=rf"run\.report_to: {name} needs .*pip install"):
            check_installed(tiny_cfg(tmp_path, **{"run.report_to": f"tensorboard,{name}"}))

    import tao_fast.models

    def no_model(*a, **k):
        raise AssertionError("a model loaded")

    monkeypatch.setattr(tao_fast.models, "load_model", no_model)
    (tmp_path / "train.jsonl").write_text(json.dumps({"prompt": "What is 1 + 2?"}) + "\n")
    cfg = tiny_cfg(tmp_path, **{"run.report_to": "tensorboard,wandb", "scoring.scorer":
                                "arithmetic", "data.train": tmp_path / "train.jsonl"})
    with pytest.raises(ConfigError, match=r"run\.report_to: wandb needs.*pip install 'wandb"):
        tao_fast.tune(cfg)
    assert not (tmp_path / "run" / "tensorboard").exists()


def test_a_failing_tracker_warns_once_and_is_dropped(capsys):
    got = []

    class Good:
        def log(self, m, step):
            got.append((step, m))

        def close(self):
            got.append("closed")

    class Bad:
        def log(self, m, step):
            raise RuntimeError("the library broke")

        def close(self):
            raise OSError("and cannot close")

    t = Trackers({"bad": Bad(), "good": Good()})
    t.log({"reward_mean": 1.0}, 1)
    t.log({"reward_mean": 2.0}, 2)
    t.close()
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and "run.report_to: bad log failed (RuntimeError: the " \
                                           "library broke)" in err
    assert got == [(1, {"reward_mean": 1.0}), (2, {"reward_mean": 2.0}), "closed"]


def test_report_to_none_opens_nothing_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # nothing is imported either
    t = open_trackers(tiny_cfg(tmp_path), tmp_path)
    assert not t
    t.log({"reward_mean": 1.0}, 1)
    t.log_eval(result(1.0), 1)
    t.close()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_tune_reports_to_tensorboard_and_survives_a_failing_tracker(tmp_path, tiny_model,
                                                                      monkeypatch, capsys):
    """A 2-step tune with run.report_to=tensorboard,wandb: TensorBoard holds metrics.jsonl's
    values at their global steps and the held-out accuracy; wandb (a stand-in: the package is
    not installed in CI) fails at its second step's log, which warns once and stops nothing."""
    wandb = stand_in_wandb(fail_at_log=3)  # eval_before, step 1, then step 2 fails
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    (tmp_path / "train.jsonl").write_text(
        "".join(json.dumps({"prompt": f"What is {a} + {b}?"}) + "\n" for a, b in ((1, 2), (3, 4))))
    cfg = load_config(overrides=[
        f"model.path={tiny_model}", "model.ops_backend=torch", "rollout.engine=torch",
        f"data.train={tmp_path / 'train.jsonl'}", f"data.eval={tmp_path / 'train.jsonl'}",
        "scoring.scorer=arithmetic", "rollout.n=2", "rollout.max_tokens=3", "eval.max_tokens=3",
        "eval.samples=0", "rl.prompts_per_step=2", "run.steps=2", "run.threads=1",
        "run.progress=false", "run.keep_states=0", "run.report_to=tensorboard,wandb",
        f"run.output_dir={tmp_path / 'run'}"])
    res = tao_fast.tune(cfg)
    run = tmp_path / "run"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["global_step"] for m in lines] == [1, 2]  # training finished, every line there
    err = capsys.readouterr().err
    assert err.count("run.report_to: wandb log failed (OSError: No space left") == 1
    got = scalars(run / "tensorboard")
    assert got["reward_mean"] == [(m["global_step"], pytest.approx(m["reward_mean"]))
                                  for m in lines]
    assert got["eval/accuracy"] == [(0, pytest.approx(res.eval_before.accuracy)),
                                    (2, pytest.approx(res.eval_after.accuracy))]
    assert res.eval_after.accuracy == json.loads((run / "eval_after.json").read_text())[
        "accuracy"]
    assert hparams(run / "tensorboard")["run.report_to"] == "tensorboard,wandb"
    assert [c.get("global_step") for c in wandb.calls["log"]] == [0, 1, 2]
    assert wandb.calls["log"][1]["reward_mean"] == lines[0]["reward_mean"]
    assert wandb.calls["init"][0]["mode"] == "offline"
    assert wandb.calls["finished"] == 1  # closed when dropped, not again at the end
