"""Atomic writes (tao_fast/fileio.py): all or nothing, with the modes a plain open() or mkdir()
would give (a checkpoint must be readable by a server running as another user)."""
import os
import stat

import pytest

from tao_fast.fileio import atomic_dir, atomic_write_text


def _mode(p):
    return stat.S_IMODE(p.stat().st_mode)


def test_modes_are_those_of_open_and_mkdir(tmp_path):
    (tmp_path / "plain.txt").write_text("x")
    (tmp_path / "plain_dir").mkdir()
    atomic_write_text(tmp_path / "a.txt", "x")
    with atomic_dir(tmp_path / "d") as d:
        (d / "f").write_text("y")
    assert _mode(tmp_path / "a.txt") == _mode(tmp_path / "plain.txt")
    assert _mode(tmp_path / "d") == _mode(tmp_path / "plain_dir")
    if os.umask(0o022) == 0o022:  # the usual umask: others may read and enter
        assert _mode(tmp_path / "a.txt") & 0o044 and _mode(tmp_path / "d") & 0o055 == 0o055
    os.umask(0o022)


def test_atomic_dir_all_or_nothing(tmp_path):
    dest = tmp_path / "ckpt"
    with atomic_dir(dest) as d:
        (d / "v").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_dir(dest) as d:
            (d / "v").write_text("2")
            raise RuntimeError("killed mid-write")
    assert (dest / "v").read_text() == "1" and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    with atomic_dir(dest) as d:  # replaced once complete
        (d / "v").write_text("3")
    assert (dest / "v").read_text() == "3" and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    with atomic_dir(dest, keep_existing=True) as d:  # a cache another process filled first
        (d / "v").write_text("4")
    assert (dest / "v").read_text() == "3" and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
