"""Run a worker function on untrusted input in a throw-away, locked-down child process.

    res = sandbox.run(worker, payload, timeout_s=10, memory_mb=512, files={"db.sqlite": path})

`worker(payload, emit)` is a module-level function that imports only the standard library inside
its body: its *source* is sent to the child, so it sees no module globals. It calls `emit(obj)` for
each JSON-able result as soon as it has one; what it emitted before a crash or a timeout comes back
in `res.messages`. The child is `python -I [-S] sandbox.py`, cwd a fresh empty `work/` dir; the
`files` are copied (read-only) next to it, into `..`. `res.started` is False only when the sandbox
itself could not be set up: an infrastructure failure, not a verdict on the input.

Layers, outside in, and what each does NOT cover:
1. Parent: wall-clock limit; the child leads its own session and the whole process group is
   SIGKILLed on timeout and on exit; stdout/stderr are read up to a cap (a flood kills the child).
   A process that leaves the group (setsid) escapes this layer, not layer 2's pid namespace.
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
(the code verifier's candidates) can walk frames to reach `emit` and fake results.
"""
from __future__ import annotations

import json
import os
import sys
import time

NOBODY = 65534
CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x20000, 0x10000000, 0x20000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_REC, MS_PRIVATE = 2, 4, 1 << 14, 1 << 18
PR_SET_DUMPABLE, PR_SET_KEEPCAPS, PR_SET_NO_NEW_PRIVS = 4, 8, 38
CAP_DAC_READ_SEARCH = 2
STDERR_CAP = 64 << 10  # bytes of the child's stderr kept (and its prints, via the Python sink)


class SandboxResult:
    def __init__(self, *, messages=(), started=False, done=False, error=None, timed_out=False,
                 flooded=False, returncode=None, stderr="", layers=None, wall_s=0.0):
        self.messages = list(messages)  # what the worker emitted, in order
        self.started, self.done = started, done  # sandbox set up / worker returned
        self.error = error  # the worker raised ("Type: message"), or why nothing started
        self.timed_out, self.flooded = timed_out, flooded  # killed: wall clock / output cap
        self.returncode, self.stderr, self.wall_s = returncode, stderr, wall_s
        self.layers = layers or {}  # which protections the child reported as active

    def __repr__(self):
        return f"SandboxResult({self.__dict__!r})"


