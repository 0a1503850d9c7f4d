"""Execution verifiers and their sandbox: right answers scored right, hostile ones contained."""
from __future__ import annotations

import hashlib
import os
import socket
import sqlite3
import time

import pytest

from tao_fast.config import ConfigError
from tao_fast.data.prompts import PromptRecord
from tao_fast.scoring import build_scorer, sandbox
from tao_fast.scoring.code_exec import last_fence, split_tests
from tao_fast.scoring.sql_exec import SqlExecScorer, _run_queries

ADD_TESTS = "assert add(1, 2) == 3\nassert add(2, 2) == 4\nassert add(-1, 1) == 0\n"


def rec(**meta) -> PromptRecord:
    return PromptRecord([{"role": "user", "content": "q"}], meta)


def probe(payload, emit):
    import os

    emit({"uid": os.getuid(), "cwd": os.getcwd()})


@pytest.fixture(scope="module")
def layers():
    res = sandbox.run(probe, {}, timeout_s=10)
    assert res.started and res.done, res.error
    return res.layers


def nobody_processes() -> int:
    n = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            n += os.stat(f"/proc/{pid}").st_uid == sandbox.NOBODY
        except OSError:
            pass
    return n


def wait_no_nobody(limit_s: float = 3.0) -> int:
    t0 = time.monotonic()
    while (n := nobody_processes()) and time.monotonic() - t0 < limit_s:
        time.sleep(0.05)
    return n


# ------------------------------------------------------------------------------------ sandbox

def test_sandbox_runs_worker_with_layers(layers):
    res = sandbox.run(probe, {}, timeout_s=10)
    assert res.done and not res.timed_out and res.messages[0]["cwd"].endswith("/work")
    if os.geteuid() == 0:  # root drops to nobody and gets its own namespaces here
        assert layers["uid"] == sandbox.NOBODY and res.messages[0]["uid"] == sandbox.NOBODY
        assert layers["netns"] and layers["pidns"]


def spin(payload, emit):
    emit({"started": True})
    while True:
        pass


def test_infinite_loop_killed_fast():
    t0 = time.monotonic()
    res = sandbox.run(spin, {}, timeout_s=1.0)
    assert res.timed_out and res.started and not res.done
    assert res.messages == [{"started": True}]  # what it emitted before the kill survives
    assert time.monotonic() - t0 < 4


def flood_fd(payload, emit):
    import os

    while True:
        os.write(1, b"x" * 10 ** 6)


def flood_print(payload, emit):
    while True:
        print("x" * 10 ** 6)


def test_output_floods_are_capped():
    res = sandbox.run(flood_fd, {}, timeout_s=5)
    assert res.flooded and len(res.stderr) <= sandbox.STDERR_CAP and res.wall_s < 4
    res = sandbox.run(flood_print, {}, timeout_s=1.0)
    assert res.timed_out and len(res.stderr) <= sandbox.STDERR_CAP + 10


def hog(payload, emit):
    blocks = []
    try:
        while True:
            blocks.append(bytearray(10 ** 7))
    except MemoryError:
        emit({"mb": len(blocks) * 10})


def test_memory_hog_hits_the_limit():
    res = sandbox.run(hog, {}, timeout_s=10, memory_mb=200)
    assert res.done and res.messages[0]["mb"] < 200


def attempts(payload, emit):
    import os

    def attempt(name, fn):
        try:
            fn()
            emit({name: "allowed"})
        except BaseException as e:  # noqa: BLE001
            emit({name: f"{type(e).__name__}: {e}"})

    def connect():
        import socket

        socket.create_connection(("127.0.0.1", payload["port"]), timeout=1).close()

    attempt("connect", connect)
    attempt("remove", lambda: os.remove(payload["victim"]))
    attempt("write_outside", lambda: open(payload["victim"] + ".new", "w").close())
    attempt("write_inside", lambda: os.close(os.open("scratch.txt", os.O_WRONLY | os.O_CREAT)))
    if payload["guard"]:  # with the guard off these would really run
        attempt("fork", os.fork)
        attempt("ctypes", lambda: __import__("ctypes"))
        attempt("subprocess", lambda: __import__("subprocess"))
        attempt("kill", lambda: os.kill(-1, 0))


