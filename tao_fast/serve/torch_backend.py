"""The backend over tao_fast's in-house torch engine (tao_fast.rollout.TorchEngine on a model
loaded by tao_fast.models.load_model): the CPU fallback, and what the tests serve.

Prompts are encoded with the model's own chat template (as tao_fast.data.prompts.encode_prompt
does: apply_chat_template with the generation prompt, no extra special tokens). Generation runs
in the micro-batcher's thread (batcher.py), so the event loop stays free; requests with the
same sampling settings that wait together share one generate() call.

Streaming is NOT token by token: the torch engine returns whole outputs, so a stream's text is
sent once the answer is finished, in word-sized delta chunks (one chunk with the role first).
True token streaming (an engine step callback) is future work. `stop` strings are applied to
the finished text (the engine stops on token ids only): generation may run past a stop string,
the answer is cut at it. A request's `seed` seeds its whole batch (requests with one seed and
settings batch together), so a seeded answer can depend on what else was in its batch.
"""
from __future__ import annotations

import asyncio
import gc
import re
import time
from dataclasses import dataclass

from tao_fast.serve.backend import chunk, completion, new_id, usage
from tao_fast.serve.batcher import MicroBatcher
from tao_fast.serve.validation import ApiError, ChatRequest, Limits

_WORDS = re.compile(r"(?<=\s)(?=\S)")  # split points: before each word after a space


@dataclass
class _Answer:
    """One prompt's generated choices."""
    texts: list[str]
    reasons: list[str]
    completion_tokens: int


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """text up to its earliest stop string, and whether one was found."""
    at = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:at], True) if at >= 0 else (text, False)


class TorchBackend:
    """Serves one model directory with the torch engine. max_batch: prompts per generate()."""

    def __init__(self, model_dir, *, served_name: str, version: str, fingerprint: str,
                 limits: Limits | None = None, max_batch: int = 8):
        from tao_fast.models import load_model
        from tao_fast.rollout.torch_engine import TorchEngine

        model, tokenizer, path = load_model(str(model_dir))
        if tokenizer is None:
            raise FileNotFoundError(f"{model_dir}: no tokenizer files: a served model needs one")
        model.requires_grad_(False)
        self.engine = TorchEngine(model, tokenizer)
        self.tokenizer, self.model_dir = tokenizer, path
        self.served_name, self.version, self.fingerprint = served_name, version, fingerprint
        self.limits = limits or Limits()
        self.context = self.engine.max_context
        self.batcher = MicroBatcher(self._generate, max_batch=max_batch,
                                    name=f"tao-serve-{version}")

    # ---- the engine's side (the batcher's thread) -----------------------------------------
    def _generate(self, key: tuple, prompts: list[list[int]]) -> list[_Answer]:
        from tao_fast.rollout.protocol import SamplingParams

        n, temperature, top_p, max_tokens, seed = key
        ro = self.engine.generate(prompts, SamplingParams(
            n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed))
        return [_Answer(list(ro.texts[i]), list(ro.finish_reasons[i]),
                        sum(len(t) for t in ro.token_ids[i])) for i in range(len(prompts))]

    # ---- the request's side (the event loop) ----------------------------------------------
    def encode(self, req: ChatRequest) -> tuple[list[int], int]:
        """(prompt token ids, max_tokens) of a request; ApiError(400) when its prompt and
        max_tokens do not fit the model's context."""
        text = self.tokenizer.apply_chat_template(req.messages, tokenize=False,
                                                  add_generation_prompt=True)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        room = self.context - len(ids)
        max_tokens = req.max_tokens or min(self.limits.max_tokens, room)
        if room < 1 or len(ids) + max_tokens > self.context:
            raise ApiError(400, f"this model's context is {self.context:,} tokens; the prompt "
                           f"has {len(ids):,} and max_tokens is {max_tokens:,}: shorten the "
                           f"messages or lower max_tokens", param="messages",
                           code="context_length_exceeded")
        return ids, max_tokens

    async def _answer(self, req: ChatRequest) -> tuple[list[int], _Answer]:
        ids, max_tokens = self.encode(req)
        key = (req.n, req.temperature, req.top_p, max_tokens, req.seed)
        ans = await asyncio.wrap_future(self.batcher.submit(key, ids))
        if req.stop:
            cut = [cut_at_stop(t, req.stop) for t in ans.texts]
            ans = _Answer([t for t, _ in cut], ["stop" if hit else r for (_, hit), r
                                                 in zip(cut, ans.reasons)],
                          ans.completion_tokens)
        return ids, ans

    async def chat(self, req: ChatRequest) -> dict:
        ids, ans = await self._answer(req)
        return completion(new_id(), self.served_name, self.fingerprint, ans.texts, ans.reasons,
                          usage(len(ids), ans.completion_tokens))

    async def stream(self, req: ChatRequest):
        """chat.completion.chunk dicts: the role, then (once generated) the text in word-sized
        deltas per choice, each choice's finish_reason, and a last chunk with usage."""
        ids, max_tokens = self.encode(req)  # refused before the first chunk
        rid, created = new_id(), int(time.time())

        def mk(choices, use=None):
            return chunk(rid, self.served_name, self.fingerprint, created, choices, use)

        yield mk([{"index": i, "delta": {"role": "assistant", "content": ""},
                   "finish_reason": None} for i in range(req.n)])
        ids, ans = await self._answer(req)
        for i, text in enumerate(ans.texts):
            for piece in _WORDS.split(text):
                if piece:
                    yield mk([{"index": i, "delta": {"content": piece}, "finish_reason": None}])
            yield mk([{"index": i, "delta": {}, "finish_reason": ans.reasons[i]}])
        yield mk([], usage(len(ids), ans.completion_tokens))

    def close(self) -> None:
        """Stop the batcher (after the batch running now) and drop the model."""
        self.batcher.close()
        self.engine = None
        gc.collect()
