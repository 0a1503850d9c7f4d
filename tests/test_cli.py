import subprocess
import sys

import pytest

from tao_fast.cli import main
from tao_fast.eval import wilson_interval


@pytest.mark.parametrize("cmd", [[], ["demo"], ["tune"], ["eval"], ["report"], ["scale"],
                                 ["profile"], ["ingest"]])
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main(cmd + ["--help"])
    assert e.value.code == 0
    assert "usage: tao-fast" in capsys.readouterr().out


def test_bad_override_is_a_clear_error(capsys):
    assert main(["demo", "rl.lr=abc"]) == 2
    assert "rl.lr: expected float" in capsys.readouterr().err


def test_missing_config_file(capsys, tmp_path):
    assert main(["tune", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("argv,msg", [
    (["tune"], "give --config FILE for a new run or --resume RUN_DIR"),
    (["tune", "--resume", "/nonexistent/run"], "no config.yaml there"),
    (["report", "/nonexistent/run"], "not a tao-fast run directory"),
    (["scale", "--n", "1,2", "--out", "/nonexistent/x"], "every N must be >= 2"),
    (["scale", "--n", "two"], "comma-separated integers"),
    (["eval", "--scorer", "{type: [", "--n", "1"], "not a valid mapping"),
    (["eval", "--n", "0"], "--n must be >= 1"),
    (["eval", "--n", "1", "--temperature", "0", "--samples", "3"], "--samples N needs"),
    (["eval", "--n", "1", "--out", "/nonexistent/dir/e.json"], "--out /nonexistent/dir/e.json: "
                                                              "cannot write there"),
])
def test_command_errors_are_one_clear_line(argv, msg, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err


def test_console_script_installed():
    out = subprocess.run([sys.executable, "-m", "tao_fast.cli", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "demo" in out and "tune" in out and "eval" in out


def test_wilson_interval_hand_values():
    # k=0, n=10: upper bound z^2/(n+z^2) = 3.8415/13.8415 = 0.2775
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    # k=36, n=200 (18%): 0.1331 .. 0.2385
    assert wilson_interval(36, 200) == pytest.approx((0.1331, 0.2385), abs=1e-3)


def test_eval_flags_set_the_config_keys_they_name(tmp_path):
    """tao-fast eval runs under a TaoConfig: its defaults, a config file, overrides, then each
    flag given (and only those)."""
    from tao_fast.cli import build_parser, eval_config
    from tao_fast.config import ConfigError, TaoConfig

    parse = build_parser().parse_args
    cfg, sampled = eval_config(parse(["eval"]))
    assert cfg == TaoConfig() and not sampled  # eval.max_tokens is the runs' default (64)
    (tmp_path / "c.yaml").write_text("eval: {max_tokens: 12}\nrollout: {strategy: cot}\n")
    cfg, sampled = eval_config(parse(["eval", "--config", str(tmp_path / "c.yaml"),
                                      "--temperature", "0.5", "--samples", "3",
                                      "--seed", "4", "--model", "yes", "run.threads=1"]))
    assert (cfg.eval.max_tokens, cfg.rollout.strategy, cfg.rollout.temperature,
            cfg.eval.samples, cfg.run.seed, cfg.model.path, cfg.run.threads) == (
        12, "cot", 0.5, 3, 4, "yes", 1) and sampled
    cfg, _ = eval_config(parse(["eval", "--config", str(tmp_path / "c.yaml"),
                                "--max-tokens", "7", "--strategy", "plain"]))
    assert (cfg.eval.max_tokens, cfg.rollout.strategy) == (7, "plain")
    with pytest.raises(ConfigError, match="--samples N needs --temperature > 0"):
        eval_config(parse(["eval", "--samples", "2"]))


def _a_killed_run(d, train="prompts.jsonl"):
    """A run directory as a killed tune leaves it: config.yaml, a state, some metrics."""
    from tao_fast.config import load_config, save_config

    (d / "state" / "step-000002").mkdir(parents=True)
    (d / "state" / "step-000002" / "state.json").write_text("{}")
    (d / "state" / "latest").write_text("step-000002")
    (d / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    (d / "manifest.jsonl").write_text('{"round": 1}\n')
    save_config(load_config(None, [f"data.train={train}", f"run.output_dir={d}"]),
                d / "config.yaml")
    return sorted(p.relative_to(d) for p in d.rglob("*"))


def test_demo_never_touches_a_foreign_run(tmp_path, capsys):
    """A typo into a killed run's directory, or a demo pointed at another run's directory:
    refused with one line, and every file stays."""
    files = _a_killed_run(tmp_path)
    assert main(["demo", "--out", str(tmp_path), "rl.lrr=1"]) == 2
    assert "rl.lrr: unknown key" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path)]) == 2
    assert "holds a run that is not this demo's" in capsys.readouterr().err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == files


def test_demo_starts_its_own_run_over(tmp_path):
    from tao_fast.cli import DEMO, _start_demo_over
    from tao_fast.config import load_config

    _a_killed_run(tmp_path, train="builtin:arithmetic")
    (tmp_path / "checkpoint-round1").mkdir()
    (tmp_path / "notes.txt").write_text("mine")  # not a demo output: stays
    _start_demo_over(load_config(None, [f"run.output_dir={tmp_path}"], base=DEMO))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "notes.txt"]
