import subprocess
import sys

import pytest

from tao_fast.cli import main
from tao_fast.eval import wilson_interval


@pytest.mark.parametrize("cmd", [[], ["demo"], ["tune"], ["eval"], ["report"], ["scale"],
                                 ["ingest"]])
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
