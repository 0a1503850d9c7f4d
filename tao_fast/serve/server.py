"""`tao-fast serve`: the parts built from the command line's options, and uvicorn around them.

build() loads the first version (blocking: a bad --model fails before the port opens), starts
the request log and, for a RUN_DIR, the round watcher; serve() runs uvicorn until SIGINT or
SIGTERM, which stop accepting, let requests in flight finish (up to GRACE_S), and then close
the watcher, the models and the log (which rotates its active file).
"""
from __future__ import annotations

import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tao_fast.config import ConfigError
from tao_fast.serve.app import Settings, create_app
from tao_fast.serve.validation import Limits
from tao_fast.serve.versions import ModelSwitcher, RoundWatcher, Version, initial_version

GRACE_S = 60  # seconds uvicorn waits for requests in flight at shutdown


def _log(msg: str) -> None:
    print(f"[tao-fast serve] {msg}", file=sys.stderr, flush=True)


@dataclass
class ServeOptions:
    """What `tao-fast serve` takes (its --help says what each is)."""
    model: str
    host: str = "127.0.0.1"
    port: int = 8000
    log_dir: str | None = "logs"
    engine: str = "auto"
    api_key: str | None = None
    log_max_mb: float = 64.0
    log_rotate_s: float = 300.0
    redact: str | None = None
    max_concurrency: int = 64
    poll_s: float = 5.0
    served_name: str = "tao-fast"
    max_tokens: int = 512
    max_batch: int = 8
    max_body_mb: float = 4.0


def choose_engine(engine: str) -> str:
    """torch or vllm: auto is vllm when a supported vLLM is installed."""
    if engine not in ("auto", "torch", "vllm"):
        raise ConfigError(f"--engine {engine!r}: expected auto, torch or vllm")
    if engine == "torch":
        return "torch"
    from tao_fast.rollout.vllm.compat import vllm_status

    ok, why = vllm_status()
    if ok:
        return "vllm"
    if engine == "vllm":
        raise ConfigError(f"--engine vllm: {why}")
    return "torch"


def backend_loader(engine: str, served_name: str, limits: Limits, max_batch: int):
    """version -> a started backend for it."""
    def load(version: Version):
        if engine == "vllm":
            from tao_fast.serve.vllm_backend import VllmBackend

            return VllmBackend(version.path, served_name=served_name, version=version.name,
                               fingerprint=version.fingerprint, limits=limits)
        from tao_fast.serve.torch_backend import TorchBackend

        return TorchBackend(version.path, served_name=served_name, version=version.name,
                            fingerprint=version.fingerprint, limits=limits,
                            max_batch=max_batch)
    return load


def _check_options(o: ServeOptions) -> None:
    for name, v, lo in (("--max-concurrency", o.max_concurrency, 1), ("--poll-s", o.poll_s, 0.05),
                        ("--log-max-mb", o.log_max_mb, 0.001), ("--log-rotate-s", o.log_rotate_s,
                                                                0.1),
                        ("--max-tokens", o.max_tokens, 1), ("--max-batch", o.max_batch, 1),
                        ("--max-body-mb", o.max_body_mb, 0.001)):
        if v < lo:
            raise ConfigError(f"{name}: must be >= {lo}, got {v}")


@dataclass
class Service:
    """The running parts of one server."""
    app: object
    models: ModelSwitcher
    log: object = None
    watcher: RoundWatcher | None = None
    redactor: object = None
    closed: list = field(default_factory=list)

    def close(self) -> None:
        """Stop watching, close the models, write and rotate the log (once)."""
        if self.closed:
            return
        self.closed.append(True)
        if self.watcher is not None:
            self.watcher.close()
        self.models.close()
        if self.log is not None:
            self.log.close()
        if self.redactor is not None:
            self.redactor.close()


def _request_log(o: ServeOptions):
    if not o.log_dir:
        return None, None
    from tao_fast.serve.request_log import RequestLog

    redactor = None
    if o.redact:
        from tao_fast.serve.redact import Redactor

        try:
            redactor = Redactor(o.redact)
        except (ValueError, RuntimeError) as e:
            raise ConfigError(str(e)) from None
    log = RequestLog(Path(o.log_dir), max_bytes=int(o.log_max_mb * (1 << 20)),
                     rotate_s=o.log_rotate_s, redactor=redactor)
    return log, redactor


def build(o: ServeOptions) -> Service:
    """Load --model's version, start the log and the watcher, make the app."""
    _check_options(o)
    version, run_dir = initial_version(o.model)
    engine = choose_engine(o.engine)
    limits = Limits(max_tokens=o.max_tokens)
    load = backend_loader(engine, o.served_name, limits, o.max_batch)
    _log(f"loading {version.name} ({version.path}) on the {engine} engine")
    models = ModelSwitcher(load(version), version)
    log, redactor = _request_log(o)
    watcher = RoundWatcher(run_dir, models, load, o.poll_s) if run_dir else None
    settings = Settings(served_name=o.served_name, api_key=o.api_key, limits=limits,
                        max_body_bytes=int(o.max_body_mb * (1 << 20)),
                        max_concurrency=o.max_concurrency)
    return Service(create_app(models, log, settings), models, log, watcher, redactor)


def serve(o: ServeOptions) -> int:
    """Serve until SIGINT/SIGTERM; then finish requests in flight and close everything."""
    import uvicorn

    svc = build(o)
    config = uvicorn.Config(svc.app, host=o.host, port=o.port, log_level="warning",
                            timeout_graceful_shutdown=GRACE_S, lifespan="off")
    server = uvicorn.Server(config)
    _log(f"serving {svc.models.current.version.name} as {o.served_name!r} on "
         f"http://{o.host}:{o.port}/v1" + (f"; request log in {o.log_dir}" if o.log_dir
                                          else "; request log off"))
    # uvicorn re-raises the signal that stopped it once it is done, under the handler found
    # before it: SIGTERM's default would kill the process before the log is rotated, so the
    # handler it finds is one that does nothing (the shutdown is already under way then).
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run()
    finally:
        svc.close()
        signal.signal(signal.SIGTERM, previous)
        _log("stopped")
    return 0
