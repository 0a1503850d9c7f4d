"""`tao-fast serve` as a process: its --help, a bad --model, and SIGTERM, which lets the
request in flight finish and rotates the log before the process exits."""
import gzip
import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tao_fast.cli import main


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    for opt in ("--model", "--host", "--port", "--log-dir", "--engine", "--api-key",
                "--log-max-mb", "--log-rotate-s", "--redact", "--max-concurrency", "--poll-s"):
        assert opt in out
    assert "127.0.0.1" in out and "TAO_FAST_API_KEY" in out


def test_bad_model_is_one_line(tmp_path, capsys):
    assert main(["serve", "--model", str(tmp_path / "nope"), "--engine", "torch"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tao-fast: error: --model")
    assert "does not exist" in err[0]


@pytest.mark.slow
def test_sigterm_finishes_the_request_in_flight_and_rotates_the_log(tiny_model, tmp_path, tools):
    port, logs = tools.free_port(), tmp_path / "logs"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tao_fast.cli", "serve", "--model", str(tiny_model), "--port",
         str(port), "--log-dir", str(logs), "--engine", "torch", "--max-tokens", "300"],
        stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        tools.wait_for(lambda: _up(url), timeout_s=90, what="the server")
        result = {}

        def call():
            result["r"] = httpx.post(url + "/v1/chat/completions", timeout=120, json={
                "messages": [{"role": "user", "content": "go on"}], "max_tokens": 300,
                "temperature": 1.0})

        t = threading.Thread(target=call)
        t.start()
        tools.wait_for(lambda: httpx.get(url + "/health").json()["in_flight"] == 1,
                       what="the request in flight")
        proc.send_signal(signal.SIGTERM)
        t.join(120)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    r = result["r"]
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] > 0
    files = sorted(os.listdir(logs))
    assert len(files) == 1 and files[0].startswith("requests-"), files
    (rec,) = [json.loads(x) for x in gzip.open(logs / files[0], "rt")]
    assert rec["status"] == 200 and rec["response"]["id"] == r.json()["id"]
    assert "stopped" in proc.stderr.read()


def _up(url):
    try:
        return httpx.get(url + "/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        time.sleep(0.2)
        return False
