"""The vLLM backend's proxying (body passed through with the model name mapped, streams
relayed, usage kept for the log, vLLM's errors as 4xx) against a stand-in for vLLM's server;
and, where vLLM is installed, against the real one (tao_fast/serve/vllm_server.py)."""
import json

import openai
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from tao_fast.serve.app import Settings, create_app
from tao_fast.serve.versions import ModelSwitcher, Version
from tao_fast.serve.vllm_backend import VllmBackend


def fake_vllm(seen: list) -> FastAPI:
    """What tao-fast serve needs of vLLM's server: /v1/chat/completions, JSON and SSE."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        seen.append(body)
        if body["messages"][-1]["content"] == "too long":
            return JSONResponse({"error": {"message": "maximum context length is 8 tokens"}},
                                status_code=400)
        base = {"id": "chatcmpl-up", "created": 1, "model": body["model"]}
        use = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
        if not body.get("stream"):
            return {**base, "object": "chat.completion", "usage": use, "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "hi there"},
                 "finish_reason": "stop"}]}

        async def events():
            for piece, fin in (("hi", None), (" there", "stop")):
                yield "data: " + json.dumps({**base, "object": "chat.completion.chunk",
                                             "choices": [{"index": 0, "delta": {
                                                 "content": piece}, "finish_reason": fin}]})
                yield "\n\n"
            if body.get("stream_options", {}).get("include_usage"):
                yield "data: " + json.dumps({**base, "object": "chat.completion.chunk",
                                             "choices": [], "usage": use}) + "\n\n"
            yield "data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")

    return app


class StandIn:
    def __init__(self, base_url):
        self.base_url, self.stopped = base_url, False

    def stop(self):
        self.stopped = True


def test_vllm_backend_proxies_chat_streams_and_errors(tools, tmp_path):
    from tao_fast.serve.request_log import RequestLog

    seen = []
    up, up_thread, up_port = tools.run_app(fake_vllm(seen))
    standin = StandIn(f"http://127.0.0.1:{up_port}/v1")
    backend = VllmBackend("unused", served_name="tao-fast", version="checkpoint-round1",
                          fingerprint="checkpoint-round1-abc", server=standin)
    models = ModelSwitcher(backend, Version("checkpoint-round1", "unused", 1))
    log = RequestLog(tmp_path / "logs")
    srv, thread, port = tools.run_app(create_app(models, log, Settings(served_name="tao-fast")))
    try:
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        msg = [{"role": "user", "content": "hello"}]
        r = c.chat.completions.create(model="anything", messages=msg, top_p=0.5)
        assert r.choices[0].message.content == "hi there"
        assert r.system_fingerprint == "checkpoint-round1-abc" and r.model == "tao-fast"
        assert seen[-1]["model"] == "tao-fast" and seen[-1]["top_p"] == 0.5
        assert seen[-1]["max_tokens"] == 512  # the server's cap, as the default
        chunks = list(c.chat.completions.create(model="m", messages=msg, stream=True))
        assert "".join(ch.choices[0].delta.content for ch in chunks) == "hi there"
        assert all(ch.choices for ch in chunks)  # usage chunk not asked for: not relayed
        assert seen[-1]["stream_options"] == {"include_usage": True}  # but asked upstream
        with pytest.raises(openai.BadRequestError, match="maximum context length"):
            c.chat.completions.create(model="m", messages=[{"role": "user",
                                                            "content": "too long"}])
        tools.wait_for(lambda: log.stats["written"] == 3, what="3 records")
    finally:
        srv.should_exit = up.should_exit = True
        thread.join(10)
        up_thread.join(10)
        models.close()
        log.close()
    assert standin.stopped
    recs = tools.read_log(tmp_path / "logs")
    assert [r["status"] for r in recs] == [200, 200, 400]
    assert recs[1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 2}
    assert recs[1]["response"]["choices"][0]["message"]["content"] == "hi there"


@pytest.mark.slow
def test_real_vllm_server(tiny_model, tmp_path, tools):
    """The real thing, where vLLM is installed (the vLLM server's own tests are elsewhere)."""
    pytest.importorskip("tao_fast.serve.vllm_server")
    from tao_fast.rollout.vllm.compat import vllm_status

    ok, why = vllm_status()
    if not ok:
        pytest.skip(why)
    from tao_fast.serve.server import ServeOptions, build

    svc = build(ServeOptions(model=str(tiny_model), engine="vllm", log_dir=str(tmp_path)))
    srv, thread, port = tools.run_app(svc.app)
    try:
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        r = c.chat.completions.create(model="m", max_tokens=4,
                                      messages=[{"role": "user", "content": "hi"}])
        assert r.usage.completion_tokens >= 1
        chunks = list(c.chat.completions.create(  # streamed through the proxy: vLLM's tokens
            model="m", max_tokens=4, stream=True, messages=[{"role": "user", "content": "hi"}]))
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    finally:
        srv.should_exit = True
        thread.join(10)
        svc.close()
