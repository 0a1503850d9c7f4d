"""The backend that proxies to vLLM's own OpenAI-compatible server (tao_fast/serve/
vllm_server.py's VllmServer, a child process), for GPU serving.

The request body is passed through as received, with `model` mapped to the served name vLLM
knows and max_tokens capped (Limits.max_tokens, the default when the client gives none);
streams always ask vLLM for usage (stream_options.include_usage) so the log has it; the app
drops that last chunk when the client did not ask for it. vLLM's own errors (a prompt too long,
a bad field) come back with vLLM's status and message as an ApiError. vllm_server is imported
only when this backend is built.
"""
from __future__ import annotations

import json

from tao_fast.serve.validation import ApiError, ChatRequest, Limits

UPSTREAM_TIMEOUT_S = 600.0  # one request's generation on the vLLM server


class VllmBackend:
    """A VllmServer on model_dir, started here (blocking until its /health answers)."""

    def __init__(self, model_dir, *, served_name: str, version: str, fingerprint: str,
                 limits: Limits | None = None, max_model_len: int = 0,
                 kv_cache_gb: float = 1.0, start_timeout_s: float = 600.0, server=None):
        self.served_name, self.version, self.fingerprint = served_name, version, fingerprint
        self.limits = limits or Limits()
        if server is None:
            from tao_fast.serve.vllm_server import VllmServer

            server = VllmServer(str(model_dir), served_name=served_name,
                                max_model_len=max_model_len, kv_cache_gb=kv_cache_gb)
            server.start(timeout_s=start_timeout_s)
        self.server = server
        self._client = None  # made on first use, on the event loop that uses it

    def _http(self):
        import httpx

        if self._client is None:
            self._client = httpx.AsyncClient(base_url=self.server.base_url,
                                             timeout=httpx.Timeout(UPSTREAM_TIMEOUT_S,
                                                                   connect=10.0))
        return self._client

    def _upstream_body(self, req: ChatRequest, stream: bool) -> dict:
        body = dict(req.body, model=self.served_name, stream=stream)
        body.pop("max_completion_tokens", None)
        body["max_tokens"] = req.max_tokens or self.limits.max_tokens
        if stream:
            body["stream_options"] = {"include_usage": True}
        return body

    @staticmethod
    def _error(status: int, text: str) -> ApiError:
        """vLLM's error response -> an ApiError with its message."""
        try:
            err = json.loads(text).get("error") or {}
            msg = err.get("message") if isinstance(err, dict) else str(err)
        except (ValueError, AttributeError):
            msg = text[:500]
        return ApiError(status if 400 <= status < 600 else 502, f"vLLM: {msg or text[:500]}",
                        type="invalid_request_error" if status < 500 else "server_error")

    def _tag(self, obj: dict) -> dict:
        obj["model"], obj["system_fingerprint"] = self.served_name, self.fingerprint
        return obj

    async def chat(self, req: ChatRequest) -> dict:
        r = await self._http().post("/chat/completions", json=self._upstream_body(req, False))
        if r.status_code != 200:
            raise self._error(r.status_code, r.text)
        return self._tag(r.json())

    async def stream(self, req: ChatRequest):
        """vLLM's chunks, relayed as they come (true token streaming)."""
        async with self._http().stream("POST", "/chat/completions",
                                       json=self._upstream_body(req, True)) as r:
            if r.status_code != 200:
                raise self._error(r.status_code, (await r.aread()).decode(errors="replace"))
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                yield self._tag(json.loads(data))

    def close(self) -> None:
        """Stop the vLLM server (the HTTP client goes with its event loop)."""
        self.server.stop()
