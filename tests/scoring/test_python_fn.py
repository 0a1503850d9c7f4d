"""A user's scoring function runs sandboxed: errors, hangs and memory hogs cost only rewards."""
import os
import signal
import time

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

def write_outside(prompt, candidates):  # prompt: a path outside the sandbox's work directory
    try:
        with open(prompt, "w") as f:
            f.write("overwritten")
        return [1.0 for _ in candidates]
    except OSError:
        return [0.0 for _ in candidates]

def write_scratch(prompt, candidates):
    import tempfile
    with tempfile.NamedTemporaryFile("w") as f:  # $TMPDIR: the work directory
        f.write("scratch")
    return [0.5 for _ in candidates]

def open_socket(prompt, candidates):
    import socket
    try:
        socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()
        return [1.0 for _ in candidates]
    except OSError:
        return [0.0 for _ in candidates]

def spawn(prompt, candidates):  # prompt: the seconds `sleep` is given (a unique marker)
    try:
        import subprocess
        subprocess.Popen(["sleep", prompt], start_new_session=True)  # leaves the group too
    except (ImportError, OSError):
        pass
    return [0.25 for _ in candidates]

def hold_pipe(prompt, candidates):
    try:
        import subprocess
        subprocess.Popen(["sleep", prompt])  # inherits stdout, the reply's pipe
    except (ImportError, OSError):
        pass
    return [0.75 for _ in candidates]

def fork_and_hold(prompt, candidates):  # needs the audit hook off: os.fork is refused by it
    import os
    if os.fork() == 0:
        os.execvp("sleep", ["sleep", prompt])  # a grandchild holding every inherited pipe
    return [0.5 for _ in candidates]

def whoami(prompt, candidates):
    return [float(os.getuid()) for _ in candidates]

def by_record(record, candidates):  # record=true: the whole prompt line
    want = record["answers"][record["task"]]
    return [{"reward": float(c == want), "why": f"{record['task']}: wanted {want}",
             "turns": len(record["messages"])} for c in candidates]

def half_details(prompt, candidates):
    return [1.0, {"reward": 0.5, "note": "partial"}][:len(candidates)]

def tagged(prompt, candidates):
    return [{"reward": 0.25, "tag": f"seen {prompt}"} for _ in candidates]

def bad_details(prompt, candidates):
    return [{"score": 1.0} for _ in candidates]

def read_own_file(prompt, candidates):
    with open("data/answer.txt") as f:  # relative to the trainer's working directory
        return [float(c == f.read().strip()) for c in candidates]
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


