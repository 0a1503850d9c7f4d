"""Run a worker function on untrusted input in a locked-down child process: once, in a throw-away
child (`run`), or call after call in a persistent child (`Worker`).

    res = sandbox.run(worker, payload, timeout_s=10, memory_mb=512, files={"db.sqlite": path})

    w = sandbox.Worker(worker, timeout_s=10, memory_mb=512)  # starts nothing yet
    res = w.call(payload)  # the first call starts the child; the next ones reuse it
    w.close()  # also done when `w` is garbage-collected and at interpreter exit

`worker(payload, emit)` is a module-level function that imports only the standard library inside
its body: its *source* is sent to the child, so it sees no module globals. It calls `emit(obj)` for
each JSON-able result as soon as it has one; what it emitted before a crash or a timeout comes back
in `res.messages`. The child is `python -I [-S] sandbox.py`, cwd a fresh empty `work/` dir; the
`files` are copied (read-only) next to it, into `..`. `res.started` is False only when the sandbox
itself could not be set up: an infrastructure failure, not a verdict on the input.

A Worker's child reads one JSON line per call on its stdin and runs `worker(payload, emit)` in
the same process each time: what the worker keeps (modules it imported, attributes it sets on
itself) and the work dir persist from call to call. A call that does not end cleanly (a timeout,
an output flood, the child exiting or crashing, the worker raising) costs that call only: the
child's process group is killed and the next call starts a fresh child, with a fresh work dir.
So does a child that died between calls, one whose CPU budget is nearly spent and, where no
tmpfs bounds it, one whose work dir has outgrown disk_mb. `res.fresh` says a call started one.
Per call: the wall clock (timeout_s, from the moment the call is made: a fresh child's start and
the worker's imports count), the output caps (max_output of results; prints and stderr) and the
CPU seconds (a soft RLIMIT_CPU re-armed before each call). Per child, for its whole life: the
address space (memory_mb: what the worker keeps plus what a call allocates), open files,
processes, file size, the work dir's disk_mb, and a hard CPU total of CPU_CALLS_PER_WORKER calls.

Layers, outside in, and what each does NOT cover:
1. Parent: wall-clock limit; the child leads its own session and the whole process group is
   SIGKILLed on timeout and on exit; stdout/stderr are read up to a cap (a flood kills the child).
   A process that leaves the group (setsid) escapes this layer, not layer 2's pid namespace.
   The child (and, in a pid namespace, its init) gets SIGKILL when the thread that started it
   dies (PR_SET_PDEATHSIG): no persistent child outlives a trainer killed without cleanup.
2. Namespaces (ctypes unshare; as root, or in an unprivileged user namespace where the kernel
   allows one): a new, empty network namespace (no network, not even loopback); a pid namespace
   whose init is the worker, so everything it starts dies with it (on timeout its root-owned
   waiter kills and reaps it); a private tmpfs of disk_mb as work/. NOT covered: filesystem unix
   sockets and world-writable dirs such as /tmp (layer 3's DAC and the guard cover those).
   Where unshare is refused (unprivileged CI without user namespaces) the layer is skipped
   silently and `res.layers` says so: then only the guard (5) stops network use.
3. Identity: as root the child becomes uid/gid nobody (65534), no supplementary groups, so
   RLIMIT_NPROC binds (root ignores it) and it can neither change root's files nor signal root's
   processes. Where the interpreter, or one of the caller's `read_dirs`, lies under a directory
   nobody cannot enter (here /root is 0700) it keeps CAP_DAC_READ_SEARCH alone: it can then READ
   any file, never write one.
   Always PR_SET_NO_NEW_PRIVS, non-dumpable (no ptrace, /proc/self/mem not writable). Not root:
   it stays the calling user and can write what that user can, wherever the guard is bypassed.
4. rlimits: CPU seconds, address space (memory_mb), size of each file written, processes and
   threads (counted per uid: not root, that is all of the user's processes), open files, no core.
5. Guard (sys.addaudithook, installed before the worker runs): refuses fork/exec/spawn/subprocess,
   signals to other processes, socket creation/connect/bind, ctypes (also removed from
   sys.modules), gc object walking, and any file write/create/remove/rename/chmod outside work/.
   An audit hook is not a security boundary: C extensions, a memory-corruption bug, or a symlink
   swapped between check and use get past it; layers 2-4 are what hold then.
The worker's own results are only as honest as its process: untrusted Python that runs inside it
(the code verifier's candidates) can walk frames to reach `emit` and fake results; in a Worker it
can also read the request pipe, and what it leaves behind (threads, state) meets the next call.
"""
from __future__ import annotations

