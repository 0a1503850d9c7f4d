"""The OpenAI-compatible app: POST /v1/chat/completions (JSON, or SSE `data: {...}` chunks
ending with `data: [DONE]`), GET /v1/models (the served model and its version), GET /health
(ok, or degraded with the request log's error and counters; no key needed).

Every request that passes the API key check is logged once (request_log.py), whatever its
status; a body that is not a JSON object is logged with "request": null. A refused request
gets an OpenAI-style error body `{"error": {"message", "type", "param", "code"}}` with a 4xx
status: 400 for a malformed body or a prompt too long, 401 for a missing or wrong key, 413 for
a body over max_body_bytes, 429 when max_concurrency requests are already in flight.
"""
from __future__ import annotations

import hmac
import json
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tao_fast.serve.backend import assemble
from tao_fast.serve.validation import ApiError, ChatRequest, Limits, parse_chat


@dataclass
class Settings:
    """The app's bounds and identity."""
    served_name: str = "tao-fast"
    api_key: str | None = None
    limits: Limits = field(default_factory=Limits)
    max_body_bytes: int = 4 << 20
    max_concurrency: int = 64


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _sse(obj) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


async def read_json(request: Request, limit: int):
    """The request's body decoded as JSON, read up to `limit` bytes (413 beyond)."""
    too_big = ApiError(413, f"the request body is over {limit:,} bytes", code="body_too_large")
    cl = request.headers.get("content-length", "")
    if cl.isdigit() and int(cl) > limit:
        raise too_big
    data = bytearray()
    async for part in request.stream():
        data += part
        if len(data) > limit:
            raise too_big
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json")
    except RecursionError:
        raise ApiError(400, "the request body is not valid JSON: nested too deeply",
                       code="invalid_json") from None


class ChatHandler:
    """One chat-completions request, from its body to its logged record."""

    def __init__(self, app_state: "AppState", request: Request):
        self.s, self.request = app_state, request
        self.rid = "req-" + uuid.uuid4().hex[:24]
        self.t0 = time.perf_counter()
        self.body = None
        self.entry = None
        self._released = False

    def log(self, status: int, response) -> None:
        """The request's one record in the request log."""
        if self.s.log is None:
            return
        use = (response or {}).get("usage") or {}
        self.s.log.submit({
            "request": self.body if isinstance(self.body, dict) else None,
            "response": response, "request_id": self.rid, "timestamp": _now_iso(),
            "latency_s": round(time.perf_counter() - self.t0, 4),
            "usage": {"prompt_tokens": use.get("prompt_tokens", 0),
                      "completion_tokens": use.get("completion_tokens", 0)},
            "model_version": self.entry.version.name if self.entry else
            self.s.models.current.version.name,
            "status": status})

    def error(self, e: ApiError) -> JSONResponse:
        self.log(e.status, e.body())
        return JSONResponse(e.body(), status_code=e.status, headers={"x-request-id": self.rid})

    async def run(self):
        try:
            self.body = await read_json(self.request, self.s.settings.max_body_bytes)
            req = parse_chat(self.body, self.s.settings.limits)
        except ApiError as e:
            return self.error(e)
        if self.s.in_flight >= self.s.settings.max_concurrency:
            return self.error(ApiError(429, f"the server has {self.s.in_flight} requests in "
                                       f"flight (--max-concurrency): retry shortly",
                                       type="rate_limit_error", code="too_many_requests"))
        self.s.in_flight += 1
        self.entry = self.s.models.acquire()
        try:
            if req.stream:
                return await self._stream(req)
            return await self._chat(req)
        except BaseException:
            self._done()
            raise

    def _done(self) -> None:
        """Release the model version and the concurrency slot (once)."""
        if self.entry is not None and not self._released:
            self._released = True
            self.s.in_flight -= 1
            self.s.models.release(self.entry)

    async def _chat(self, req: ChatRequest):
        try:
            resp = await self.entry.backend.chat(req)
        except ApiError as e:
            return self.error(e)
        except RuntimeError as e:  # the model was shut down under the request
            return self.error(ApiError(503, str(e), type="server_error", code="unavailable"))
        finally:
            self._done()
        self.s.models.answered(self.entry)
        self.log(200, resp)
        return JSONResponse(resp, headers={"x-request-id": self.rid})

    async def _stream(self, req: ChatRequest):
        agen = self.entry.backend.stream(req)
        try:  # the first chunk before the 200: a refused request gets its 4xx
            first = await agen.__anext__()
        except ApiError as e:
            self._done()
            return self.error(e)
        return StreamingResponse(self._events(req, agen, first), media_type="text/event-stream",
                                 headers={"x-request-id": self.rid,
                                          "cache-control": "no-cache"})

    async def _events(self, req: ChatRequest, agen, first: dict):
        """The SSE body; the stream's chunks are assembled into the logged response."""
        chunks, status = [first], 499  # 499: the client went away before the end
        try:
            yield _sse(first)
            async for c in agen:
                chunks.append(c)
                if c.get("choices") or req.include_usage:
                    yield _sse(c)
            yield b"data: [DONE]\n\n"
            status = 200
            self.s.models.answered(self.entry)
        except ApiError as e:
            status = e.status
            yield _sse(e.body())
        except Exception as e:  # noqa: BLE001 - the stream has begun: an error event, no 500
            status = 500
            yield _sse(ApiError(500, f"{type(e).__name__}: {e}", type="server_error").body())
        finally:
            await agen.aclose()
            self._done()
            self.log(status, assemble(chunks))


