"""The request log (the inference table): every request and its response, one JSON line each,
in the wrapper form `tao-fast ingest` reads:

    {"request": <the chat-completions body as received, after redaction>,
     "response": <the chat.completion; for a stream, the one its chunks add up to>,
     "request_id", "timestamp" (ISO UTC), "latency_s", "usage": {prompt_tokens,
     completion_tokens}, "model_version", "status": 200 or the error's HTTP status}

Files in LOGDIR (`tune --follow` relies on these names):
- `active-<pid>.jsonl`: the file being appended to; never read by follow.
- `requests-<UTC yyyymmddTHHMMSSZ>-<6-digit seq>.jsonl.gz`: a rotated file, gzipped under a
  hidden temporary name (`.requests-...tmp-<pid>`, which ingest and follow skip) and then
  os.replace'd into place, so a reader never sees half of one; the active file is then
  removed. seq continues from the highest one in LOGDIR. Rotation: when the active file passes
  max_bytes, when its first record is older than rotate_s, and on close(). An `active-<pid>`
  file left by a process that is gone (a crash) is trimmed to its last whole line and rotated
  when the log starts.

Logging never fails or slows a request: submit() only puts the record on a bounded queue (a
full queue drops it and counts it). One writer thread redacts (redact.py, in its sandbox),
serialises and appends each record with a single unbuffered os.write: a record is wholly in
the file or not at all, since a write that fails part-way (ENOSPC) is truncated back to the
last whole line. On any OSError (no directory, read-only, disk full) the error is kept for
/health and printed, the records not written are kept (up to the queue's size) and retried
every retry_s; serving goes on.
"""
from __future__ import annotations

import gzip
import json
import os
import queue
import re
import shutil
import sys
import threading
import time
from pathlib import Path

ROTATED = re.compile(r"^requests-(\d{8}T\d{6}Z)-(\d{6})\.jsonl\.gz$")
ACTIVE = re.compile(r"^active-(\d+)\.jsonl$")
BATCH = 256  # records taken from the queue (and redacted) at a time
TAIL = 1 << 16  # bytes read back at a time when looking for a file's last whole line