import io
import json
import os
import sys
import time

NOBODY = 65534
CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x20000, 0x10000000, 0x20000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_REC, MS_PRIVATE = 2, 4, 1 << 14, 1 << 18
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_KEEPCAPS, PR_SET_NO_NEW_PRIVS = 1, 4, 8, 38
CAP_DAC_READ_SEARCH = 2
STDERR_CAP = 64 << 10  # bytes of the child's stderr kept (and its prints, via the Python sink)
# RLIMIT_CPU counts a process's whole life, so a persistent child cannot have one call's budget
# (timeout_s + 1) as its limit. It gets a hard limit of this many calls' budgets, and before each
# call its soft limit is moved to what it has used plus one call's budget; the parent retires it
# once less than one budget is left under the hard limit. A call therefore always has the budget
# a fresh child would give it, and a CPU-heavy scorer pays one restart (a re-import) per ~10
# batches that spend their whole budget; one that spends milliseconds per batch never does.
CPU_CALLS_PER_WORKER = 10
WORK_ENTRIES_CAP = 10_000  # files a work dir without tmpfs may hold before the child is retired


class SandboxResult:
    def __init__(self, *, messages=(), started=False, done=False, error=None, timed_out=False,
                 flooded=False, returncode=None, stderr="", layers=None, wall_s=0.0,
                 exit_code=None, cpu_s=None, fresh=False):
        self.messages = list(messages)  # what the worker emitted, in order
        self.started, self.done = started, done  # sandbox set up / worker returned
        self.error = error  # the worker raised ("Type: message"), or why nothing started
        self.timed_out, self.flooded = timed_out, flooded  # killed: wall clock / output cap
        self.returncode, self.stderr, self.wall_s = returncode, stderr, wall_s
        self.layers = layers or {}  # which protections the child reported as active
        # the worker's own exit status once its child is gone (negative: the signal that killed
        # it), as the pid namespace's waiter reports it; None while a Worker's child lives on
        self.exit_code = exit_code
        self.cpu_s = cpu_s  # Worker: CPU seconds the child has used so far, after this call
        self.fresh = fresh  # Worker: this call started a new child (and re-imported)

    def __repr__(self):
        return f"SandboxResult({self.__dict__!r})"


def describe_exit(code) -> str:
    """'code 3', 'signal 11 (SIGSEGV)' or 'unknown status' for an exit status as
    SandboxResult.exit_code holds it."""
    import signal

    if code is None:
        return "unknown status"
    if code >= 0:
        return f"code {code}"
    try:
        return f"signal {-code} ({signal.Signals(-code).name})"
    except ValueError:
        return f"signal {-code}"


def run(worker, payload, *, timeout_s: float = 10.0, memory_mb: int = 512, files=None,
        file_mb: int = 16, disk_mb: int = 64, nproc: int = 16, site_packages: bool = False,
        guard: bool = True, namespaces: bool = True, max_output: int = 4 << 20,
        read_dirs=()) -> SandboxResult:
    """Run `worker(payload, emit)` once in a fresh sandboxed child (see the module docstring).
    read_dirs: the directories the worker reads besides the interpreter's (a user scorer's
    module and working directory); as root, where uid nobody cannot list one of them or enter
    a directory above, the child keeps CAP_DAC_READ_SEARCH (layer 3)."""
    t0 = time.monotonic()
    cfg = _config(timeout_s, memory_mb, file_mb, disk_mb, nproc, guard, namespaces, read_dirs)
    child = _spawn(worker, cfg, files, site_packages, payload)
    if isinstance(child, SandboxResult):
        child.wall_s = time.monotonic() - t0
        return child
    try:
        res = child.exchange(t0 + timeout_s, max_output, STDERR_CAP, until_done=False)
    finally:
        child.stop()
    return child.settle(res, t0)


