"""The served app through the official openai client: chat, streaming, models, health, errors,
API key, the request log read back by ingest, concurrency."""
import json
import threading
import time

import httpx
import openai
import pytest


def client(run, key="unused"):
    return openai.OpenAI(base_url=run.base_url, api_key=key, max_retries=0, timeout=60)


def ask(c, text="Hi", **kw):
    return c.chat.completions.create(model="tao-fast", messages=[{"role": "user",
                                                                   "content": text}], **kw)


def test_chat_stream_models_health_and_log(served, tmp_path, tools):
    c = client(served)
    r = ask(c, "What is 2+2?", max_tokens=8, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens > 0 and 1 <= r.usage.completion_tokens <= 8
    assert r.system_fingerprint.startswith("tiny-llama-")
    again = ask(c, "What is 2+2?", max_tokens=8, temperature=0)
    assert again.choices[0].message.content == r.choices[0].message.content  # greedy
    two = ask(c, "Say more", max_tokens=4, n=2, temperature=1.0)
    assert [ch.index for ch in two.choices] == [0, 1]

    chunks = list(ask(c, "What is 2+2?", max_tokens=8, temperature=0, stream=True,
                      stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == r.choices[0].message.content  # the same greedy answer, streamed
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert [ch for ch in chunks if ch.choices][-1].choices[0].finish_reason in ("stop", "length")

    models = c.models.list().data
    assert models[0].id == "tao-fast" and models[0].version == "tiny-llama"
    h = served.health()
    assert h["status"] == "ok" and h["log"]["state"] == "ok"
    assert h["model"]["version"] == "tiny-llama"

    tools.wait_for(lambda: served.health()["log"]["written"] == 4, what="4 records written")
    recs = tools.read_log(tmp_path / "logs")
    assert len(recs) == 4 and len({r["request_id"] for r in recs}) == 4
    streamed = recs[-1]
    assert streamed["request"]["stream"] is True and streamed["status"] == 200
    assert streamed["response"]["choices"][0]["message"]["content"] == text
    assert streamed["usage"]["completion_tokens"] == r.usage.completion_tokens
    assert all(x["model_version"] == "tiny-llama" for x in recs)
    assert recs[0]["timestamp"].endswith("Z") and recs[0]["latency_s"] > 0

    from tao_fast.data.ingest import ingest

    s = ingest(tmp_path / "logs", tmp_path / "prompts", heldout_frac=0.0)
    assert (s.read, s.kept, s.malformed) == (4, 2, 0)  # "What is 2+2?" x3 are one prompt
    first = json.loads((tmp_path / "prompts" / "train.jsonl").read_text().splitlines()[0])
    assert first["messages"] == [{"role": "user", "content": "What is 2+2?"}]


def post(run, body, key=None, raw=None):
    headers = {"content-type": "application/json"}
    if key:
        headers["authorization"] = f"Bearer {key}"
    return httpx.post(run.base_url + "/chat/completions", headers=headers, timeout=30,
                      content=raw if raw is not None else json.dumps(body))


MSG = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("raw,body,param,code", [
    (b"{not json", None, None, "invalid_json"),
    (None, [1, 2], None, "invalid_type"),
    (None, {"model": "x"}, "messages", "missing_required_parameter"),
    (None, {"messages": "hi"}, "messages", "invalid_type"),
    (None, {"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "invalid_value"),
    (None, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content", "unsupported_content"),
    (None, {"messages": MSG, "n": 0}, "n", "invalid_value"),
    (None, {"messages": MSG, "n": "2"}, "n", "invalid_type"),
    (None, {"messages": MSG, "max_tokens": 10 ** 9}, "max_tokens", "invalid_value"),
    (None, {"messages": MSG, "temperature": 5}, "temperature", "invalid_value"),
    (None, {"messages": MSG, "temperature": True}, "temperature", "invalid_type"),
    (None, {"messages": MSG, "tools": [{"type": "function"}]}, "tools", "unsupported_parameter"),
])
def test_malformed_requests_get_a_clear_4xx(shared, raw, body, param, code):
    r = post(shared, body, raw=raw)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["param"] == param and err["message"]
    assert err["type"] == "invalid_request_error"


def test_context_too_long_body_too_big_and_unknown_path(shared):
    served = shared
    long = [{"role": "user", "content": "word " * 9000}]  # ~9k tokens > the 8192 context
    r = post(served, {"messages": long, "max_tokens": 4})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = post(served, {"messages": long, "max_tokens": 4, "stream": True})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = post(served, None, raw=b"x" * (5 << 20))
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    r = httpx.get(served.url + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["message"]
    assert served.health()["status"] == "ok"  # nothing above broke the server


def test_api_key_refused_and_accepted(start, tiny_model, tmp_path):
    run = start(model=str(tiny_model), log_dir=str(tmp_path / "logs"), api_key="s3cret")
    with pytest.raises(openai.AuthenticationError):
        ask(client(run, "wrong"), max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        client(run, "wrong").models.list()
    r = httpx.post(run.base_url + "/chat/completions", json={"messages": MSG})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert ask(client(run, "s3cret"), max_tokens=2).choices
    assert httpx.get(run.url + "/health").status_code == 200  # no key for health


def test_log_dir_unwritable_keeps_serving_and_health_says_so(start, tiny_model, tmp_path, tools):
    """LOGDIR's parent is a regular file, so LOGDIR cannot be created (NotADirectoryError):
    this simulates an unwritable log directory even as root, whom chmod 0o500 does not stop.
    Removing the file (the operator's fix) lets the writer retry and write the kept records."""
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the log's parent directory should be")
    run = start(model=str(tiny_model), log_dir=str(blocker / "logs"))
    run.svc.log.retry_s = 0.2
    c = client(run)
    for _ in range(3):
        assert ask(c, max_tokens=2).choices
    h = tools.wait_for(lambda: (h := run.health())["status"] == "degraded" and h,
                       what="health degraded")
    assert "NotADirectoryError" in h["log"]["last_error"] and h["log"]["written"] == 0
    assert ask(c, max_tokens=2).choices  # still answering
    blocker.unlink()
    tools.wait_for(lambda: run.health()["log"]["written"] == 4, what="records written after fix")
    assert run.health()["status"] == "ok"
    assert len(tools.read_log(blocker / "logs")) == 4


@pytest.mark.slow
def test_concurrent_clients_lose_and_duplicate_no_record(start, tiny_model, tmp_path, tools):
    """16 client threads for ~10 s; every answered request is logged exactly once."""
    run = start(model=str(tiny_model), log_dir=str(tmp_path / "logs"), log_rotate_s=2)
    ids, errors, stop = [], [], time.monotonic() + 10

    def worker(k):
        c = client(run)
        i = 0
        while time.monotonic() < stop:
            try:
                stream = i % 3 == 0
                r = ask(c, f"client {k} request {i}", max_tokens=4, stream=stream)
                ids.append(list(r)[0].id if stream else r.id)
            except Exception as e:  # noqa: BLE001
                errors.append(repr(e))
            i += 1

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(ids) > 16
    tools.wait_for(lambda: run.health()["log"]["written"] == len(ids), what="all written")
    run.stop()  # rotates the active file
    recs = tools.read_log(tmp_path / "logs")
    assert len(recs) == len(ids)
    assert len({r["request_id"] for r in recs}) == len(ids)
    assert sorted(r["response"]["id"] for r in recs) == sorted(ids)
    assert not list((tmp_path / "logs").glob("active-*")) and run.svc.log.stats["rotated"] >= 2
    assert run.svc.models.current.backend is not None
    batcher = run.svc.models.current.backend.batcher
    assert batcher.requests == len(ids) and batcher.batches < batcher.requests  # batched


def test_over_max_concurrency_gets_429(start, tiny_model, tmp_path):
    run = start(model=str(tiny_model), log_dir=str(tmp_path / "logs"), max_concurrency=1)
    batcher = run.svc.models.current.backend.batcher
    gate, entered, inner = threading.Event(), threading.Event(), batcher.run_batch

    def held(key, prompts):
        entered.set()
        gate.wait(60)
        return inner(key, prompts)

    batcher.run_batch = held
    first = threading.Thread(target=lambda: ask(client(run), max_tokens=2))
    first.start()
    assert entered.wait(30)
    with pytest.raises(openai.RateLimitError, match="max-concurrency"):
        ask(client(run), max_tokens=2)
    gate.set()
    first.join(30)
    assert ask(client(run), max_tokens=2).choices  # a slot again
