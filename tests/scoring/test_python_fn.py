"""A user's scoring function runs sandboxed: errors, hangs and memory hogs cost only rewards."""
import pytest

from tao_fast.data import PromptRecord
from tao_fast.scoring import build_scorer

USER = '''
import os, time

def length(prompt, candidates):
    return [float(len(c)) for c in candidates]

def picky(prompt, candidates):
    if "boom" in prompt:
        raise RuntimeError("boom")
    return [1.0 for _ in candidates]

def hang(prompt, candidates):
    while True:
        pass

def hog(prompt, candidates):
    x = bytearray(4 << 30)
    return [0.0 for _ in candidates]

def wrong_count(prompt, candidates):
    return [1.0]

def chatty(prompt, candidates):
    print("debug output must not break the protocol")
    return [0.5 for _ in candidates]
'''


@pytest.fixture
def user_file(tmp_path, monkeypatch):
    (tmp_path / "my_scorers.py").write_text(USER)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def recs(*qs):
    return [PromptRecord([{"role": "user", "content": q}]) for q in qs]


def test_module_and_file_specs(user_file):
    for spec in ("python:my_scorers:length", f"python:{user_file / 'my_scorers.py'}:length"):
        res = build_scorer(spec).score(recs("a"), [["xy", "xyz"]])
        assert res.rewards == [[2.0, 3.0]] and res.num_failures == 0
    res = build_scorer("python:my_scorers:chatty").score(recs("a"), [["x"]])
    assert res.rewards == [[0.5]]


def test_errors_get_the_failure_value(user_file):
    s = build_scorer("python:my_scorers:picky", failure_value=-1.0)
    res = s.score(recs("fine", "boom"), [["a", "b"], ["c", "d"]])
    assert res.rewards == [[1.0, 1.0], [-1.0, -1.0]] and res.num_failures == 2
    assert "boom" in res.details[1][0]["error"]
    res = build_scorer("python:my_scorers:wrong_count").score(recs("a"), [["x", "y"]])
    assert res.num_failures == 2 and "returned 1 rewards" in res.details[0][0]["error"]


def test_hang_and_memory_are_contained(user_file):
    res = build_scorer("python:my_scorers:hang", timeout_s=2).score(recs("a"), [["x"]])
    assert res.rewards == [[0.0]] and "timed out" in res.details[0][0]["error"]
    res = build_scorer("python:my_scorers:hog", memory_mb=512).score(recs("a"), [["x"]])
    assert res.num_failures == 1 and "MemoryError" in res.details[0][0]["error"]


def test_bad_specs_fail_before_generation(user_file):
    with pytest.raises(ValueError, match="cannot load"):
        build_scorer("python:no_such_module:f")
    with pytest.raises(ValueError, match="has no callable 'nope'"):
        build_scorer("python:my_scorers:nope")
    with pytest.raises(ValueError, match="expected 'python:module:function'"):
        build_scorer("python:only_module")
    with pytest.raises(ValueError, match="unknown scorer"):
        build_scorer("bleu")