class Worker:
    """A sandboxed child that serves call after call: `worker(payload, emit)` runs in the same
    process each time (the module docstring says what persists, what restarts, and which limits
    hold per call and which per child). Same options as `run`; cpu_calls: the child's hard CPU
    limit, in calls' budgets. Not for concurrent use: calls from several threads take turns."""

    def __init__(self, worker, *, timeout_s: float = 10.0, memory_mb: int = 512, files=None,
                 file_mb: int = 16, disk_mb: int = 64, nproc: int = 16,
                 site_packages: bool = False, guard: bool = True, namespaces: bool = True,
                 max_output: int = 4 << 20, read_dirs=(), cpu_calls: int = CPU_CALLS_PER_WORKER):
        import threading
        import weakref

        self.worker, self.files, self.site_packages = worker, files, site_packages
        self.timeout_s, self.max_output, self.disk_mb = timeout_s, max_output, disk_mb
        self.cfg = _config(timeout_s, memory_mb, file_mb, disk_mb, nproc, guard, namespaces,
                           read_dirs, cpu_calls=max(int(cpu_calls), 2))
        self.starts = 0  # children started so far
        self._box: list[_Child] = []  # the live child, shared with the finalizer (not self)
        self._lock = threading.Lock()
        # garbage collection or interpreter exit, whichever comes first, stops the child
        self._finalizer = weakref.finalize(self, _stop_box, self._box, os.getpid())

    @property
    def pid(self) -> int | None:
        """The live child's pid (the pid namespace's waiter where there is one), if any."""
        return self._box[0].proc.pid if self._box else None

    def call(self, payload) -> SandboxResult:
        """One call of the worker on payload -> its result; after any failure (see the module
        docstring) the child is already gone and the next call starts a fresh one."""
        with self._lock:
            t0 = time.monotonic()
            child, fresh = self._live_child()
            if isinstance(child, SandboxResult):
                child.wall_s = time.monotonic() - t0
                return child
            child.send(payload)
            res = child.exchange(t0 + self.timeout_s, self.max_output, 2 * STDERR_CAP,
                                 until_done=True)  # the sink lets through STDERR_CAP per call
            res.fresh = fresh
            if not res.done or self._spent(child, res):
                _stop_box(self._box, os.getpid())
            return child.settle(res, t0)

    def close(self) -> None:
        """Stop the child now: closing its stdin lets it exit, then its process group is
        killed and its work dir removed. A later call would start a fresh one."""
        with self._lock:
            _stop_box(self._box, os.getpid(), grace_s=1.0)

    def _live_child(self):
        """-> (the child to call, whether it is new); a child found dead between calls (a thread
        of the worker's, the OOM killer, its starting thread's exit) is replaced, no call's fault.
        A SandboxResult instead when no child could be started."""
        if self._box and self._box[0].has_exited():
            _stop_box(self._box, os.getpid())
        if self._box:
            return self._box[0], False
        child = _spawn(self.worker, self.cfg, self.files, self.site_packages)
        if isinstance(child, SandboxResult):
            return child, True
        self._box.append(child)
        self.starts += 1
        return child, True

    def _spent(self, child: "_Child", res: SandboxResult) -> bool:
        """Whether a child that answered must still be retired: too little CPU left under its
        hard limit for another call's budget, or (no tmpfs bounding it) too big a work dir."""
        if res.cpu_s is None or res.cpu_s > self.cfg["cpu_total_s"] - self.cfg["cpu_s"]:
            return True
        return not (child.layers or {}).get("tmpfs") and _work_over(child.work,
                                                                    self.disk_mb << 20)


def _stop_box(box: list, owner: int, grace_s: float = 0.0) -> None:
    """Stop the child in `box`, if any; only in the process that started it (a forked copy of
    the trainer must not kill its parent's worker)."""
    if box and os.getpid() == owner:
        box.pop().stop(grace_s)


def _config(timeout_s, memory_mb, file_mb, disk_mb, nproc, guard, namespaces, read_dirs,
            cpu_calls=None) -> dict:
    """The child's configuration; cpu_calls given: a persistent child (see CPU_CALLS_PER_WORKER)."""
    cpu_s = int(timeout_s) + 1
    return {"cpu_s": cpu_s, "cpu_total_s": cpu_s * (cpu_calls or 1),
            "persistent": cpu_calls is not None, "memory_mb": memory_mb, "file_mb": file_mb,
            "disk_mb": disk_mb, "nproc": nproc, "guard": guard, "namespaces": namespaces,
            "keep_read_cap": not (_nobody_can_read_python() and _nobody_can_read(read_dirs))}


def _spawn(worker, cfg: dict, files, site_packages: bool, payload=None):
    """Start a child in a fresh root (work/ and the read-only `files` beside it) and queue its
    setup line (with the payload of a one-shot run, which then closes its stdin).
    -> the _Child, or a SandboxResult saying why it could not start."""
    import inspect
    import shutil
    import subprocess
    import tempfile

    setup = {"cfg": {**cfg, "parent": os.getpid()},  # the pid the child checks it has
             "source": inspect.getsource(worker), "worker": worker.__name__}
    if not cfg["persistent"]:
        setup["payload"] = payload
    root = tempfile.mkdtemp(prefix="tao-sandbox-")
    try:
        work = _make_root(root, files)
        cmd = [sys.executable, "-I", *([] if site_packages else ["-S"]), os.path.abspath(__file__)]
        env = {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8"}
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, cwd=work, env=env,
                                start_new_session=True)
    except OSError as e:
        shutil.rmtree(root, ignore_errors=True)
        return SandboxResult(error=f"sandbox cannot start: {e}")
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    child = _Child(proc, root, work)
    child.send(setup, last=not cfg["persistent"])
    return child


