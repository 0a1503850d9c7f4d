"""--redact python:module:function (or python:path/to/file.py:function): the user's hook
f(record dict) -> record dict, or None to leave the record out of the log.

It runs in a sandbox.Worker (tao_fast/scoring/sandbox.py: the persistent sandboxed child that
runs user scorers, with the same layers: no network, no subprocesses, writes only to its own
work dir, none of the server's environment), called from the request log's writer thread with
a batch of records at a time, never on the request path. The module is imported once per
child. A record the function raises on, or returns something other than a dict or None for,
is left out; a call that dies (timeout, crash, memory) leaves its whole batch out: the log
never holds a record the hook did not pass.
"""
from __future__ import annotations

import os
import sys

from tao_fast.scoring import sandbox
from tao_fast.scoring.python_fn import source_dirs

MAX_OUTPUT = 64 << 20  # bytes a batch's redacted records may take (the sandbox's output cap)


def call_redact(payload, emit):
    """Sandbox worker: load payload's target:func once per process and emit
    {"records": [dict | None, ...], "errors": [...]} for payload["records"], or {"fatal"}."""
    import importlib
    import importlib.util
    import os
    import sys

    sys.path[:0] = [p for p in payload["path"] if p not in sys.path]
    try:
        os.chdir(payload["cwd"])
    except OSError:
        pass

    def load(target, func):
        if target.endswith(".py"):
            spec = importlib.util.spec_from_file_location(
                "tao_user_redact", os.path.join(payload["cwd"], target))
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
        else:
            mod = importlib.import_module(target)
        fn = getattr(mod, func, None)
        if not callable(fn):
            raise ImportError(f"{target} has no callable {func!r}")
        return fn

    loaded = call_redact.__dict__.setdefault("loaded", {})
    key = (payload["target"], payload["func"])
    try:
        fn = loaded[key] if key in loaded else load(*key)
    except Exception as e:  # noqa: BLE001 - reported to the parent
        emit({"fatal": f"cannot load: {type(e).__name__}: {e}"[:2000]})
        return
    loaded[key] = fn
    out, errors = [], []
    for rec in payload.get("records", []):
        try:
            r = fn(rec)
            if r is not None and not isinstance(r, dict):
                raise TypeError(f"returned a {type(r).__name__}, not a dict or None")
            out.append(r)
        except Exception as e:  # noqa: BLE001 - this record is left out
            out.append(None)
            errors.append(f"{type(e).__name__}: {e}"[:500])
    emit({"records": out, "errors": errors[:5]})


class Redactor:
    """The hook of a --redact spec, in its own sandbox child; the import is checked at once."""

    def __init__(self, spec: str, *, timeout_s: float = 30.0, memory_mb: int = 1024):
        parts = spec.split(":")
        if len(parts) != 3 or parts[0] != "python" or not parts[1] or not parts[2]:
            raise ValueError(f"--redact {spec!r}: expected python:module:function or "
                             f"python:path/to/file.py:function")
        self.spec, self.target, self.func = spec, parts[1], parts[2]
        self.last_errors: list[str] = []
        self._worker = sandbox.Worker(call_redact, timeout_s=timeout_s, memory_mb=memory_mb,
                                      site_packages=True, max_output=MAX_OUTPUT,
                                      read_dirs=source_dirs(self.target, os.getcwd()))
        try:
            self.apply([])
        except BaseException:
            self._worker.close()
            raise

    def apply(self, records: list[dict]) -> list[dict | None]:
        """records -> the hook's output for each (None: left out); RuntimeError when the call
        died, ValueError when the hook cannot be loaded."""
        cwd = os.getcwd()
        res = self._worker.call({"target": self.target, "func": self.func, "cwd": cwd,
                                 "path": [cwd, *sys.path], "records": records})
        reply = next((m for m in res.messages if isinstance(m, dict)
                      and m.keys() & {"records", "fatal"}), None)
        if reply is None:
            why = "timed out" if res.timed_out else res.error or res.stderr.strip()[-300:]
            raise RuntimeError(f"--redact {self.spec}: {why or 'no reply'}")
        if "fatal" in reply:
            raise ValueError(f"--redact {self.spec}: {reply['fatal']}")
        self.last_errors = reply["errors"]
        return reply["records"]

    def close(self) -> None:
        self._worker.close()