# ---- the sandbox holds for the user's function ---------------------------------------------
def sleeping(marker: str) -> list[int]:
    """Pids of `sleep MARKER` processes still alive."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read().split(b"\0")[:2] == [b"sleep", marker.encode()]:
                    out.append(int(pid))
        except OSError:
            pass
    return out


def test_user_scorer_cannot_write_outside_its_work_dir(user_file):
    victim = user_file / "victim.txt"  # in the user's own directory
    victim.write_text("keep me")
    res = build_scorer("python:my_scorers:write_outside").score(recs(str(victim)), [["x"]])
    assert res.rewards == [[0.0]] and victim.read_text() == "keep me"
    res = build_scorer("python:my_scorers:write_outside").score(
        recs(str(user_file / "new.txt")), [["x"]])
    assert res.rewards == [[0.0]] and not (user_file / "new.txt").exists()
    res = build_scorer("python:my_scorers:write_scratch").score(recs("a"), [["x"]])
    assert res.rewards == [[0.5]]  # its own scratch space still works


def test_user_scorer_does_not_run_as_root(user_file):
    res = build_scorer("python:my_scorers:whoami").score(recs("a"), [["x"]])
    assert res.rewards == [[float(os.getuid() if os.geteuid() else 65534)]]


def test_user_scorer_cannot_open_a_socket(user_file):
    res = build_scorer("python:my_scorers:open_socket").score(recs("a"), [["x", "y"]])
    assert res.rewards == [[0.0, 0.0]]


def test_user_scorer_leaves_no_process_behind(user_file):
    marker = "1234.125"
    try:
        res = build_scorer("python:my_scorers:spawn").score(recs(marker), [["x"]])
        assert res.rewards == [[0.25]]
        time.sleep(0.2)
        assert sleeping(marker) == []
    finally:
        for pid in sleeping(marker):
            os.kill(pid, signal.SIGKILL)


def test_result_is_kept_when_a_child_holds_the_pipe(user_file):
    marker = "1234.25"
    try:
        t0 = time.monotonic()
        res = build_scorer("python:my_scorers:hold_pipe", timeout_s=10).score(recs(marker), [["x"]])
        assert res.rewards == [[0.75]] and res.num_failures == 0
        assert time.monotonic() - t0 < 5  # not the 10 s timeout
        assert sleeping(marker) == []
    finally:
        for pid in sleeping(marker):
            os.kill(pid, signal.SIGKILL)


def test_without_the_audit_hook_the_process_layers_still_hold(user_file):
    """The worker itself with the audit hook off (what a C extension that forks would face):
    a grandchild that holds the reply's pipe does not cost the reply, and is gone after."""
    from tao_fast.scoring import sandbox
    from tao_fast.scoring.sandbox_worker import call_user

    marker = "1234.375"
    payload = {"target": "my_scorers", "func": "fork_and_hold", "cwd": str(user_file),
               "path": [str(user_file)], "items": [{"prompt": marker, "candidates": ["x"]}]}
    try:
        t0 = time.monotonic()
        res = sandbox.run(call_user, payload, timeout_s=10, memory_mb=512, site_packages=True,
                          guard=False, read_dirs=[str(user_file)])
        assert {"results": [{"rewards": [0.5]}]} in res.messages, res
        assert time.monotonic() - t0 < 5 and not res.timed_out
        time.sleep(0.2)
        assert sleeping(marker) == []
    finally:
        for pid in sleeping(marker):
            os.kill(pid, signal.SIGKILL)


def test_user_scorer_reads_its_own_files(user_file):
    (user_file / "data").mkdir()
    (user_file / "data" / "answer.txt").write_text("42\n")
    res = build_scorer("python:my_scorers:read_own_file").score(recs("q"), [["42", "41"]])
    assert res.rewards == [[1.0, 0.0]]


def test_record_form_reads_every_field_and_details_come_back(user_file):
    rec = PromptRecord([{"role": "system", "content": "s"}, {"role": "user", "content": "q"}],
                       {"task": "math", "answers": {"math": "4", "sql": "x"}})
    s = build_scorer({"type": "python", "spec": "python:my_scorers:by_record", "record": True})
    res = s.score([rec], [["4", "5"]])
    assert res.rewards == [[1.0, 0.0]] and res.num_failures == 0
    assert res.details == [[{"why": "math: wanted 4", "turns": 2}] * 2]
    res = build_scorer("python:my_scorers:half_details").score(recs("a"), [["x", "y"]])
    assert res.rewards == [[1.0, 0.5]] and res.details == [[{}, {"note": "partial"}]]
    res = build_scorer("python:my_scorers:bad_details").score(recs("a"), [["x"]])
    assert res.num_failures == 1 and "without 'reward'" in res.details[0][0]["error"]


def test_the_two_argument_form_still_gets_the_text(user_file):
    """Without record: true the function gets the last user message, as before."""
    s = build_scorer("python:my_scorers:by_record")
    res = s.score(recs("q"), [["4"]])  # a str has no ["answers"]: the prompt's error
    assert res.num_failures == 1 and "TypeError" in res.details[0][0]["error"]


def test_details_reach_the_eval_records(user_file, tiny_model):
    from tao_fast.eval import evaluate

    ev = evaluate(str(tiny_model), recs("a"), build_scorer("python:my_scorers:tagged"))
    assert ev.records[0]["score"] == 0.25 and ev.records[0]["tag"] == "seen a"