def _make_root(root: str, files) -> str:
    """Fill a child's root: an empty work/ (owned by nobody when we are root) and the files,
    read-only, beside it. -> the work dir."""
    import shutil

    os.chmod(root, 0o755)
    work = os.path.join(root, "work")
    os.mkdir(work, 0o700)
    for name, src in (files or {}).items():
        shutil.copyfile(src, os.path.join(root, name))
        os.chmod(os.path.join(root, name), 0o444)
    if os.geteuid() == 0:
        os.chown(work, NOBODY, NOBODY)
    return work


class _Child:
    """One sandboxed child seen from the parent (layer 1): its process group, its pipes and
    what it has said. exchange() runs one call; stop() ends the child and removes its root."""

    def __init__(self, proc, root: str, work: str):
        import selectors

        self.proc, self.root, self.work = proc, root, work
        self.layers = None  # the child's "_sandbox" line, once read
        self.exit_code = None  # the worker's status, as its pid namespace's waiter reports it
        self.exited = self.stopped = False
        self._in, self._out = proc.stdin.fileno(), proc.stdout.fileno()
        self._err = proc.stderr.fileno()
        self._pending, self._last = memoryview(b""), False  # for its stdin; close it after?
        self._line = bytearray()  # an incomplete stdout line
        self._sel = selectors.DefaultSelector()
        for fd in (self._in, self._out, self._err):
            os.set_blocking(fd, False)
        self._sel.register(self._out, selectors.EVENT_READ)
        self._sel.register(self._err, selectors.EVENT_READ)
        try:  # readable when the child exits; otherwise poll
            self._pidfd = os.pidfd_open(proc.pid)
            self._sel.register(self._pidfd, selectors.EVENT_READ)
        except (AttributeError, OSError):
            self._pidfd = None

    def send(self, obj, last: bool = False) -> None:
        """Queue one JSON line for the child's stdin (written by exchange()); last: close
        stdin after it."""
        import selectors

        line = json.dumps(obj).encode() + b"\n"  # JSON escapes the newlines inside strings
        self._pending = memoryview(bytes(self._pending) + line)
        self._last = last
        if self._in not in self._sel.get_map() and not self.proc.stdin.closed:
            self._sel.register(self._in, selectors.EVENT_WRITE)

    def exchange(self, deadline: float, out_cap: int, err_cap: int,
                 until_done: bool) -> SandboxResult:
        """Write what is queued, read stdout (parsed line by line) and stderr up to their caps
        until the call's end line (until_done) or EOF, or the deadline, or a flood. When the
        child exits its process group is killed at once (stragglers) and what is left to read
        gets one more second (a straggler may have escaped the group and hold the pipes)."""
        res = SandboxResult(started=self.layers is not None, layers=self.layers)
        err, counts = bytearray(), {self._out: 0, self._err: 0}
        caps = {self._out: out_cap, self._err: err_cap}
        while self._out in self._sel.get_map() or self._err in self._sel.get_map():
            if until_done and (res.done or res.error is not None):
                break
            now = time.monotonic()
            if now >= deadline:
                res.timed_out = not self.exited
                break
            for key, _ in self._sel.select(min(deadline - now, 0.05 if self._pidfd is None
                                               else 3600)):
                if key.fd == self._pidfd:
                    self._sel.unregister(self._pidfd)
                elif key.fd == self._in:
                    self._write()
                else:
                    chunk = os.read(key.fd, 1 << 16)
                    if not chunk:
                        self._sel.unregister(key.fd)
                    room = max(caps[key.fd] - counts[key.fd], 0)
                    counts[key.fd] += len(chunk)
                    res.flooded |= len(chunk) > room
                    if key.fd == self._out:
                        self._parse(chunk[:room], res, eof=not chunk)
                    else:
                        err += chunk[:room]
            if not self.exited and self.has_exited():
                self.exited = True
                _killpg(self.proc.pid)
                deadline = min(deadline, time.monotonic() + 1.0)
            if res.flooded:
                break
        res.stderr = err.decode("utf-8", "replace")
        return res

    def _write(self) -> None:
        """Write the next piece of what is queued for stdin (dropped if the child is gone)."""
        try:
            self._pending = self._pending[os.write(self._in, self._pending[:1 << 16]):]
        except BrokenPipeError:
            self._pending = memoryview(b"")
        if not self._pending:
            self._sel.unregister(self._in)
            if self._last:
                self.proc.stdin.close()

    def _parse(self, chunk: bytes, res: SandboxResult, eof: bool) -> None:
        """Add stdout bytes; each complete line is a JSON message: the child's layers, the end
        of a call (done, or the worker's error), the waiter's report of the exit status, or
        one of the worker's results."""
        self._line += chunk
        if b"\n" not in chunk and not eof:
            return  # a long line arriving: search only the new bytes for its end
        *lines, rest = self._line.split(b"\n")
        self._line = bytearray() if eof else bytearray(rest)
        for line in lines + ([rest] if eof else []):
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            keys = obj.keys() if isinstance(obj, dict) else ()
            if "_sandbox" in keys and self.layers is None:
                self.layers = res.layers = obj["_sandbox"]
                res.started = True
            elif "_done" in keys and keys <= {"_done", "cpu_s"}:
                res.done, res.cpu_s = True, obj.get("cpu_s")
            elif keys == {"_error"}:
                res.error = obj["_error"]
            elif keys == {"_exit"}:
                self.exit_code = obj["_exit"]
            elif res.started:
                res.messages.append(obj)

    def has_exited(self) -> bool:
        """Whether the child has exited (not reaped: its group id stays ours until wait())."""
        if self.stopped:
            return True
        return bool(os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT))

    def stop(self, grace_s: float = 0.0) -> None:
        """End the child (idempotent): with grace_s, close its stdin and give it that long to
        exit by itself; then let a pid namespace's waiter kill and reap the namespace, SIGKILL
        the process group, reap, close the pipes and remove the root."""
        import shutil
        import signal
        import subprocess

        if self.stopped:
            return
        if grace_s and not self.proc.stdin.closed:
            self._close(self.proc.stdin)
            self._wait_exit(grace_s)
        if not self.has_exited() and (self.layers or {}).get("pidns"):
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(2.0)
            except subprocess.TimeoutExpired:
                pass
        _killpg(self.proc.pid)
        self.proc.wait()
        self.stopped = True
        self._sel.close()
        if self._pidfd is not None:
            os.close(self._pidfd)
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            self._close(f)
        shutil.rmtree(self.root, ignore_errors=True)

    def _wait_exit(self, limit_s: float) -> None:
        """Wait up to limit_s for the child to exit, without reaping it."""
        import select

        t_end = time.monotonic() + limit_s
        while not self.has_exited() and (left := t_end - time.monotonic()) > 0:
            if self._pidfd is not None:
                select.select([self._pidfd], [], [], left)
            else:
                time.sleep(min(left, 0.01))

    @staticmethod
    def _close(f) -> None:
        try:
            f.close()
        except OSError:
            pass

    def settle(self, res: SandboxResult, t0: float) -> SandboxResult:
        """Complete a call's result: the wall time; once the child is gone, its exit statuses
        and, when the sandbox never started, why."""
        res.wall_s = time.monotonic() - t0
        if self.stopped:
            res.returncode = self.proc.returncode
            res.exit_code = self.exit_code if self.exit_code is not None else res.returncode
        if not res.started and res.error is None:
            tail = " | ".join(res.stderr.strip().splitlines()[-3:])
            res.error = f"sandbox did not start (exit {res.returncode}): {tail or 'no output'}"
        return res


