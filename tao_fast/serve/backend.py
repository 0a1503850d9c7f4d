"""What the app needs of a model server (the Backend protocol), and the OpenAI response shapes
every backend builds: a chat.completion, its chat.completion.chunk pieces, and a stream's
chunks assembled back into one chat.completion (what the request log keeps for a stream).
"""
from __future__ import annotations

import time
import uuid
from typing import AsyncIterator, Protocol

from tao_fast.serve.validation import ChatRequest


class Backend(Protocol):
    """One loaded model version behind the app.

    chat(req) -> a chat.completion dict with `usage`; stream(req) -> chat.completion.chunk
    dicts, the last one carrying `usage` (and no choices) whatever the client asked: the app
    drops it when stream_options.include_usage is off. Both raise validation.ApiError for a
    request the model cannot take (e.g. a prompt longer than its context) before anything is
    generated. close() releases the model (called once no request uses it)."""

    version: str  # e.g. "checkpoint-round2"
    fingerprint: str  # e.g. "checkpoint-round2-1a2b3c4d": each response's system_fingerprint
    served_name: str  # the model id clients see

    async def chat(self, req: ChatRequest) -> dict:
        ...

    def stream(self, req: ChatRequest) -> AsyncIterator[dict]:
        ...

    def close(self) -> None:
        ...


def new_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(rid: str, model: str, fingerprint: str, texts: list[str], reasons: list[str],
               use: dict, created: int | None = None) -> dict:
    """A chat.completion response of len(texts) choices."""
    return {"id": rid, "object": "chat.completion", "created": created or int(time.time()),
            "model": model, "system_fingerprint": fingerprint,
            "choices": [{"index": i, "message": {"role": "assistant", "content": t},
                         "logprobs": None, "finish_reason": r}
                        for i, (t, r) in enumerate(zip(texts, reasons))],
            "usage": use}


def chunk(rid: str, model: str, fingerprint: str, created: int, choices: list[dict],
          use: dict | None = None) -> dict:
    """One chat.completion.chunk (choices: [{"index", "delta", "finish_reason"}])."""
    out = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
           "system_fingerprint": fingerprint, "choices": choices}
    if use is not None:
        out["usage"] = use
    return out


def assemble(chunks: list[dict]) -> dict | None:
    """The chat.completion a stream's chunks add up to (None for no chunks): the content
    deltas joined per choice, the last finish_reason and usage seen."""
    if not chunks:
        return None
    texts: dict[int, list[str]] = {}
    reasons: dict[int, str | None] = {}
    use = None
    for c in chunks:
        use = c.get("usage") or use
        for ch in c.get("choices") or []:
            i = ch.get("index", 0)
            texts.setdefault(i, []).append((ch.get("delta") or {}).get("content") or "")
            reasons[i] = ch.get("finish_reason") or reasons.get(i)
    first = chunks[0]
    idx = sorted(texts)
    return completion(first.get("id", ""), first.get("model", ""),
                      first.get("system_fingerprint", ""), ["".join(texts[i]) for i in idx],
                      [reasons[i] for i in idx], use, created=first.get("created"))
