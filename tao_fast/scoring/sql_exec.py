"""SQL execution verifier (spec type "sql"): execution-consistency vote, no gold query needed.

    {"type": "sql", "dialect": "databricks", "db_dir": "dbs"}

Each prompt record names a SQLite database in its `db_field` (default "db"): a path relative to
`db_dir` (itself relative to base_dir; default base_dir). `check(prompts)` fails early (ConfigError
naming the prompt and path) when a record has none or the file does not exist.

A candidate's SQL is the last ```sql (else bare ```) fenced block, else the whole response. It is
parsed in the `dialect` the candidates write in and transpiled to SQLite by sqlglot (a `sqlite`
dialect runs as written, even where sqlglot cannot parse it); one statement only. All candidates
of a prompt then run in one sandbox call (tao_fast.scoring.sandbox), prompts a few at a time, on a
private copy of the database opened read-only and immutable, with `PRAGMA query_only` and an
authorizer that allows nothing but reading (no writes, DDL, ATTACH, PRAGMA, load_extension): the
original file is never opened by untrusted SQL. Each query gets `timeout_s` (a progress handler
interrupts it) and at most `max_rows` rows are fetched; if the worker dies on a query anyway
(the call's wall limit: timeout_s per query + 5 s), that query scores 0 and the rest run in a
fresh sandbox.

Vote: successful candidates are grouped by their result: the multiset of rows (a list, in order,
when the outermost query has ORDER BY), values compared with floats rounded to 9 significant
digits and integral floats equal to ints; column names are ignored, column order is not.
A candidate scores 1.0 when its group is a largest one, 0 otherwise; parse errors, run errors and
timeouts score 0. Ties: every tied largest group scores 1.0, so a group with no consensus rewards
running at all and only a strict majority discriminates. Results over max_rows are compared on
their first max_rows rows. An empty result votes like any other.

Details per candidate: sql (as run), sql_error, parsed, ok, rows, capped, timed_out, key (of the
result), group_size, majority_share (largest group / candidates). Stats: sql/parse_rate,
sql/exec_rate, sql/majority_share (mean over prompts). Failures (failure_value, counted): a prompt
whose database is missing, a sandbox that cannot start.
"""
from __future__ import annotations

import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import tao_fast.scoring.sandbox as sandbox
from tao_fast.config import ConfigError
from tao_fast.scoring.base import ScoreResult, Scorer
from tao_fast.scoring.code_exec import last_fence, pool_size

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_ORDER_BY = re.compile(r"\border\s+by\b", re.IGNORECASE)


def _run_queries(payload, emit):
    """Sandbox worker: each query on the read-only database copy; one message per query."""
    import hashlib
    import json
    import math
    import sqlite3
    import time

    con = sqlite3.connect(f"file:../{payload['db']}?mode=ro&immutable=1", uri=True)
    con.execute("PRAGMA query_only = ON")
    con.execute("SELECT count(*) FROM sqlite_master")  # not a database: the scorer's failure
    allowed = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION,
               sqlite3.SQLITE_RECURSIVE}

    def authorize(action, arg1, arg2, db_name, trigger):
        if action == sqlite3.SQLITE_FUNCTION and str(arg2).lower() == "load_extension":
            return sqlite3.SQLITE_DENY
        return sqlite3.SQLITE_OK if action in allowed else sqlite3.SQLITE_DENY

    con.set_authorizer(authorize)
    deadline = [0.0]
    con.set_progress_handler(lambda: time.monotonic() > deadline[0], 1000)

    def canon(v):
        if isinstance(v, float):
            if not math.isfinite(v):
                return repr(v)
            return int(v) if v.is_integer() and abs(v) < 2 ** 53 else float(f"{v:.9g}")
        return v.hex() if isinstance(v, bytes) else v

    cap = payload["max_rows"]
    for sql, ordered in payload["queries"]:
        deadline[0] = time.monotonic() + payload["time_limit_s"]
        try:
            cur = con.execute(sql)
            rows = cur.fetchmany(cap + 1)
            ncols = len(cur.description or ())
            cur.close()
            lines = [json.dumps([canon(v) for v in row]) for row in rows[:cap]]
            if not ordered:
                lines.sort()
            key = hashlib.sha1(f"{ncols}\n".encode() + "\n".join(lines).encode()).hexdigest()
            emit({"ok": True, "rows": len(lines), "capped": len(rows) > cap, "key": key})
        except Exception as e:  # noqa: BLE001 - sqlite3.Error, MemoryError, ...: a failed query
            msg = f"{type(e).__name__}: {e}"[:300]
            emit({"ok": False, "err": msg, "timed_out": str(e) == "interrupted"})