def _killpg(pgid: int):
    import signal

    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _work_over(work: str, limit_bytes: int) -> bool:
    """Whether a work dir that no tmpfs bounds holds more than limit_bytes, or more than
    WORK_ENTRIES_CAP entries (more than is worth walking after every call)."""
    total, entries = 0, 0
    for top, dirs, names in os.walk(work):
        for name in dirs + names:
            entries += 1
            try:
                total += os.lstat(os.path.join(top, name)).st_size
            except OSError:
                pass
        if entries > WORK_ENTRIES_CAP or total > limit_bytes:
            return True
    return False


_READABLE: list[bool] = []


def _nobody_can_read_python() -> bool:
    """Whether uid nobody can enter every directory on the way to the standard library."""
    import sysconfig

    if not _READABLE:
        dirs = set()
        for d in (os.path.dirname(os.__file__), sysconfig.get_paths()["purelib"]):
            d = os.path.realpath(d)
            while d not in dirs:
                dirs.add(d)
                d = os.path.dirname(d)
        try:
            _READABLE.append(all(os.stat(d).st_mode & 0o001 for d in dirs))
        except OSError:
            _READABLE.append(False)
    return _READABLE[0]


def _nobody_can_read(dirs) -> bool:
    """Whether uid nobody (as "other") can list each of `dirs` and enter every directory on the
    way to it."""
    for d in map(os.path.realpath, dirs):
        try:
            if os.stat(d).st_mode & 0o005 != 0o005:
                return False
            while d != os.path.dirname(d):
                d = os.path.dirname(d)
                if not os.stat(d).st_mode & 0o001:
                    return False
        except OSError:
            return False
    return True