def run(worker, payload, *, timeout_s: float = 10.0, memory_mb: int = 512, files=None,
        file_mb: int = 16, disk_mb: int = 64, nproc: int = 16, site_packages: bool = False,
        guard: bool = True, namespaces: bool = True, max_output: int = 4 << 20,
        read_dirs=()) -> SandboxResult:
    """Run `worker(payload, emit)` in the sandbox (see the module docstring). read_dirs: the
    directories the worker reads besides the interpreter's (a user scorer's module and working
    directory); as root, where uid nobody cannot list one of them or enter a directory above,
    the child keeps CAP_DAC_READ_SEARCH (layer 3)."""
    import inspect
    import shutil
    import subprocess
    import tempfile

    t0 = time.monotonic()
    root = tempfile.mkdtemp(prefix="tao-sandbox-")
    try:
        os.chmod(root, 0o755)
        work = os.path.join(root, "work")
        os.mkdir(work, 0o700)
        for name, src in (files or {}).items():
            shutil.copyfile(src, os.path.join(root, name))
            os.chmod(os.path.join(root, name), 0o444)
        if os.geteuid() == 0:
            os.chown(work, NOBODY, NOBODY)
        cfg = {"cpu_s": int(timeout_s) + 1, "memory_mb": memory_mb, "file_mb": file_mb,
               "disk_mb": disk_mb, "nproc": nproc, "guard": guard, "namespaces": namespaces,
               "keep_read_cap": not (_nobody_can_read_python() and _nobody_can_read(read_dirs))}
        request = json.dumps({"cfg": cfg, "source": inspect.getsource(worker),
                              "worker": worker.__name__, "payload": payload}).encode()
        cmd = [sys.executable, "-I", *([] if site_packages else ["-S"]), os.path.abspath(__file__)]
        env = {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8"}
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, cwd=work, env=env,
                                    start_new_session=True)
        except OSError as e:
            return SandboxResult(error=f"sandbox cannot start: {e}", wall_s=time.monotonic() - t0)
        with proc:
            out, err, timed_out, flooded = _pump(proc, request, t0 + timeout_s, max_output)
        res = SandboxResult(timed_out=timed_out, flooded=flooded, returncode=proc.returncode,
                            stderr=err.decode("utf-8", "replace"), wall_s=time.monotonic() - t0)
        for line in out.splitlines():
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict) and "_sandbox" in obj and not res.started:
                res.started, res.layers = True, obj["_sandbox"]
            elif isinstance(obj, dict) and obj.keys() == {"_done"}:
                res.done = True
            elif isinstance(obj, dict) and obj.keys() == {"_error"}:
                res.error = obj["_error"]
            elif res.started:
                res.messages.append(obj)
        if not res.started and res.error is None:
            tail = " | ".join(res.stderr.strip().splitlines()[-3:])
            res.error = f"sandbox did not start (exit {proc.returncode}): {tail or 'no output'}"
        return res
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _pump(proc, data: bytes, deadline: float, cap: int):
    """Feed stdin, read stdout/stderr up to their caps until EOF or the deadline; then kill the
    process group (stragglers included) and reap. -> (out, err, timed_out, flooded)"""
    import selectors
    import signal
    import subprocess

    sel = selectors.DefaultSelector()
    outs = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    caps = {proc.stdout.fileno(): cap, proc.stderr.fileno(): STDERR_CAP}
    stdin = proc.stdin.fileno()
    for fd in (*outs, stdin):
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_WRITE if fd == stdin else selectors.EVENT_READ)
    try:  # readable when the child exits; otherwise poll
        pidfd = os.pidfd_open(proc.pid)
        sel.register(pidfd, selectors.EVENT_READ)
    except (AttributeError, OSError):
        pidfd = None
    view, exited, timed_out, flooded = memoryview(data), False, False, False
    while any(fd in sel.get_map() for fd in outs):
        now = time.monotonic()
        if now >= deadline:
            timed_out = not exited
            break
        for key, _ in sel.select(min(deadline - now, 0.05 if pidfd is None else 3600)):
            fd = key.fd
            if fd == pidfd:
                sel.unregister(pidfd)
            elif fd == stdin:
                try:
                    view = view[os.write(fd, view[:1 << 16]):]
                except BrokenPipeError:
                    view = view[:0]
                if not view:
                    sel.unregister(fd)
                    proc.stdin.close()
            else:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    sel.unregister(fd)
                elif len(outs[fd]) + len(chunk) > caps[fd]:
                    flooded = True
                    outs[fd] += chunk[:caps[fd] - len(outs[fd])]
                    sel.unregister(fd)
                else:
                    outs[fd] += chunk
        if not exited and os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT):
            exited = True  # still a zombie, so its group id is not reused: kill what it left
            _killpg(proc.pid)
            deadline = min(deadline, time.monotonic() + 1.0)  # grace for escaped pipe holders
        if flooded:
            break
    first = outs[proc.stdout.fileno()].split(b"\n", 1)[0]
    if not exited and b'"pidns": true' in first:  # let the waiter kill and reap its namespace
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(2.0)
        except subprocess.TimeoutExpired:
            pass
    _killpg(proc.pid)
    proc.wait()
    if pidfd is not None:
        os.close(pidfd)
    return bytes(outs[proc.stdout.fileno()]), bytes(outs[proc.stderr.fileno()]), timed_out, flooded


def _killpg(pgid: int):
    import signal

    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


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

