import pytest

from tao_fast.cli import main
from tao_fast.config import ConfigError, load_config


def test_defaults_and_overrides():
    cfg = load_config(overrides=["rl.lr=3e-5", "rollout.n=4", "run.progress=false", "data.ops=+-"])
    assert cfg.rl.lr == 3e-5 and cfg.rollout.n == 4 and cfg.run.progress is False
    assert cfg.data.ops == "+-"


def test_yaml_and_toml(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("rl:\n  lr: 1e-6\n  kl_coef: 0.01\nrollout:\n  n: 16\n")
    cfg = load_config(y, ["rollout.n=2"])
    assert cfg.rl.lr == 1e-6 and cfg.rl.kl_coef == 0.01 and cfg.rollout.n == 2
    t = tmp_path / "c.toml"
    t.write_text('[scoring]\nscorer = "random"\n[run]\nsteps = 3\n')
    cfg = load_config(t)
    assert cfg.scoring.scorer == "random" and cfg.run.steps == 3


@pytest.mark.parametrize("override, message", [
    ("rl.lrr=1", "rl.lrr: unknown key"),
    ("bogus.x=1", "bogus: unknown key"),
    ("rl.lr=abc", "rl.lr: expected float"),
    ("rl.lr=-1", "rl.lr: must be > 0"),
    ("rollout.n=0", "rollout.n: must be >= 1"),
    ("rollout.n=2.5", "rollout.n: expected int"),
    ("rollout.top_p=1.5", "rollout.top_p"),
    ("rl.algorithm=ppo2", "rl.algorithm: must be one of"),
    ("run.progress=maybe", "run.progress: expected bool"),
    ("rl=3", "rl: expected a section"),
    ("noequals", "expected section.key=value"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(overrides=[override])


def test_file_errors_name_the_file(tmp_path):
    y = tmp_path / "bad.yaml"
    y.write_text("rl:\n  clip_lo: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*rl\.clip_lo: unknown key"):
        load_config(y)
    broken = tmp_path / "broken.yaml"
    broken.write_text("rl: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml: cannot parse"):
        load_config(broken)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_non_utf8_config_is_one_line_naming_the_file(tmp_path, capsys):
    y = tmp_path / "latin1.yaml"
    y.write_bytes("rl:\n  lr: 1e-5\n# caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.yaml:3: not UTF-8 \(column 6\)"):
        load_config(y)
    assert main(["tune", "--config", str(y)]) == 2  # the CLI: one line, no traceback
    assert capsys.readouterr().err == f"tao-fast: error: {y}:3: not UTF-8 (column 6)\n"
    t = tmp_path / "bad.toml"
    t.write_bytes(b"[rl]\nlr = 1e-5 # \xff\n")
    with pytest.raises(ConfigError, match=r"bad\.toml:2: not UTF-8"):
        load_config(t)


@pytest.mark.parametrize("text, line, first, key", [
    ("rl:\n  lr: 1e-5\nrollout:\n  n: 4\nrl:\n  kl_coef: 0.1\n", 5, 1, "rl"),
    ("rl:\n  lr: 1e-5\n  kl_coef: 0.1\n  lr: 3e-5\n", 4, 2, "lr"),
    ("rl: {lr: 1e-5, lr: 2e-5}\n", 1, 1, "lr"),
])
def test_duplicate_yaml_keys_are_errors(tmp_path, text, line, first, key):
    y = tmp_path / "dup.yaml"
    y.write_text(text)
    with pytest.raises(ConfigError, match=rf"dup\.yaml:{line}: duplicate key '{key}' "
                                          rf"\(first at line {first}\)"):
        load_config(y)


def test_duplicate_toml_keys_name_the_file_and_line(tmp_path):
    t = tmp_path / "dup.toml"
    t.write_text("[rl]\nlr = 1e-5\n[run]\nsteps = 2\n[rl]\nkl_coef = 0.1\n")
    with pytest.raises(ConfigError, match=r"dup\.toml: cannot parse: .*line 5"):
        load_config(t)


def test_parse_errors_are_one_line_with_the_line(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("rl:\n  lr: 1\n rollout: 2\n")
    with pytest.raises(ConfigError) as e:
        load_config(broken)
    msg = str(e.value)
    assert "\n" not in msg and "broken.yaml: cannot parse: line 3, column 2" in msg