class SqlExecScorer(Scorer):
    def __init__(self, *, dialect: str = "sqlite", db_field: str = "db", db_dir: str = "",
                 reward: str = "vote", max_rows: int = 10_000, name: str = "sql",
                 timeout_s: float = 10.0, memory_mb: int = 1024, failure_value: float = 0.0,
                 base_dir="."):
        from sqlglot import Dialect

        Dialect.get_or_raise(dialect)  # ValueError naming the unknown dialect
        if reward != "vote":
            raise ValueError(f"reward must be 'vote' (execution consistency), got {reward!r}")
        if not timeout_s > 0 or not memory_mb > 0 or not max_rows > 0:
            raise ValueError("timeout_s, memory_mb and max_rows must be > 0")
        self.db_root = Path(base_dir) / db_dir
        if db_dir and not self.db_root.is_dir():
            raise FileNotFoundError(f"db_dir {self.db_root} does not exist")
        self.dialect, self.db_field, self.name = dialect, db_field, name
        self.max_rows, self.timeout_s, self.memory_mb = int(max_rows), float(timeout_s), memory_mb
        self.failure_value = failure_value

    def db_path(self, rec) -> Path | None:
        value = rec.meta.get(self.db_field)
        return self.db_root / value if isinstance(value, str) and value else None

    def check(self, prompts):
        """ConfigError naming the first prompt whose database is not named or does not exist."""
        for i, rec in enumerate(prompts):
            path = self.db_path(rec)
            if path is None:
                raise ConfigError(f"{self.name}: prompt {i} has no {self.db_field!r} field "
                                  f"(the SQLite database its queries run against)")
            if not path.is_file():
                raise ConfigError(f"{self.name}: prompt {i}: database {path} does not exist")

    def transpile(self, text: str) -> tuple[str, bool]:
        """(SQLite query, has ORDER BY) from a response; ValueError when it does not parse."""
        import sqlglot
        from sqlglot.errors import ErrorLevel

        sql = last_fence(text, ("sql", "sqlite")).strip().rstrip(";").strip()
        try:
            trees = [t for t in sqlglot.parse(sql, read=self.dialect) if t is not None]
        except Exception as e:  # noqa: BLE001 - ParseError, TokenError, RecursionError, ...
            if self.dialect == "sqlite" and sql:  # SQLite judges its own syntax; sqlglot may lag
                return sql, _ORDER_BY.search(sql) is not None
            raise ValueError(_ANSI.sub("", str(e)).splitlines()[0][:300] or type(e).__name__) \
                from None
        if len(trees) != 1:
            raise ValueError(f"expected one SQL statement, got {len(trees)}")
        ordered = trees[0].args.get("order") is not None
        if self.dialect != "sqlite":
            sql = trees[0].sql(dialect="sqlite", unsupported_level=ErrorLevel.IGNORE)
        return sql, ordered

    def _execute(self, db: Path, queries: list[tuple[str, bool]]) -> list[dict]:
        """Run the queries in the sandbox; a query that kills its worker fails alone."""
        results, start = [], 0
        while start < len(queries):
            todo = queries[start:]
            try:
                res = sandbox.run(_run_queries, {"db": "db.sqlite", "queries": todo,
                                                 "time_limit_s": self.timeout_s,
                                                 "max_rows": self.max_rows},
                                  files={"db.sqlite": db}, memory_mb=self.memory_mb,
                                  timeout_s=self.timeout_s * len(todo) + 5.0)
            except Exception as e:  # noqa: BLE001 - e.g. the copy failed: the scorer's failure
                return results + [{"error": f"sandbox: {type(e).__name__}: {e}"}] * len(todo)
            if not res.started or res.error:  # no sandbox, or no database connection
                return results + [{"error": res.error}] * len(todo)
            got = [m for m in res.messages if "ok" in m][:len(todo)]
            results += got
            if len(got) < len(todo):  # the worker died (or hung) on the next query
                why = "timed out" if res.timed_out else f"worker died (exit {res.returncode})"
                results.append({"ok": False, "err": why, "timed_out": res.timed_out})
            start = len(results)
        return results

    def _score_group(self, rec, group) -> tuple[list[float], list[dict]]:
        db = self.db_path(rec)
        if db is None or not db.is_file():
            err = f"database {db} does not exist" if db else f"no {self.db_field!r} field"
            return [self.failure_value] * len(group), [{"error": err} for _ in group]
        details, queries = [], []
        for text in group:
            try:
                sql, ordered = self.transpile(text)
                details.append({"sql": sql, "sql_error": None, "parsed": True})
                queries.append((sql, ordered))
            except ValueError as e:
                details.append({"sql": None, "sql_error": f"parse: {e}", "parsed": False})
        runs = iter(self._execute(db, queries) if queries else [])
        for d in details:
            if d["parsed"]:
                r = next(runs)
                if "error" in r:
                    d["error"] = r["error"]
                d.update(ok=r.get("ok", False), rows=r.get("rows"), key=r.get("key"),
                         capped=r.get("capped", False), timed_out=r.get("timed_out", False))
                if r.get("err"):
                    d["sql_error"] = r["err"]
            else:
                d.update(ok=False, rows=None, key=None, capped=False, timed_out=False)
        votes = Counter(d["key"] for d in details if d["ok"])
        top = max(votes.values(), default=0)
        rewards = []
        for d in details:
            d["group_size"] = votes[d["key"]] if d["ok"] else 0
            d["majority_share"] = top / len(group)
            if "error" in d:
                rewards.append(self.failure_value)
            else:
                rewards.append(1.0 if d["ok"] and votes[d["key"]] == top else 0.0)
        return rewards, details

    def score(self, prompts, candidates) -> ScoreResult:
        pairs = list(zip(prompts, candidates, strict=True))
        with ThreadPoolExecutor(pool_size()) as pool:
            outs = list(pool.map(lambda p: self._score_group(*p), pairs))
        rewards = [r for r, _ in outs]
        details = [d for _, d in outs]
        flat = [d for ds in details for d in ds]
        n = len(flat) or 1
        failed = sum("error" in d for d in flat)
        shares = [ds[0]["majority_share"] for ds in details if ds and "majority_share" in ds[0]]
        stats = {f"{self.name}/parse_rate": sum(d.get("parsed", False) for d in flat) / n,
                 f"{self.name}/exec_rate": sum(d.get("ok", False) for d in flat) / n,
                 f"{self.name}/majority_share": sum(shares) / len(shares) if shares else 0.0}
        return ScoreResult(rewards, details, {self.name: failed} if failed else {}, stats)