@dataclass
class AppState:
    models: object  # versions.ModelSwitcher
    log: object  # request_log.RequestLog, or None: logging off
    settings: Settings
    in_flight: int = 0


def _check_key(state: AppState, request: Request) -> None:
    key = state.settings.api_key
    if not key:
        return
    got = request.headers.get("authorization", "")
    if not (got.startswith("Bearer ") and hmac.compare_digest(got[7:].encode(), key.encode())):
        raise ApiError(401, "missing or wrong API key (Authorization: Bearer KEY)",
                       type="authentication_error", code="invalid_api_key")


def _handlers(app: FastAPI) -> None:
    """Every error as an OpenAI error body; an unexpected one is a 500, never a crash."""
    @app.exception_handler(ApiError)
    async def api_error(_request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, e: StarletteHTTPException):
        return JSONResponse(ApiError(e.status_code, str(e.detail), code="not_found"
                                     if e.status_code == 404 else None).body(),
                            status_code=e.status_code)

    @app.exception_handler(Exception)
    async def internal(_request, e: Exception):
        return JSONResponse(ApiError(500, f"internal error: {type(e).__name__}: {e}",
                                     type="server_error").body(), status_code=500)


def create_app(models, log, settings: Settings) -> FastAPI:
    """The app over a versions.ModelSwitcher and a request_log.RequestLog (or None)."""
    state = AppState(models, log, settings)
    app = FastAPI(title="tao-fast serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.tao = state
    _handlers(app)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        _check_key(state, request)
        return await ChatHandler(state, request).run()

    @app.get("/v1/models")
    async def list_models(request: Request):
        _check_key(state, request)
        cur = state.models.current
        return {"object": "list", "data": [{
            "id": settings.served_name, "object": "model", "created": int(cur.loaded_at),
            "owned_by": "tao-fast", "version": cur.version.name,
            "fingerprint": cur.version.fingerprint}]}

    @app.get("/health")
    async def health():
        log_state = log.health() if log is not None else {"state": "off"}
        cur = state.models.current
        return {"status": "ok" if log_state["state"] in ("ok", "off") else "degraded",
                "model": {"version": cur.version.name, "fingerprint": cur.version.fingerprint,
                          "first_answer_s": cur.first_answer_s},
                "in_flight": state.in_flight, "log": log_state,
                "switches": state.models.switches[-5:]}

    return app
