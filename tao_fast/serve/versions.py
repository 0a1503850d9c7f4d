"""--model PATH|RUN_DIR: which model version is served, and the switch to each new round.

A RUN_DIR (config.yaml and/or checkpoint-roundN dirs, as `tao-fast tune` writes them) means its
newest complete round: the checkpoint-roundN with the largest N that has config.json and its
safetensors (every file its index names), or a LoRA run's adapter (adapter_config.json and
adapter_model.safetensors: served as its base with the adapter); tune writes each one under a
temporary name and renames it into place, so a half-written one is not seen, but a directory
copied in by hand is checked anyway. A RUN_DIR with no complete round yet serves its
config.yaml's model.path (version "base") until round 1 appears.

RoundWatcher polls the RUN_DIR every poll_s; when a newer complete round appears it loads a new
backend for it in its own thread (the old one keeps serving meanwhile; both are in memory for
that time) and ModelSwitcher.switch() makes it current: new requests go to it, requests in
flight finish on the old one, which is closed once the last of them is done (reference count).
The version string is the round's directory name; the fingerprint adds a short hash of
config.json (a LoRA round's adapter_config.json) and of each weights file's size and first and
last MiB (cheap: no full read of the weights; a cheap fingerprint, not a content hash). The
time from the checkpoint appearing (its newest file's mtime) to the first answer it served is
printed and kept for /health.
"""
from __future__ import annotations

import hashlib
import json
import re
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tao_fast.config import ConfigError
from tao_fast.models.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, is_adapter_dir

ROUND = re.compile(r"^checkpoint-round(\d+)$")
HASHED_BYTES = 1 << 20  # per end of each weights file, for the fingerprint


def _log(msg: str) -> None:
    print(f"[tao-fast serve] {msg}", file=sys.stderr, flush=True)


@dataclass
class Version:
    """One servable model version."""
    name: str  # "checkpoint-round2", "base", or the model directory's name
    path: str  # what load_model takes (a directory, or embedded:NAME)
    round: int = -1  # the round number; -1 for a plain model or the base
    fingerprint: str = ""
    appeared_at: float = 0.0  # wall time its files were last written (0: unknown)


def is_complete(d: Path) -> bool:
    """config.json and the safetensors weights (every file the index names) are there, or a
    whole LoRA adapter (lora.is_adapter_dir, with its weights)."""
    if is_adapter_dir(d):
        return (d / ADAPTER_WEIGHTS).is_file()
    if not (d / "config.json").is_file():
        return False
    index = d / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return False
        return all((d / f).is_file() for f in files)
    return any(d.glob("*.safetensors"))


def rounds(run_dir: Path) -> list[tuple[int, Path]]:
    """The complete round checkpoints of a run directory, oldest first."""
    try:
        found = [(int(m.group(1)), p) for p in run_dir.iterdir()
                 if (m := ROUND.match(p.name)) and p.is_dir()]
    except OSError:
        return []
    return sorted((n, p) for n, p in found if is_complete(p))


def fingerprint(d: Path) -> str:
    """8 hex digits over config.json and each weights file's name, size, first and last MiB."""
    h = hashlib.sha256((d / (ADAPTER_CONFIG if is_adapter_dir(d) else "config.json"))
                       .read_bytes())
    for f in sorted(d.glob("*.safetensors")):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(HASHED_BYTES))
            fh.seek(max(0, size - HASHED_BYTES))
            h.update(fh.read(HASHED_BYTES))
    return h.hexdigest()[:8]


def _appeared_at(d: Path) -> float:
    return max([d.stat().st_mtime] + [f.stat().st_mtime for f in d.iterdir()])


def round_version(n: int, d: Path) -> Version:
    return Version(d.name, str(d), n, f"{d.name}-{fingerprint(d)}", _appeared_at(d))


def is_run_dir(p: Path) -> bool:
    return p.is_dir() and ((p / "config.yaml").is_file()
                           or any(ROUND.match(c.name) for c in p.iterdir()))


def _base_version(run_dir: Path) -> Version:
    """The model a run started from (its config.yaml's model.path), before any round."""
    import yaml

    try:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
        path = str(cfg["model"]["path"])
    except (OSError, yaml.YAMLError, KeyError, TypeError) as e:
        raise ConfigError(f"--model {run_dir}: a run directory with no complete "
                          f"checkpoint-roundN and no readable model.path in config.yaml "
                          f"({type(e).__name__}: {e})") from None
    fp = fingerprint(Path(path)) if Path(path).is_dir() else path
    return Version("base", path, -1, f"base-{fp}")