@pytest.mark.parametrize("guard", [True, False])
def test_network_and_files_outside_are_refused(tmp_path, layers, guard):
    if not guard and not layers["netns"]:
        pytest.skip("without the guard and a network namespace nothing stops a connect")
    files_held = guard or os.geteuid() == 0  # unguarded: only the drop to nobody protects them
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    server = socket.create_server(("127.0.0.1", 0))
    try:
        res = sandbox.run(attempts, {"port": server.getsockname()[1], "victim": str(victim),
                                     "guard": guard}, timeout_s=10, guard=guard)
    finally:
        server.close()
    got = {k: v for m in res.messages for k, v in m.items()}
    assert got["write_inside"] == "allowed"
    for name in ("connect", "fork", "ctypes", "subprocess", "kill"):
        if name in got:
            assert got[name] != "allowed", (name, got)
    if files_held:
        assert got["remove"] != "allowed" and got["write_outside"] != "allowed", got
        assert victim.read_text() == "keep me" and not (tmp_path / "victim.txt.new").exists()


def bounded_forks(payload, emit):
    import os
    import time

    made = 0
    for _ in range(40):
        try:
            if os.fork() == 0:
                time.sleep(30)
                os._exit(0)
        except OSError:
            break
        made += 1
    emit({"made": made})
    time.sleep(30)


def fork_bomb(payload, emit):
    import os

    emit({"go": True})
    while True:
        try:
            if os.fork() == 0:
                os.setsid()  # try to leave the process group too
        except OSError:
            pass


def test_fork_limits_hold_without_guard(layers):
    if layers["uid"] == 0:
        pytest.skip("child runs as root: RLIMIT_NPROC would not bind")
    res = sandbox.run(bounded_forks, {}, timeout_s=1.5, guard=False, nproc=8)
    assert res.messages and res.messages[0]["made"] < 8
    if os.geteuid() == 0:
        assert wait_no_nobody() == 0
    if not layers["pidns"]:
        pytest.skip("real fork bomb only where a pid namespace contains it")
    res = sandbox.run(fork_bomb, {}, timeout_s=1.5, guard=False, nproc=8)
    assert res.timed_out and res.messages == [{"go": True}]
    if os.geteuid() == 0:
        assert wait_no_nobody() == 0  # nothing survives the namespace


def test_read_dirs_decide_whether_the_read_capability_is_kept(tmp_path):
    import tempfile

    open_dir = tempfile.mkdtemp(dir="/tmp")
    try:
        os.chmod(open_dir, 0o755)
        closed = tmp_path / "closed"
        closed.mkdir(mode=0o700)
        assert sandbox._nobody_can_read([open_dir]) == bool(os.stat("/tmp").st_mode & 0o001)
        assert not sandbox._nobody_can_read([open_dir, str(closed)])
        assert not sandbox._nobody_can_read([str(tmp_path / "missing")])
    finally:
        os.rmdir(open_dir)


# ------------------------------------------------------------------------------------ code

def test_fence_extraction_and_test_splitting():
    text = "try:\n```python\nx = 1\n```\nbetter:\n```py\ndef f(): return 2\n```\nend"
    assert last_fence(text, ("python", "py")) == "def f(): return 2\n"
    assert last_fence("```\nbare\n```", ("python",)) == "bare\n"
    assert last_fence("no fences", ("python",)) == "no fences"
    assert last_fence("```python\nunclosed = 1\n", ("python",)) == "unclosed = 1\n"
    steps = split_tests("import math\nassert f() == 2\ndef test_x():\n    assert f() > 1\n")
    assert [t for _, t in steps] == [False, True, False, True] and steps[-1][0] == "test_x()"
    with pytest.raises(ValueError, match="no tests"):
        split_tests("x = 1\n")
    with pytest.raises(ValueError):
        split_tests("assert (\n")


