"""A real `tao-fast serve` (uvicorn on 127.0.0.1, a free port, in a thread of the test process)
over the torch backend, for the tests of tests/serve."""
import json
import shutil
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    """A served app: base_url for clients, svc (server.Service) for its parts."""

    def __init__(self, svc, server, thread, port):
        self.svc, self.server, self.thread, self.port = svc, server, thread, port
        self.url = f"http://127.0.0.1:{port}"
        self.base_url = self.url + "/v1"

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=10).json()

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.svc.close()


def run_app(app):
    """(uvicorn.Server, its thread, port) serving `app` on 127.0.0.1, once it answers."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    return server, thread, port


def start_server(**opts) -> Running:
    """build() + uvicorn.Server in a thread; returns once the port answers."""
    from tao_fast.serve.server import ServeOptions, build

    opts.setdefault("engine", "torch")
    opts.setdefault("max_tokens", 16)
    svc = build(ServeOptions(port=0, **opts))
    return Running(svc, *run_app(svc.app))


def read_log(log_dir: Path) -> list[dict]:
    """Every record of a log directory: rotated files and the active ones."""
    import gzip

    recs = []
    for f in sorted(Path(log_dir).glob("requests-*.jsonl.gz")):
        recs += [json.loads(x) for x in gzip.open(f, "rt").read().splitlines()]
    for f in sorted(Path(log_dir).glob("active-*.jsonl")):
        recs += [json.loads(x) for x in f.read_text().splitlines()]
    return recs


def wait_for(cond, timeout_s: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def copy_model(src: Path, dest: Path) -> Path:
    """A copy of a model directory, made under a temporary name and renamed (as tune does)."""
    tmp = dest.with_name(dest.name + ".tmp-copy")
    shutil.copytree(src, tmp)
    tmp.rename(dest)
    return dest


class Tools:
    """The helpers above, for test modules (conftest is not importable under importlib mode)."""
    free_port = staticmethod(free_port)
    run_app = staticmethod(run_app)
    read_log = staticmethod(read_log)
    wait_for = staticmethod(wait_for)
    copy_model = staticmethod(copy_model)


@pytest.fixture
def tools():
    return Tools


@pytest.fixture
def start():
    """start(**ServeOptions fields) -> a Running server; all are stopped after the test."""
    runs = []

    def _start(**opts):
        runs.append(start_server(**opts))
        return runs[-1]

    yield _start
    for r in runs:
        r.stop()


@pytest.fixture
def served(start, tiny_model, tmp_path):
    """A server on the tiny model, logging into tmp_path/logs."""
    return start(model=str(tiny_model), log_dir=str(tmp_path / "logs"))


@pytest.fixture(scope="module")
def shared(tiny_model, tmp_path_factory):
    """One server on the tiny model for a whole module's tests that only send requests."""
    run = start_server(model=str(tiny_model), log_dir=str(tmp_path_factory.mktemp("shared") /
                                                          "logs"))
    yield run
    run.stop()
