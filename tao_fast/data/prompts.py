"""Prompt records and the JSONL reader: `{"prompt": "..."}` or `{"messages": [...]}` per line."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

ROLES = ("system", "user", "assistant")


class PromptFileError(ValueError):
    """A bad line in a prompt file; the message names the file and line."""


@dataclass
class PromptRecord:
    messages: list[dict]  # chat messages, the last one from the user
    meta: dict = field(default_factory=dict)  # other fields of the record, for scorers
    source: str = field(default="", compare=False)  # "file:line" it was read from, for errors

    @property
    def text(self) -> str:
        """The last user message: what a prompt-only verifier reads."""
        return next(m["content"] for m in reversed(self.messages) if m["role"] == "user")


def record_from_obj(obj, where: str) -> PromptRecord:
    if not isinstance(obj, dict):
        raise PromptFileError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    meta = {k: v for k, v in obj.items() if k not in ("prompt", "messages")}
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise PromptFileError(f"{where}: 'messages' must be a non-empty list")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ROLES \
                    or not isinstance(m.get("content"), str):
                raise PromptFileError(f"{where}: messages[{i}] must be "
                                      f"{{'role': one of {ROLES}, 'content': str}}")
        if msgs[-1]["role"] == "assistant":  # a logged answer would leak into the prompt
            msgs = msgs[:-1]
        if not any(m["role"] == "user" for m in msgs):
            raise PromptFileError(f"{where}: 'messages' has no user message")
        return PromptRecord(messages=[{"role": m["role"], "content": m["content"]} for m in msgs],
                            meta=meta, source=where)
    if "prompt" in obj:
        if not isinstance(obj["prompt"], str) or not obj["prompt"].strip():
            raise PromptFileError(f"{where}: 'prompt' must be a non-empty string")
        return PromptRecord(messages=[{"role": "user", "content": obj["prompt"]}], meta=meta,
                            source=where)
    raise PromptFileError(f"{where}: a record needs 'prompt' or 'messages' (keys: {sorted(obj)})")


def read_jsonl(path) -> list[PromptRecord]:
    """Read prompt records; a malformed line raises PromptFileError naming file and line."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    out = []
    with path.open("rb") as f:
        for ln, raw in enumerate(f, 1):
            where = f"{path}:{ln}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise PromptFileError(f"{where}: not UTF-8 (byte {e.start})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise PromptFileError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            out.append(record_from_obj(obj, where))
    if not out:
        raise PromptFileError(f"{path}: no prompts in file")
    return out


# How the prompt asks for the answer (rollout.strategy); appended to the last user message.
STRATEGY_SUFFIX = {
    "plain": "",
    "cot": "\nThink step by step, then give the final answer on the last line.",
    "structured": "\nReply with the final answer on its own line, as: Answer: <answer>",
}


def encode_prompt(rec: PromptRecord, tokenizer, strategy: str = "plain",
                  system_prompt: str = "") -> list[int]:
    """Chat-template the record (with the strategy's instruction) into prompt token ids."""
    msgs = [dict(m) for m in rec.messages]
    if system_prompt and msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": system_prompt})
    suffix = STRATEGY_SUFFIX[strategy]
    if suffix:
        last = max(i for i, m in enumerate(msgs) if m["role"] == "user")
        msgs[last]["content"] += suffix
    text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]