def _log(msg: str) -> None:
    print(f"[tao-fast serve] {msg}", file=sys.stderr, flush=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def trim_partial(fd: int) -> int:
    """Truncate an open file after its last newline (a line cut short by a failed write or a
    crash); -> its size after."""
    size = os.fstat(fd).st_size
    end = size
    while end > 0:
        start = max(0, end - TAIL)
        tail = os.pread(fd, end - start, start)
        nl = tail.rfind(b"\n")
        if nl >= 0:
            end = start + nl + 1
            break
        end = start
    if end != size:
        os.ftruncate(fd, end)
    return end


def record_line(record: dict) -> bytes:
    """One record as a JSON line (ASCII: no byte of it can split a line)."""
    return (json.dumps(record, ensure_ascii=True, default=str) + "\n").encode("ascii")


class RequestLog:
    """The log of one server process in log_dir (see the module docstring)."""

    def __init__(self, log_dir, *, max_bytes: int = 64 << 20, rotate_s: float = 300.0,
                 redactor=None, queue_size: int = 10_000, retry_s: float = 2.0):
        self.dir = Path(log_dir)
        self.active = self.dir / f"active-{os.getpid()}.jsonl"
        self.max_bytes, self.rotate_s, self.retry_s = max_bytes, rotate_s, retry_s
        self.redactor, self.queue_size = redactor, queue_size
        self._q: queue.Queue = queue.Queue(maxsize=queue_size)
        self._backlog: list[dict] = []  # taken from the queue, not yet written (a failure)
        self._fd: int | None = None
        self._size = 0
        self._first_at = 0.0  # when the active file got its first record
        self._seq = 0
        self._ready = False  # the directory exists and orphans were dealt with
        self._retry_at = 0.0
        self._write = os.write  # one call per record; a test swaps in a failing one
        self.stats = {"written": 0, "dropped": 0, "rotated": 0, "redacted_out": 0,
                      "redact_failed": 0, "errors": 0}
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tao-serve-log", daemon=True)
        self._thread.start()

    # ---- the request path ----------------------------------------------------------------
    def submit(self, record: dict) -> bool:
        """Queue one record; False (and counted as dropped) when the queue is full."""
        try:
            self._q.put_nowait(record)
            return True
        except queue.Full:
            self.stats["dropped"] += 1
            return False

    def health(self) -> dict:
        """The writer's state for /health: ok, or the last error with the counters."""
        return {"state": "ok" if self.last_error is None else "degraded",
                "dir": str(self.dir), "active_file": self.active.name,
                "queued": self._q.qsize() + len(self._backlog), "last_error": self.last_error,
                "last_error_at": self.last_error_at, **self.stats}

    def close(self, timeout_s: float = 30.0) -> None:
        """Write what is queued, rotate the active file, stop the thread."""
        self._stopping.set()
        self._thread.join(timeout_s)

    # ---- the writer thread ---------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            stopping = self._stopping.is_set()
            if time.monotonic() >= self._retry_at or stopping:
                self._step(timeout_s=0.0 if stopping else 0.25)
            else:
                time.sleep(min(0.25, self._retry_at - time.monotonic()))
            if stopping and (self._q.empty() and not self._backlog or self.last_error):
                self._finish()
                return

    def _step(self, timeout_s: float) -> None:
        """Take, redact and write a batch of records, then rotate if due; an OSError is kept
        for /health and retried after retry_s."""
        try:
            self._take(timeout_s)
            if self._backlog:
                self._ensure_ready()
                self._write_backlog()
            self._rotate_if_due()
        except OSError as e:
            self._failed(e)

    def _take(self, timeout_s: float) -> None:
        """Move up to BATCH queued records to the backlog (redacted), waiting up to timeout_s
        for the first."""
        if self._backlog:
            return
        got = []
        try:
            got.append(self._q.get(timeout=timeout_s) if timeout_s else self._q.get_nowait())
            while len(got) < BATCH:
                got.append(self._q.get_nowait())
        except queue.Empty:
            pass
        self._backlog = self._redact(got) if got and self.redactor else got

    def _redact(self, records: list[dict]) -> list[dict]:
        """The redactor's output for records; None drops one; a failed call drops them all
        (an unredacted record is never written)."""
        try:
            out = self.redactor.apply(records)
        except Exception as e:  # noqa: BLE001 - any failure of the user's hook
            self.stats["redact_failed"] += len(records)
            self._error(f"redaction failed, {len(records)} records dropped: {e}")
            return []
        kept = [r for r in out if r is not None]
        self.stats["redacted_out"] += len(out) - len(kept)
        return kept

    def _write_backlog(self) -> None:
        while self._backlog:
            self._append(record_line(self._backlog[0]))
            self._backlog.pop(0)
            self.stats["written"] += 1
        if self.last_error is not None:
            _log(f"request log: writing again to {self.dir}")
            self.last_error = None

    def _append(self, data: bytes) -> None:
        """One record appended whole, or not at all: a write that fails part-way is cut back
        to the last whole line (and where that fails too, at the next open)."""
        if self._fd is None:
            self._open()
        start = self._size
        view = memoryview(data)
        try:
            while view:
                view = view[self._write(self._fd, view):]
        except OSError:
            try:
                os.ftruncate(self._fd, start)
            except OSError:
                self._close_fd()
            raise
        if start == 0:
            self._first_at = time.monotonic()
        self._size = start + len(data)

    def _open(self) -> None:
        fd = os.open(self.active, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)  # read: trim
        try:
            self._size = trim_partial(fd)
        except OSError:
            os.close(fd)
            raise
        self._fd = fd
        if self._size and not self._first_at:
            self._first_at = time.monotonic()

    def _close_fd(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.close(fd)
            except OSError:
                pass

    def _failed(self, e: OSError) -> None:
        self._close_fd()
        self._retry_at = time.monotonic() + self.retry_s
        self._error(f"{type(e).__name__}: {e}")

    def _error(self, msg: str) -> None:
        self.stats["errors"] += 1
        if msg != self.last_error:
            _log(f"request log: {msg}; serving goes on, retrying every {self.retry_s:g} s")
        self.last_error, self.last_error_at = msg, time.time()

    def _finish(self) -> None:
        """At close: rotate what was written; count what could not be."""
        try:
            self._rotate()
        except OSError as e:
            self._failed(e)
        lost = len(self._backlog) + self._q.qsize()
        if lost:
            self.stats["dropped"] += lost
            _log(f"request log: {lost} records not written at shutdown ({self.last_error})")
        self._close_fd()

    # ---- directory, rotation -------------------------------------------------------------
    def _ensure_ready(self) -> None:
        """Create LOGDIR, find the highest seq, rotate orphaned active files (once)."""
        if self._ready:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        for f in os.listdir(self.dir):
            m = ROTATED.match(f)
            if m:
                self._seq = max(self._seq, int(m.group(2)))
        for f in sorted(os.listdir(self.dir)):
            m = ACTIVE.match(f)
            if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
                _log(f"request log: rotating {f}, left by process {m.group(1)}")
                self._gzip_away(self.dir / f)
        self._ready = True

    def _rotate_if_due(self) -> None:
        if self._size and (self._size >= self.max_bytes
                           or time.monotonic() - self._first_at >= self.rotate_s):
            self._rotate()

    def _rotate(self) -> None:
        """The active file -> requests-<time>-<seq>.jsonl.gz; an empty one is removed."""
        self._close_fd()
        if not self.active.exists():
            return
        self._gzip_away(self.active)
        self._size, self._first_at = 0, 0.0
        self.stats["rotated"] += 1

    def _gzip_away(self, src: Path) -> None:
        """Gzip src to the next rotated name (temp file, fsync, os.replace), then remove it."""
        with open(src, "r+b") as f:
            if trim_partial(f.fileno()) == 0:
                src.unlink()
                return
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        while True:
            self._seq += 1
            name = f"requests-{stamp}-{self._seq:06d}.jsonl.gz"
            if not (self.dir / name).exists():
                break
        tmp = self.dir / f".{name}.tmp-{os.getpid()}"
        try:
            with open(src, "rb") as f, open(tmp, "wb") as raw:
                with gzip.GzipFile(filename="", fileobj=raw, mode="wb") as gz:
                    shutil.copyfileobj(f, gz, 1 << 20)
                raw.flush()
                os.fsync(raw.fileno())
            os.replace(tmp, self.dir / name)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        src.unlink()