# ---------------------------------------------------------------------------- the child side

def _lock_down(cfg: dict, work: str, out: int) -> dict:
    """Layers 2-4, in the child, before any untrusted input is looked at. -> what is active.
    out: the result channel, on which a pid namespace's waiter reports the worker's exit."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    root = os.geteuid() == 0
    layers = {"netns": False, "pidns": False, "tmpfs": False, "uid": os.getuid(),
              "guard": cfg["guard"]}
    flags = _unshare(libc, cfg, root)
    layers["netns"] = bool(flags)
    if flags & CLONE_NEWPID:  # the namespace starts with our first child: become its waiter
        _become_waiter(libc, out, cfg["parent"])
        layers["pidns"] = True
        opts = f"size={cfg['disk_mb']}m,mode=0700" + (f",uid={NOBODY},gid={NOBODY}" if root else "")
        if libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) == 0 and libc.mount(
                b"tmpfs", work.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, opts.encode()) == 0:
            layers["tmpfs"] = True
            os.chdir(work)  # the mount hides the old directory: enter the new one
    layers.update(_drop_identity(libc, cfg, root, flags))
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    _die_with_parent(libc, None if layers["pidns"] else cfg["parent"])  # after the uid change
    _set_limits(cfg)
    return layers


def _unshare(libc, cfg: dict, root: bool) -> int:
    """Layer 2: new network (and, where allowed, mount and pid) namespaces; not root, inside a
    new user namespace that maps our own ids. -> the flags that took (0: none)."""
    uid, gid = os.getuid(), os.getgid()
    userns = 0 if root else CLONE_NEWUSER
    for flags in (userns | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID, userns | CLONE_NEWNET):
        if cfg["namespaces"] and libc.unshare(flags) == 0:
            break
    else:
        return 0
    if flags & CLONE_NEWUSER:  # map our own ids, so files keep their owner
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"),
                           ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    return flags


def _become_waiter(libc, out: int, parent: int) -> None:
    """Fork the pid namespace's init (the worker: this returns in it) and stay outside as its
    waiter: SIGTERM from the parent kills the namespace; when the init is gone the waiter writes
    its exit status on `out` ({"_exit": code}, negative: a signal) and exits with it."""
    import signal

    child = []

    def on_sigterm(*_):  # from the parent: kill the namespace (its init), reap it, exit
        try:
            child and os.kill(child[0], signal.SIGKILL)
        except OSError:  # already reaped
            pass

    signal.signal(signal.SIGTERM, on_sigterm)
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        return
    child.append(pid)
    _die_with_parent(libc, parent)  # and the init dies with its waiter
    status = os.waitpid(pid, 0)[1]
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # nothing left to kill
    code = os.waitstatus_to_exitcode(status)
    try:  # never block on a full pipe: the parent may no longer read it
        os.set_blocking(out, False)
        os.write(out, b'\n{"_exit": %d}\n' % code)
    except OSError:
        pass
    os._exit(code if code >= 0 else 128 - code)


def _die_with_parent(libc, parent: int | None) -> None:
    """PR_SET_PDEATHSIG: SIGKILL when the thread that started us dies, so no child outlives a
    trainer killed without cleanup. Set after the last uid change (which clears it). parent:
    the pid our parent must still have (it may have died before we asked); None in a pid
    namespace, where the parent outside reads as 0."""
    import signal

    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if parent is not None and os.getppid() != parent:
        os._exit(1)


def _drop_identity(libc, cfg: dict, root: bool, flags: int) -> dict:
    """Layer 3: as root become nobody, keeping CAP_DAC_READ_SEARCH alone where the code to read
    needs it; in a user namespace drop every capability. -> the layers it set."""
    import ctypes

    keep = 1 << CAP_DAC_READ_SEARCH if root and cfg["keep_read_cap"] else 0
    layers = {"uid": os.getuid()}
    if root:
        if keep:
            libc.prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0)
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
        layers["uid"] = NOBODY
    if keep or flags & CLONE_NEWUSER:  # keep only what is needed (or nothing) of our caps
        class Head(ctypes.Structure):
            _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

        data = (ctypes.c_uint32 * 6)(keep, keep, 0, 0, 0, 0)  # effective, permitted, inheritable
        if libc.capset(ctypes.byref(Head(0x20080522, 0)), data) != 0:
            raise OSError(ctypes.get_errno(), "capset failed")
    layers["read_any_file"] = bool(keep)
    return layers


def _set_limits(cfg: dict) -> None:
    """Layer 4. RLIMIT_CPU: soft one call's budget, hard the child's total (equal for a one-shot
    child; a persistent one re-arms the soft limit before each call: _arm_cpu)."""
    import resource

    mb = 1 << 20
    limits = {resource.RLIMIT_CPU: (cfg["cpu_s"], cfg["cpu_total_s"]),
              resource.RLIMIT_AS: (cfg["memory_mb"] * mb,) * 2,
              resource.RLIMIT_FSIZE: (cfg["file_mb"] * mb,) * 2,
              resource.RLIMIT_NPROC: (cfg["nproc"],) * 2, resource.RLIMIT_NOFILE: (64, 64),
              resource.RLIMIT_CORE: (0, 0)}
    for what, (soft, hard) in limits.items():
        now = resource.getrlimit(what)[1]
        if now != resource.RLIM_INFINITY:
            soft, hard = min(soft, now), min(hard, now)
        resource.setrlimit(what, (soft, hard))


def _arm_cpu(budget_s: int) -> None:
    """Before each call of a persistent child: soft RLIMIT_CPU = the CPU time used so far plus
    one call's budget, at most the hard limit (see CPU_CALLS_PER_WORKER); past it the kernel's
    SIGXCPU kills the child. The worker could raise its own soft limit up to the hard one: the
    wall clock still ends its call, the hard limit its CPU."""
    import math
    import resource

    hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
    soft = math.ceil(sum(os.times()[:2])) + budget_s
    resource.setrlimit(resource.RLIMIT_CPU,
                       (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))


def _end_on_sigxcpu(out: int, budget_s: int) -> None:
    """A persistent child's soft CPU limit only sends SIGXCPU, which a pid namespace's init
    ignores without a handler (measured: a worker spun 2.5 CPU s past its soft limit and lived;
    a one-shot child needs none, its soft limit is the hard one, whose SIGKILL always lands).
    The handler runs between bytecodes of the main thread and ends the call with an error; a
    worker could replace it, or raise its soft limit: the wall clock still ends the call."""
    import signal

    def on_sigxcpu(*_):
        try:  # never block here on a full pipe; a newline first ends any line cut short
            os.set_blocking(out, False)
            os.write(out, b'\n{"_error": "CPU time limit: over %d s in one call"}\n' % budget_s)
        except OSError:
            pass
        os._exit(128 + signal.SIGXCPU)

    signal.signal(signal.SIGXCPU, on_sigxcpu)


def _guard(work: str):
    """Layer 5: the audit hook. Raises PermissionError (ImportError for imports) on a refusal."""
    deny = {"os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
            "subprocess.Popen", "os.killpg", "signal.pthread_kill", "socket.__new__",
            "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg",
            "ctypes.dlopen", "ctypes.dlsym", "ctypes.call_function", "ctypes.cdata",
            "gc.get_objects", "gc.get_referrers", "gc.get_referents"}
    no_import = {"ctypes", "_ctypes", "_posixsubprocess"}
    # event -> positions of the paths it changes; any dir_fd argument is refused outright
    paths = {"os.remove": (0,), "os.rmdir": (0,), "os.rename": (0, 1), "os.link": (0, 1),
             "os.symlink": (1,), "os.mkdir": (0,), "os.chmod": (0,), "os.chown": (0,),
             "os.truncate": (0,), "os.utime": (0,), "os.chflags": (0,), "os.lchflags": (0,),
             "os.setxattr": (0,), "os.removexattr": (0,), "shutil.rmtree": (0,),
             "shutil.copyfile": (1,), "shutil.copymode": (1,), "shutil.copystat": (1,)}
    dir_fds = {"os.remove": (1,), "os.rmdir": (1,), "os.rename": (2, 3), "os.link": (2, 3),
               "os.symlink": (2,), "os.mkdir": (2,), "os.chmod": (2,), "os.chown": (3,),
               "os.utime": (3,), "shutil.rmtree": (1,)}
    writes = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
    me, realpath, fsdecode = os.getpid(), os.path.realpath, os.fsdecode

    def inside(path) -> bool:
        if isinstance(path, int):
            return False
        p = realpath(fsdecode(path))
        return p == work or p.startswith(work + "/") or p == "/dev/null"

    def hook(event, args):
        if event in deny:
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open":
            path, mode, flags = args
            writing = (mode and any(c in mode for c in "wax+")) or (flags or 0) & writes
            if writing and not isinstance(path, int) and not inside(path):
                raise PermissionError(f"sandbox: cannot write {path!r} (outside work dir)")
        elif event == "import" and args[0] in no_import:
            raise ImportError(f"sandbox: import of {args[0]} is not allowed")
        elif event == "os.kill" and args[0] != me:
            raise PermissionError("sandbox: signals to other processes are not allowed")
        elif event == "sqlite3.connect" and args[0] not in (":memory:", ""):
            db, _, query = str(args[0]).partition("?")  # a file: URI opened mode=ro is fine
            modes = [p for p in query.split("&") if p.startswith("mode=")]
            if not (db.startswith("file:") and modes == ["mode=ro"]) \
                    and not inside(db[5:] if db.startswith("file:") else args[0]):
                raise PermissionError(f"sandbox: cannot open database {args[0]!r} for writing")
        elif event in paths:
            if any(args[i] not in (None, -1) for i in dir_fds.get(event, ()) if i < len(args)):
                raise PermissionError(f"sandbox: {event} with dir_fd is not allowed")
            for i in paths[event]:
                if not inside(args[i]):
                    raise PermissionError(f"sandbox: {event} {args[i]!r} outside work dir")
    return hook


class _Sink(io.TextIOBase):
    """sys.stdout and sys.stderr of the child: prints go to stderr, the first STDERR_CAP chars
    of them (per call, in a persistent child: `left` is reset before each)."""

    def __init__(self):
        super().__init__()
        self.left = STDERR_CAP

    def write(self, s):
        if self.left > 0:
            chunk, self.left = s[:self.left], self.left - len(s)
            os.write(2, chunk.encode("utf-8", "replace"))
        return len(s)


def _emitter(out: int):
    """emit(obj): one JSON line on the result channel."""
    def emit(obj):
        data = (json.dumps(obj) + "\n").encode()
        while data:
            data = data[os.write(out, data):]
    return emit


def _serve(fn, payload, emit, report_cpu: bool) -> None:
    """One call of the worker, ended by its end line: done (with the CPU seconds used so far,
    for a persistent child's parent) or the worker's error."""
    try:
        fn(payload, emit)
        emit({"_done": True, "cpu_s": round(sum(os.times()[:2]), 3)} if report_cpu
             else {"_done": True})
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        emit({"_error": f"{type(e).__name__}: {e}"[:500]})


def _child():
    """The child's main: read the setup line, lock down, run the worker once, or (persistent)
    once per request line until the parent closes stdin."""
    inp = os.fdopen(os.dup(0), "rb")  # the setup line, then (persistent) one line per call
    req = json.loads(inp.readline())
    cfg, work = req["cfg"], os.getcwd()
    out = os.dup(1)  # the result channel; fd 1 becomes stderr, so stray writes cannot forge it
    os.dup2(2, 1)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    if not cfg["persistent"]:
        inp.close()
    layers = _lock_down(cfg, work, out)
    for name in [m for m in sys.modules if m.split(".")[0] in ("ctypes", "_ctypes")]:
        del sys.modules[name]  # the worker gets no ctypes (the guard also refuses re-imports)
    sys.dont_write_bytecode = True
    sink = _Sink()
    sys.stdout = sys.stderr = sink
    sys.stdin = io.StringIO()
    emit = _emitter(out)
    if cfg["guard"]:
        sys.addaudithook(_guard(os.getcwd()))
    emit({"_sandbox": layers})
    try:
        ns = {"__name__": "__sandbox_worker__"}
        exec(compile(req["source"], "<worker>", "exec"), ns)  # noqa: S102 - the worker's code
        fn = ns[req["worker"]]
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        emit({"_error": f"{type(e).__name__}: {e}"[:500]})
        os._exit(0)
    if not cfg["persistent"]:
        _serve(fn, req["payload"], emit, report_cpu=False)
        os._exit(0)
    _end_on_sigxcpu(out, cfg["cpu_s"])
    for line in iter(inp.readline, b""):  # EOF: the parent closed the worker
        sink.left = STDERR_CAP
        _arm_cpu(cfg["cpu_s"])
        _serve(fn, json.loads(line), emit, report_cpu=True)
    os._exit(0)


if __name__ == "__main__":
    _child()
