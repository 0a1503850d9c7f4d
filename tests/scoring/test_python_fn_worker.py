"""The user's scoring function runs in one persistent sandboxed child per scorer: imported once,
its state kept across batches; a batch that kills the child costs that batch only."""
import gc
import inspect
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tao_fast.data import PromptRecord
from tao_fast.scoring import build_scorer, sandbox

USER = '''
import os, time

CALLS = 0
IMPORTS = globals().get("IMPORTS", 0) + 1  # a re-import in the same process would show here

def count(prompt, candidates):
    global CALLS
    CALLS += 1
    if prompt == "exit":
        os._exit(7)
    if prompt == "segfault":
        import faulthandler
        faulthandler._read_null()  # a real fault: even a pid namespace's init dies of it
    if prompt == "sleep":
        time.sleep(30)
    if prompt == "hog":
        x = bytearray(1 << 30)  # over memory_mb
    if prompt == "raise_exit":
        raise SystemExit(3)  # not an Exception: it leaves the sandbox worker's own loop
    if prompt == "flood":
        while True:
            os.write(2, b"x" * 10 ** 6)
    return [{"reward": float(CALLS), "imports": IMPORTS, "pid": os.getpid()} for _ in candidates]

def write_here(prompt, candidates):  # prompt: a path in the trainer's cwd
    try:
        with open(prompt, "w") as f:
            f.write("overwritten")
        return [1.0 for _ in candidates]
    except OSError:
        return [0.0 for _ in candidates]

def scratch(prompt, candidates):  # the work dir ($TMPDIR) lasts as long as the child
    path = os.path.join(os.environ["TMPDIR"], "note.txt")
    if prompt == "write":
        with open(path, "w") as f:
            f.write("kept")
    with open(path) as f:
        text = f.read()
    return [float(text == "kept") for _ in candidates]

def echo_size(record, candidates):
    return [{"reward": float(len(c)), "echo": c} for c in candidates]
'''


@pytest.fixture
def user_file(tmp_path, monkeypatch):
    (tmp_path / "persist_scorers.py").write_text(USER)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def recs(*qs):
    return [PromptRecord([{"role": "user", "content": q}]) for q in qs]


def batch(scorer, prompt="q", n=2):
    res = scorer.score(recs(prompt), [[f"c{i}" for i in range(n)]])
    return res.rewards[0], res.details[0]