def test_code_scores_fraction_and_all(tmp_path):
    sc = build_scorer({"type": "code"}, timeout_s=10, memory_mb=256)
    good = "Here:\n```python\ndef add(a, b):\n    return a + b\n```"
    partial = "```python\ndef add(a, b):\n    return a + b if a >= 0 else 1\n```"  # fails 1 of 3
    wrong = "def add(a, b):\n    return a * b\n"
    listed = rec(tests=["assert add(1, 2) == 3", "assert add(-2, 5) == 3"])
    res = sc.score([rec(tests=ADD_TESTS), listed], [[good, partial, wrong], [good, partial]])
    assert res.rewards == [[1.0, pytest.approx(2 / 3), pytest.approx(1 / 3)], [1.0, 0.5]]
    assert res.details[0][1]["passed"] == 2 and res.details[0][1]["total"] == 3
    assert "add(-1, 1) == 0" in res.details[0][1]["first_error"] and not res.failures
    all_sc = build_scorer({"type": "code", "reward": "all"}, timeout_s=10, memory_mb=256)
    assert all_sc.score([rec(tests=ADD_TESTS)], [[good, partial]]).rewards == [[1.0, 0.0]]


def test_code_tests_file_and_config_errors(tmp_path):
    (tmp_path / "t.py").write_text("def test_add():\n    assert add(2, 3) == 5\n")
    sc = build_scorer({"type": "code", "tests": "t.py"}, base_dir=tmp_path, memory_mb=256)
    res = sc.score([rec(), rec()], [["def add(a, b): return a + b"], ["def add(a, b): return 0"]])
    assert res.rewards == [[1.0], [0.0]] and not res.failures
    with pytest.raises(ConfigError, match="does not exist"):
        build_scorer({"type": "code", "tests": "missing.py"}, base_dir=tmp_path)
    with pytest.raises(ConfigError, match="no option 'bogus'"):
        build_scorer({"type": "code", "bogus": 1})
    with pytest.raises(ConfigError, match="reward"):
        build_scorer({"type": "code", "reward": "most"})
    # no tests anywhere: the scorer fails (counted), it does not guess
    res = build_scorer({"type": "code"}, failure_value=-1.0).score([rec()], [["x = 1", "y"]])
    assert res.rewards == [[-1.0, -1.0]] and res.failures == {"code": 2}
    assert "no 'tests' field" in res.details[0][0]["error"]
    plain = build_scorer({"type": "code"})
    plain.check([rec(tests=ADD_TESTS)])
    with pytest.raises(ConfigError, match="prompt 1 has no 'tests' field"):
        plain.check([rec(tests=ADD_TESTS), rec()])
    with pytest.raises(ConfigError, match="prompt 0"):
        plain.check([rec(tests="assert (")])
    sc.check([rec()])  # the tests file covers records without tests