def _lock_down(cfg: dict, work: str) -> dict:
    """Layers 2-4, in the child, before any untrusted input is looked at. -> what is active."""
    import ctypes
    import resource
    import signal

    libc = ctypes.CDLL(None, use_errno=True)
    root = os.geteuid() == 0
    uid, gid = os.getuid(), os.getgid()
    layers = {"netns": False, "pidns": False, "tmpfs": False, "uid": uid, "guard": cfg["guard"]}
    userns = 0 if root else CLONE_NEWUSER
    for flags in (userns | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID, userns | CLONE_NEWNET):
        if cfg["namespaces"] and libc.unshare(flags) == 0:
            break
    else:
        flags = 0
    if flags & CLONE_NEWUSER:  # map our own ids, so files keep their owner
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"),
                           ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    layers["netns"] = bool(flags)
    if flags & CLONE_NEWPID:  # the namespace starts with our first child: become its waiter
        child = []  # SIGTERM from the parent: kill the namespace (its init), reap it, exit
        signal.signal(signal.SIGTERM, lambda *_: child and os.kill(child[0], signal.SIGKILL))
        pid = os.fork()
        if pid:
            child.append(pid)
            status = os.waitpid(pid, 0)[1]
            code = os.waitstatus_to_exitcode(status)
            os._exit(code if code >= 0 else 128 - code)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        layers["pidns"] = True
        opts = f"size={cfg['disk_mb']}m,mode=0700" + (f",uid={NOBODY},gid={NOBODY}" if root else "")
        if libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) == 0 and libc.mount(
                b"tmpfs", work.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, opts.encode()) == 0:
            layers["tmpfs"] = True
            os.chdir(work)  # the mount hides the old directory: enter the new one
    keep = 1 << CAP_DAC_READ_SEARCH if root and cfg["keep_read_cap"] else 0
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
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    limits = {resource.RLIMIT_CPU: cfg["cpu_s"], resource.RLIMIT_AS: cfg["memory_mb"] << 20,
              resource.RLIMIT_FSIZE: cfg["file_mb"] << 20, resource.RLIMIT_NPROC: cfg["nproc"],
              resource.RLIMIT_NOFILE: 64, resource.RLIMIT_CORE: 0}
    for what, value in limits.items():
        hard = resource.getrlimit(what)[1]
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(what, (value, value))
    return layers


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


def _child():
    import io

    req = json.loads(sys.stdin.buffer.read())
    cfg, work = req["cfg"], os.getcwd()
    out = os.dup(1)  # the result channel; fd 1 becomes stderr, so stray writes cannot forge it
    os.dup2(2, 1)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    layers = _lock_down(cfg, work)
    for name in [m for m in sys.modules if m.split(".")[0] in ("ctypes", "_ctypes")]:
        del sys.modules[name]  # the worker gets no ctypes (the guard also refuses re-imports)
    sys.dont_write_bytecode = True

    class Sink(io.TextIOBase):  # prints go to stderr, the first STDERR_CAP chars of them
        left = STDERR_CAP

        def write(self, s):
            if Sink.left > 0:
                chunk, Sink.left = s[:Sink.left], Sink.left - len(s)
                os.write(2, chunk.encode("utf-8", "replace"))
            return len(s)

    sys.stdout = sys.stderr = Sink()
    sys.stdin = io.StringIO()

    def emit(obj):
        data = (json.dumps(obj) + "\n").encode()
        while data:
            data = data[os.write(out, data):]

    if cfg["guard"]:
        sys.addaudithook(_guard(os.getcwd()))
    emit({"_sandbox": layers})
    try:
        ns = {"__name__": "__sandbox_worker__"}
        exec(compile(req["source"], "<worker>", "exec"), ns)  # noqa: S102 - the worker's code
        ns[req["worker"]](req["payload"], emit)
        emit({"_done": True})
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        emit({"_error": f"{type(e).__name__}: {e}"[:500]})
    os._exit(0)


if __name__ == "__main__":
    _child()