def alive(pid: int) -> bool:
    """Whether pid is a live process (not a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def family(pid: int) -> list[int]:
    """pid and its descendants (the pid namespace's waiter and the worker under it)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for tid in os.listdir(f"/proc/{p}/task") if os.path.isdir(f"/proc/{p}/task") else ():
            try:
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    todo += [int(c) for c in f.read().split()]
            except OSError:
                pass
    return out


def wait_gone(pids, limit_s=3.0) -> list[int]:
    t0 = time.monotonic()
    while (left := [p for p in pids if alive(p)]) and time.monotonic() - t0 < limit_s:
        time.sleep(0.05)
    return left


# ---- persistence ---------------------------------------------------------------------------
def test_module_is_imported_once_and_its_state_survives(user_file):
    s = build_scorer("python:persist_scorers:count")
    try:
        got = [batch(s) for _ in range(3)]
        assert [r for r, _ in got] == [[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]
        assert {d["imports"] for _, ds in got for d in ds} == {1}
        assert len({d["pid"] for _, ds in got for d in ds}) == 1  # one process served them all
        assert s._worker.starts == 1  # the import check's start was the only one
    finally:
        s.close()


def test_an_exit_fails_that_batch_and_the_next_gets_a_fresh_worker(user_file):
    s = build_scorer("python:persist_scorers:count", failure_value=-1.0)
    try:
        assert batch(s)[0] == [1.0, 1.0]
        rewards, details = batch(s, "exit")
        assert rewards == [-1.0, -1.0] and "worker exited with code 7" in details[0]["error"]
        assert batch(s)[0] == [1.0, 1.0]  # re-imported: the count restarted
        rewards, details = batch(s, "segfault")
        assert rewards == [-1.0, -1.0] and "SIGSEGV" in details[0]["error"], details
        assert batch(s)[0] == [1.0, 1.0] and s._worker.starts == 3
    finally:
        s.close()


def test_a_hang_times_out_and_the_next_batch_works(user_file):
    s = build_scorer("python:persist_scorers:count", timeout_s=2)
    try:
        assert batch(s)[0] == [1.0, 1.0]
        t0 = time.monotonic()
        rewards, details = batch(s, "sleep")
        assert rewards == [0.0, 0.0] and "timed out after 2 s" in details[0]["error"]
        assert time.monotonic() - t0 < 5
        assert batch(s)[0] == [1.0, 1.0]
    finally:
        s.close()


def test_raising_out_of_the_worker_and_floods_cost_one_batch(user_file):
    s = build_scorer("python:persist_scorers:count", timeout_s=5)
    try:
        rewards, details = batch(s, "raise_exit")
        assert rewards == [0.0, 0.0] and "SystemExit" in details[0]["error"]
        assert batch(s)[0] == [1.0, 1.0]
        rewards, details = batch(s, "flood")
        assert rewards == [0.0, 0.0] and "over the sandbox's cap" in details[0]["error"]
        assert batch(s)[0] == [1.0, 1.0]
    finally:
        s.close()


def test_large_batches_travel_both_ways(user_file):
    """Requests and replies far over a pipe's buffer: written while the reply is read."""
    s = build_scorer({"type": "python", "spec": "python:persist_scorers:echo_size",
                      "record": True})
    try:
        cands = [[chr(97 + i) * 300_000 for i in range(4)], ["x" * 70_000]]
        res = s.score(recs("a", "b"), cands)
        assert res.rewards == [[300_000.0] * 4, [70_000.0]] and not res.failures
        assert res.details[0][3]["echo"] == cands[0][3]
    finally:
        s.close()


# ---- the limits still hold in the persistent worker ----------------------------------------
def test_memory_limit_holds_and_a_fresh_worker_follows(user_file):
    s = build_scorer("python:persist_scorers:count", memory_mb=512)
    try:
        assert batch(s)[0] == [1.0, 1.0]
        rewards, details = batch(s, "hog")
        assert rewards == [0.0, 0.0] and "MemoryError" in details[0]["error"]
        assert batch(s)[0] == [1.0, 1.0] and s._worker.starts == 2  # restarted after it
    finally:
        s.close()


def test_writes_to_the_cwd_are_refused_and_the_work_dir_is_kept(user_file):
    s = build_scorer("python:persist_scorers:write_here")
    try:
        victim = user_file / "victim.txt"
        victim.write_text("keep me")
        for _ in range(2):  # the second batch meets the same, still guarded, process
            res = s.score(recs(str(victim), str(user_file / "new.txt")), [["x"], ["y"]])
            assert res.rewards == [[0.0], [0.0]]
        assert victim.read_text() == "keep me" and not (user_file / "new.txt").exists()
    finally:
        s.close()
    s = build_scorer("python:persist_scorers:scratch")
    try:
        assert batch(s, "write")[0] == [1.0, 1.0]
        assert batch(s, "read")[0] == [1.0, 1.0]  # written by the batch before
    finally:
        s.close()


# ---- no child outlives the scorer ----------------------------------------------------------
def test_close_and_garbage_collection_leave_no_child(user_file):
    s = build_scorer("python:persist_scorers:count")
    batch(s)
    pids = family(s._worker.pid)
    assert pids and all(alive(p) for p in pids)
    s.close()
    assert s._worker.pid is None and wait_gone(pids) == []
    s = build_scorer("python:persist_scorers:count")
    pids = family(s._worker.pid)
    del s
    gc.collect()
    assert wait_gone(pids) == []


@pytest.mark.parametrize("how", ["exit", "kill"])
def test_no_child_outlives_the_trainer(user_file, how):
    """At interpreter exit the finalizer stops the child; a trainer killed outright while its
    worker is busy (not reading its stdin, so no EOF ends it) takes it along: PR_SET_PDEATHSIG."""
    script = textwrap.dedent(f"""
        import os, signal, threading, time
        from tao_fast.data import PromptRecord
        from tao_fast.scoring import build_scorer
        s = build_scorer("python:persist_scorers:count")
        print(s._worker._box[0].root, *family(s._worker.pid), flush=True)
        if {how!r} == "kill":
            rec = PromptRecord([{{"role": "user", "content": "sleep"}}])
            threading.Thread(target=s.score, args=([rec], [["x"]]), daemon=True).start()
            time.sleep(0.5)
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    script = inspect.getsource(alive) + inspect.getsource(family) + script
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", script], cwd=user_file, capture_output=True,
                         text=True, timeout=60, env={**os.environ, "PYTHONPATH": root})
    root, *pids = out.stdout.split() or [None]
    assert pids, out.stderr
    shutil.rmtree(root, ignore_errors=True)  # a killed trainer leaves the child's empty root
    assert wait_gone([int(p) for p in pids]) == [], pids


# ---- sandbox.Worker itself -----------------------------------------------------------------
def cpu_limits(payload, emit):
    import resource

    if payload.get("forge"):  # what untrusted code in the worker could send: a bogus CPU total
        emit({"_done": True, "cpu_s": 1e9})
    emit({"pid": __import__("os").getpid(), "cpu": resource.getrlimit(resource.RLIMIT_CPU)})


def test_worker_rearms_the_cpu_limit_each_call_and_retires_when_spent():
    w = sandbox.Worker(cpu_limits, timeout_s=4, memory_mb=256, cpu_calls=3)
    try:
        first, second = w.call({}), w.call({})
        assert first.fresh and not second.fresh and first.done and second.done
        (soft, hard), (soft2, hard2) = first.messages[0]["cpu"], second.messages[0]["cpu"]
        assert hard == hard2 == 15 and 5 <= soft <= soft2 <= 7  # one call's 5 s on what it used
        assert second.cpu_s is not None and second.exit_code is None  # still alive
        forged = w.call({"forge": True})  # "nearly spent": retired after answering
        assert forged.done and forged.exit_code is not None and w.pid is None
        assert w.call({}).fresh and w.starts == 2
    finally:
        w.close()


def test_worker_found_dead_between_calls_is_replaced_silently():
    w = sandbox.Worker(cpu_limits, timeout_s=4, memory_mb=256)
    try:
        assert w.call({}).done
        for pid in reversed(family(w.pid)):
            os.kill(pid, signal.SIGKILL)
        wait_gone(family(w.pid))
        res = w.call({})
        assert res.done and res.fresh and w.starts == 2
    finally:
        w.close()


def spin_past_soft_limit(payload, emit):
    import math
    import os
    import resource

    hard = resource.getrlimit(resource.RLIMIT_CPU)[1]  # a call whose CPU budget is 1 s
    resource.setrlimit(resource.RLIMIT_CPU, (math.ceil(sum(os.times()[:2])) + 1, hard))
    while True:
        pass


def test_the_per_call_cpu_limit_ends_the_call():
    """SIGXCPU at the soft limit ends the call, even where the worker is a pid namespace's init
    (which ignores signals it has no handler for)."""
    w = sandbox.Worker(spin_past_soft_limit, timeout_s=20, memory_mb=256)
    try:
        res = w.call({})
        assert not res.timed_out and "CPU time limit" in res.error and res.wall_s < 15, res
        assert w.pid is None
    finally:
        w.close()


def write_mb(payload, emit):
    import os

    with open("blob", "wb") as f:  # in the work dir, the child's cwd
        f.write(b"x" * (payload["mb"] << 20))
    emit({"pid": os.getpid()})


def test_without_a_tmpfs_an_outgrown_work_dir_retires_the_child():
    w = sandbox.Worker(write_mb, timeout_s=10, memory_mb=256, namespaces=False, disk_mb=1)
    try:
        first, second = w.call({"mb": 0}), w.call({"mb": 0})
        assert not first.layers["tmpfs"] and first.messages == second.messages  # same process
        big = w.call({"mb": 2})
        assert big.done and w.pid is None  # answered, then retired: 2 MB > disk_mb
        assert w.call({"mb": 0}).fresh and w.starts == 2
    finally:
        w.close()
