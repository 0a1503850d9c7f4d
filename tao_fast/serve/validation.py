"""A chat-completions request body -> ChatRequest, or an ApiError carrying the OpenAI error
body `{"error": {"message", "type", "param", "code"}}` and its HTTP status.

What is checked here is what every backend needs: the shape of `messages` (text only), and the
sampling fields' types and ranges. The prompt's length against the model's context is the
backend's check (it has the tokenizer). Unknown fields are ignored (clients send many); fields
whose meaning this server cannot honour (tools, logprobs, images) are refused, not ignored.
"""
from __future__ import annotations

from dataclasses import dataclass, field

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
TEXT_PARTS = ("text", "input_text")
MAX_STOP = 4  # OpenAI's own limit on `stop` strings


class ApiError(Exception):
    """A request refused with `status` and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = \
            status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


@dataclass
class Limits:
    """What one request may ask for (the server's bounds on its resources)."""
    max_tokens: int = 512  # cap on max_tokens; also the default when a request gives none
    max_n: int = 8  # choices per request
    max_messages: int = 256
    max_chars: int = 256_000  # all messages' text together


@dataclass
class ChatRequest:
    """A validated request: the body as received, and its parsed fields."""
    body: dict
    messages: list[dict]  # [{"role": system|user|assistant, "content": str}]
    n: int = 1
    max_tokens: int | None = None  # None: the backend's default (Limits.max_tokens or less)
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage


def _bad(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def _number(body: dict, key: str, default, lo: float, hi: float, *, integer: bool = False):
    """body[key] as an int/float within [lo, hi], default when absent or null."""
    v = body.get(key)
    if v is None:
        return default
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok:
        kind = "an integer" if integer else "a number"
        raise _bad(f"'{key}' must be {kind}, got {type(v).__name__}", key, "invalid_type")
    if not lo <= v <= hi:
        raise _bad(f"'{key}' must be between {lo:g} and {hi:g}, got {v}", key)
    return v


def _content(c, i: int) -> str:
    """A message's content (a string or a list of text parts) -> its text."""
    if isinstance(c, str):
        return c
    if c is None:
        return ""
    if not isinstance(c, list):
        raise _bad(f"messages[{i}].content must be a string or a list of text parts, got "
                   f"{type(c).__name__}", f"messages[{i}].content", "invalid_type")
    texts = []
    for p in c:
        if isinstance(p, dict) and p.get("type") in TEXT_PARTS and isinstance(p.get("text"), str):
            texts.append(p["text"])
        else:
            kind = p.get("type") if isinstance(p, dict) else type(p).__name__
            raise _bad(f"messages[{i}]: a {kind!r} content part; this server takes text only",
                       f"messages[{i}].content", "unsupported_content")
    return "\n".join(texts)


def parse_messages(msgs, limits: Limits) -> list[dict]:
    """`messages` -> [{"role", "content"}] with text content, ending in a user turn."""
    if not isinstance(msgs, list) or not msgs:
        raise _bad("'messages' must be a non-empty list of messages", "messages",
                   "invalid_type" if msgs is not None else "missing_required_parameter")
    if len(msgs) > limits.max_messages:
        raise _bad(f"'messages' has {len(msgs)} messages; at most {limits.max_messages}",
                   "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}] must be an object, got {type(m).__name__}",
                       f"messages[{i}]", "invalid_type")
        role = m.get("role")
        if role not in ROLES:
            raise _bad(f"messages[{i}].role {role!r} is not supported (system, developer, "
                       f"user, assistant; no tool turns)", f"messages[{i}].role")
        if m.get("tool_calls") or m.get("function_call"):
            raise _bad(f"messages[{i}]: tool calls are not supported", f"messages[{i}]")
        out.append({"role": ROLES[role], "content": _content(m.get("content"), i)})
    if out[-1]["role"] != "user":
        raise _bad("the last message must be the user's", "messages")
    chars = sum(len(m["content"]) for m in out)
    if chars > limits.max_chars:
        raise _bad(f"'messages' hold {chars:,} characters; at most {limits.max_chars:,}",
                   "messages", "context_length_exceeded")
    return out


def _stop(v) -> list[str]:
    if v is None:
        return []
    stops = [v] if isinstance(v, str) else v
    if not (isinstance(stops, list) and len(stops) <= MAX_STOP
            and all(isinstance(s, str) and s for s in stops)):
        raise _bad(f"'stop' must be a non-empty string or a list of up to {MAX_STOP}",
                   "stop", "invalid_type")
    return list(stops)


def _refuse_unsupported(body: dict) -> None:
    """Fields whose meaning this server cannot honour: refused rather than silently ignored."""
    if body.get("tools") or body.get("functions"):
        raise _bad("tools / functions are not supported by this server", "tools",
                   "unsupported_parameter")
    if body.get("logprobs"):
        raise _bad("logprobs are not supported by this server", "logprobs",
                   "unsupported_parameter")


def parse_chat(body, limits: Limits) -> ChatRequest:
    """A decoded JSON body -> ChatRequest; ApiError(400) naming the field otherwise."""
    if not isinstance(body, dict):
        raise _bad(f"the request body must be a JSON object, got {type(body).__name__}",
                   code="invalid_type")
    if "model" in body and not isinstance(body["model"], str):
        raise _bad("'model' must be a string", "model", "invalid_type")
    _refuse_unsupported(body)
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise _bad("'stream' must be true or false", "stream", "invalid_type")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise _bad("'stream_options' must be an object", "stream_options", "invalid_type")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None \
        else "max_tokens"
    return ChatRequest(
        body=body, messages=parse_messages(body.get("messages"), limits),
        n=_number(body, "n", 1, 1, limits.max_n, integer=True),
        max_tokens=_number(body, key, None, 1, limits.max_tokens, integer=True),
        temperature=float(_number(body, "temperature", 1.0, 0, 2)),
        top_p=float(_number(body, "top_p", 1.0, 1e-9, 1)),
        stop=_stop(body.get("stop")),
        seed=_number(body, "seed", None, -(2 ** 63), 2 ** 63 - 1, integer=True),
        stream=stream, include_usage=bool(opts.get("include_usage")))