def test_hostile_code_scores_zero_and_harms_nothing(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    sc = build_scorer({"type": "code"}, timeout_s=1.5, memory_mb=256)
    hostile = {
        "loop": "while True:\n    pass",
        "bomb": "import os\nwhile True:\n    os.fork()",
        "flood": "while True:\n    print('x' * 10**9)",
        "remove": f"def add(a, b): return a + b\nimport os\nos.remove({str(victim)!r})",
        "network": "import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=1)",
        "hog": "x = []\nwhile True:\n    x.append(bytearray(10**8))",
        "exit": "import os\nos._exit(0)",
    }
    good = "def add(a, b):\n    return a + b"
    t0 = time.monotonic()
    res = sc.score([rec(tests=ADD_TESTS)], [[good, *hostile.values()]])
    elapsed = time.monotonic() - t0
    by_name = dict(zip(["good", *hostile], zip(res.rewards[0], res.details[0])))
    assert by_name["good"][0] == 1.0 and not res.failures
    for name in hostile:  # remove: the delete is refused, add() is then defined and passes
        reward, d = by_name[name]
        assert reward == (1.0 if name == "remove" else 0.0), (name, d)
    assert by_name["loop"][1]["timed_out"] and "fork" in by_name["bomb"][1]["first_error"]
    assert "PermissionError" in by_name["remove"][1]["first_error"]
    assert victim.read_text() == "keep me"
    assert elapsed < 15
    if os.geteuid() == 0:
        assert wait_no_nobody() == 0


# ------------------------------------------------------------------------------------ sql

def make_db(path):
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE t (id INTEGER, name TEXT, score REAL)")
    con.executemany("INSERT INTO t VALUES (?, ?, ?)",
                    [(i, f"Name{i}", i / 3) for i in range(40)])
    con.commit()
    con.close()
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def db(tmp_path):
    (tmp_path / "dbs").mkdir()
    digest = make_db(tmp_path / "dbs" / "shop.sqlite")
    return tmp_path, digest


def test_sql_vote_with_databricks_dialect(db):
    base, digest = db
    sc = build_scorer({"type": "sql", "dialect": "databricks", "db_dir": "dbs"}, base_dir=base,
                      timeout_s=1.0, memory_mb=256)
    cands = [
        "```sql\nSELECT `name` FROM t WHERE `name` ILIKE 'name1%'\n```",  # backticks + ILIKE
        "SELECT name FROM t WHERE name LIKE 'Name1%' ORDER BY name DESC",  # ordered, same rows
        "select t.name from t where t.id = 1 or t.id >= 10 and t.id < 20;",
        "SELECT name FROM t WHERE name LIKE 'Name2%'",  # wrong
        "SELECT FROM WHERE",  # syntax error
        "DROP TABLE t",
        "DELETE FROM t",
        "SELECT count(*) FROM t a, t b, t c, t d, t e, t f",  # runs for ever: interrupted
        "SELECT * FROM t a, t b, t c",  # 64,000 rows: capped
    ]
    res = sc.score([rec(db="shop.sqlite")], [cands])
    r, d = res.rewards[0], res.details[0]
    assert r == [1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], d
    assert "LIKE" in d[0]["sql"] and "ILIKE" not in d[0]["sql"] and d[0]["group_size"] == 2
    assert d[1]["ok"] and d[1]["group_size"] == 1  # ORDER BY makes its result a list
    assert not d[4]["parsed"] and "not authorized" in d[5]["sql_error"]
    assert d[7]["timed_out"] and d[8]["capped"] and d[8]["rows"] == 10_000
    assert not res.failures and res.stats["sql/parse_rate"] == pytest.approx(8 / 9)
    assert res.stats["sql/exec_rate"] == pytest.approx(5 / 9)
    assert res.stats["sql/majority_share"] == pytest.approx(2 / 9)
    assert hashlib.sha256((base / "dbs" / "shop.sqlite").read_bytes()).hexdigest() == digest


def test_sql_result_grouping(db):
    base, _ = db
    sc = SqlExecScorer(db_dir="dbs", base_dir=base, timeout_s=2.0, memory_mb=256)
    cands = ["SELECT avg(score) FROM t", "SELECT sum(score) / count(*) FROM t",
             "SELECT id FROM t WHERE id < 3", "SELECT id FROM t WHERE id < 3 ORDER BY id DESC",
             "SELECT id FROM (SELECT id FROM t WHERE id < 3 ORDER BY id DESC)"]
    d = sc.score([rec(db="shop.sqlite")], [cands]).details[0]
    assert d[0]["key"] == d[1]["key"]  # float rounding
    assert d[2]["key"] == d[4]["key"] != d[3]["key"]  # only an outer ORDER BY orders


def test_sql_writes_refused_by_the_sandbox_itself(db, tmp_path):
    base, digest = db
    other = tmp_path / "other.sqlite"
    hostile = ["DROP TABLE t", "DELETE FROM t", "UPDATE t SET id = 0", "CREATE TABLE z (a)",
               f"ATTACH DATABASE '{other}' AS o", "PRAGMA writable_schema = ON",
               "SELECT load_extension('x')", "SELECT 1; DROP TABLE t", "SELECT count(*) FROM t"]
    res = sandbox.run(_run_queries, {"db": "db.sqlite", "queries": [[q, False] for q in hostile],
                                     "time_limit_s": 2.0, "max_rows": 10},
                      files={"db.sqlite": base / "dbs" / "shop.sqlite"}, timeout_s=20)
    assert res.done and [m["ok"] for m in res.messages] == [False] * 8 + [True], res.messages
    assert hashlib.sha256((base / "dbs" / "shop.sqlite").read_bytes()).hexdigest() == digest
    assert not other.exists()
    # and through the scorer, SQLite dialect (run as written)
    sc = SqlExecScorer(db_dir="dbs", base_dir=base, timeout_s=2.0, memory_mb=256)
    out = sc.score([rec(db="shop.sqlite")], [hostile[4:6] + ["SELECT 1"]])
    assert out.rewards == [[0.0, 0.0, 1.0]] and not other.exists()


def test_sql_worker_death_fails_only_that_query(db, monkeypatch):
    base, _ = db
    sc = SqlExecScorer(db_dir="dbs", base_dir=base, timeout_s=1.0)
    calls = []

    def fake_run(worker, payload, **kw):  # first call: dies on its second query
        calls.append(len(payload["queries"]))
        msgs = [{"ok": True, "rows": 1, "capped": False, "key": "k"}]
        if len(calls) == 1:
            return sandbox.SandboxResult(messages=msgs, started=True, timed_out=True)
        return sandbox.SandboxResult(messages=msgs * len(payload["queries"]), started=True,
                                     done=True)

    monkeypatch.setattr(sandbox, "run", fake_run)
    out = sc._execute(base / "dbs" / "shop.sqlite", [("q1", False), ("q2", False), ("q3", False)])
    assert calls == [3, 1] and [o["ok"] for o in out] == [True, False, True]
    assert out[1]["timed_out"]


def test_sql_check_and_config_errors(db):
    base, _ = db
    sc = build_scorer({"type": "sql", "db_dir": "dbs"}, base_dir=base)
    sc.check([rec(db="shop.sqlite")])
    with pytest.raises(ConfigError, match="prompt 1 has no 'db' field"):
        sc.check([rec(db="shop.sqlite"), rec()])
    with pytest.raises(ConfigError, match=r"prompt 0: database .*nope.sqlite does not exist"):
        sc.check([rec(db="nope.sqlite")])
    with pytest.raises(ConfigError, match="Unknown dialect"):
        build_scorer({"type": "sql", "dialect": "klingon"}, base_dir=base)
    with pytest.raises(ConfigError, match="no option 'gold'"):
        build_scorer({"type": "sql", "gold": "x"}, base_dir=base)
    with pytest.raises(ConfigError, match="db_dir"):
        build_scorer({"type": "sql", "db_dir": "missing"}, base_dir=base)
    res = sc.score([rec(db="nope.sqlite")], [["SELECT 1", "SELECT 2"]])  # unchecked: fails
    assert res.failures == {"sql": 2} and "does not exist" in res.details[0][0]["error"]
    (base / "dbs" / "junk.sqlite").write_bytes(b"not a database" * 100)
    res = sc.score([rec(db="junk.sqlite")], [["SELECT 1"]])
    assert res.failures == {"sql": 1} and "not a database" in res.details[0][0]["error"]