def initial_version(spec: str) -> tuple[Version, Path | None]:
    """--model's version to serve first, and the run directory to watch (None: a plain
    model). A bad --model is one line (ConfigError / FileNotFoundError)."""
    if spec.startswith("embedded"):
        return Version(spec, spec, fingerprint=spec), None
    p = Path(spec).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"--model {spec}: does not exist (a model directory, a "
                                f"run directory, or embedded:NAME)")
    if is_run_dir(p):
        done = rounds(p)
        return (round_version(*done[-1]) if done else _base_version(p)), p
    if p.is_dir() and is_complete(p):
        return Version(p.name, str(p), fingerprint=f"{p.name}-{fingerprint(p)}"), None
    raise ConfigError(f"--model {spec}: neither a model directory (config.json + "
                      f"*.safetensors) nor a run directory (config.yaml, checkpoint-roundN)")


@dataclass
class Served:
    """A version being served: its backend and the requests using it."""
    version: Version
    backend: object
    refs: int = 0
    retired: bool = False
    loaded_at: float = field(default_factory=time.time)
    first_answer_s: float | None = None  # appeared -> first answer served
    switched_to: bool = False  # made current by switch() (the first version is not timed)


class ModelSwitcher:
    """The current backend, reference-counted per request; switch() retires the old one."""

    def __init__(self, backend, version: Version):
        self._lock = threading.Lock()
        self.current = Served(version, backend)
        self.switches: list[dict] = []  # one per switch, for /health

    def acquire(self) -> Served:
        """The Served entry a request runs on; release() it when the request is done."""
        with self._lock:
            entry = self.current
            entry.refs += 1
            return entry

    def release(self, entry: Served) -> None:
        with self._lock:
            entry.refs -= 1
            done = entry.retired and entry.refs == 0
        if done:
            self._close(entry)

    @contextmanager
    def use(self):
        """acquire() for the length of a block."""
        entry = self.acquire()
        try:
            yield entry
        finally:
            self.release(entry)

    def answered(self, entry: Served) -> None:
        """A request got its answer from entry: the first one after a switch is timed."""
        if not entry.switched_to or entry.first_answer_s is not None:
            return
        entry.first_answer_s = time.time() - entry.version.appeared_at
        for s in self.switches:
            if s["to"] == entry.version.name and s.get("first_answer_s") is None:
                s["first_answer_s"] = round(entry.first_answer_s, 3)
        _log(f"{entry.version.name}: first answer {entry.first_answer_s:.2f} s after the "
             f"checkpoint appeared")

    def switch(self, backend, version: Version, load_s: float = 0.0) -> None:
        """Make backend current; the old one is closed once no request uses it."""
        with self._lock:
            old, self.current = self.current, Served(version, backend, switched_to=True)
            old.retired = True
            done = old.refs == 0
        self.switches.append({"from": old.version.name, "to": version.name,
                              "load_s": round(load_s, 3), "at": time.time(),
                              "first_answer_s": None})
        _log(f"now serving {version.name} ({version.fingerprint}; loaded in {load_s:.1f} s); "
             f"{old.version.name} closes after its {old.refs} request(s) in flight")
        if done:
            self._close(old)

    def _close(self, entry: Served) -> None:
        """Close a retired backend in a thread of its own (it may take a while)."""
        threading.Thread(target=entry.backend.close, name="tao-serve-close",
                         daemon=True).start()

    def close(self) -> None:
        with self._lock:
            entry = self.current
            entry.retired = True
        entry.backend.close()


class RoundWatcher:
    """Polls a run directory; loads and switches to each newer complete round."""

    def __init__(self, run_dir: Path, switcher: ModelSwitcher, load, poll_s: float = 5.0):
        self.run_dir, self.switcher, self.load, self.poll_s = run_dir, switcher, load, poll_s
        self._failed: set[str] = set()  # fingerprints that would not load: not retried
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tao-serve-watch", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.check()
            except Exception as e:  # noqa: BLE001 - the watcher must outlive one bad poll
                _log(f"watching {self.run_dir}: {type(e).__name__}: {e}")

    def check(self) -> bool:
        """Switch to the newest complete round if it is newer than what is served."""
        done = rounds(self.run_dir)
        if not done or done[-1][0] <= self.switcher.current.version.round:
            return False
        version = round_version(*done[-1])
        if version.fingerprint in self._failed:
            return False
        _log(f"{version.name} appeared ({time.time() - version.appeared_at:.1f} s ago): "
             f"loading it")
        t0 = time.perf_counter()
        try:
            backend = self.load(version)
        except Exception as e:  # noqa: BLE001 - keep serving the old version
            self._failed.add(version.fingerprint)
            _log(f"{version.name}: cannot load it, still serving "
                 f"{self.switcher.current.version.name}: {type(e).__name__}: {e}")
            return False
        self.switcher.switch(backend, version, time.perf_counter() - t0)
        return True

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
