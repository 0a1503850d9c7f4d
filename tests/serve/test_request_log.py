"""The request log's writer: whole lines only (a failed partial write is cut back), atomic
gzip rotation by size, age and close, drops counted, orphans of dead processes rotated,
redaction in the sandbox."""
import errno
import gzip
import json
import os
import time

import pytest

from tao_fast.serve.request_log import ROTATED, RequestLog


def rec(i, text="hello"):
    return {"request": {"messages": [{"role": "user", "content": f"{text} {i}"}]},
            "response": None, "request_id": f"r{i}", "status": 200}


def wait(cond, timeout_s=20):
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def rotated(d):
    return sorted(f for f in os.listdir(d) if ROTATED.match(f))


def lines_of(d):
    out = []
    for f in rotated(d):
        out += gzip.open(d / f, "rt").read().splitlines()
    act = d / f"active-{os.getpid()}.jsonl"
    if act.exists():
        out += act.read_text().splitlines()
    return [json.loads(x)["request_id"] for x in out]


def test_partial_write_on_enospc_is_cut_back_and_retried(tmp_path):
    log = RequestLog(tmp_path, retry_s=0.1)
    real, calls = os.write, {"n": 0}

    def flaky(fd, data):  # the 2nd record: half of it lands, then the disk is full
        calls["n"] += 1
        if calls["n"] == 2:
            real(fd, bytes(data[:len(data) // 2]))
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data)

    log._write = flaky
    log.submit(rec(0))
    wait(lambda: log.stats["written"] == 1)
    log.submit(rec(1))
    wait(lambda: log.stats["errors"] == 1)
    assert "ENOSPC" in log.health()["last_error"] or "No space" in log.health()["last_error"]
    assert log.health()["state"] == "degraded"
    wait(lambda: log.stats["written"] == 2)  # retried: whole this time
    assert log.health()["state"] == "ok"
    log.close()
    assert lines_of(tmp_path) == ["r0", "r1"]


def test_rotation_by_size_age_and_close_is_atomic(tmp_path):
    log = RequestLog(tmp_path, max_bytes=2000, rotate_s=3600)
    for i in range(40):
        log.submit(rec(i, "x" * 100))
    wait(lambda: log.stats["written"] == 40)
    wait(lambda: log.stats["rotated"] >= 1)
    names = rotated(tmp_path)
    assert names and all(ROTATED.match(n) for n in names)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no temp file left
    log.close()
    assert lines_of(tmp_path) == [f"r{i}" for i in range(40)]
    assert not list(tmp_path.glob("active-*"))
    seqs = [int(ROTATED.match(n).group(2)) for n in rotated(tmp_path)]
    assert seqs == list(range(1, len(seqs) + 1))

    aged = RequestLog(tmp_path, rotate_s=0.3)  # a second process's log: seq goes on
    aged.submit(rec(99))
    wait(lambda: aged.stats["rotated"] == 1)
    assert int(ROTATED.match(rotated(tmp_path)[-1]).group(2)) == len(seqs) + 1
    aged.close()
    assert aged.stats["rotated"] == 1  # nothing left to rotate at close


def test_full_queue_drops_and_counts(tmp_path):
    log = RequestLog(tmp_path / "a-file" / "logs", queue_size=5, retry_s=60)
    (tmp_path / "a-file").write_text("not a directory")
    kept = sum(log.submit(rec(i)) for i in range(50))
    assert kept < 50 and log.stats["dropped"] == 50 - kept
    log.close(timeout_s=5)


def test_orphaned_active_file_of_a_dead_process_is_rotated(tmp_path):
    orphan = tmp_path / "active-999999999.jsonl"  # no such pid
    orphan.write_text(json.dumps({"request_id": "old"}) + "\n" + '{"request_id": "cut sh')
    log = RequestLog(tmp_path)
    log.submit(rec(1))
    log.close()
    assert not orphan.exists()
    assert sorted(lines_of(tmp_path)) == ["old", "r1"]  # the cut line is gone


REDACT = '''
def scrub(record):
    text = record["request"]["messages"][0]["content"]
    if "secret" in text:
        return None
    record["request"]["messages"][0]["content"] = text.replace("hello", "[greeting]")
    return record
'''


def test_redaction_hook_runs_in_the_sandbox(tmp_path, monkeypatch):
    from tao_fast.serve.redact import Redactor

    (tmp_path / "hook.py").write_text(REDACT)
    monkeypatch.chdir(tmp_path)
    red = Redactor("python:hook.py:scrub")
    log = RequestLog(tmp_path / "logs", redactor=red)
    log.submit(rec(0))
    log.submit(rec(1, "my secret"))
    log.close()
    red.close()
    f = rotated(tmp_path / "logs")
    out = [json.loads(x) for x in gzip.open(tmp_path / "logs" / f[0], "rt")]
    assert [r["request"]["messages"][0]["content"] for r in out] == ["[greeting] 0"]
    assert log.stats["redacted_out"] == 1
    with pytest.raises(ValueError, match="expected python:module:function"):
        Redactor("hook.scrub")
