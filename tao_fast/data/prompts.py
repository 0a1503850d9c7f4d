"""Prompt records and the JSONL reader: `{"prompt": "..."}` or `{"messages": [...]}` per line.

A file may be gzip-compressed (read transparently, as `tao-fast ingest` reads its inputs). A
conversation is cut after its last user message: assistant turns after it are a logged answer
and would leak into the prompt (ingest cuts the same way).
"""
from __future__ import annotations

import gzip
import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from tao_fast.data.lines import numbered_lines, open_bytes

ROLES = ("system", "user", "assistant")
MAX_LINE_BYTES = 64 << 20  # a longer line is an error, read no further (one prompt, not a file)


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
        last = max((i for i, m in enumerate(msgs) if m["role"] == "user"), default=-1)
        if last < 0:
            raise PromptFileError(f"{where}: 'messages' has no user message")
        msgs = msgs[:last + 1]  # what follows the last user message is an answer: dropped
        return PromptRecord(messages=[{"role": m["role"], "content": m["content"]} for m in msgs],
                            meta=meta, source=where)
    if "prompt" in obj:
        if not isinstance(obj["prompt"], str) or not obj["prompt"].strip():
            raise PromptFileError(f"{where}: 'prompt' must be a non-empty string")
        return PromptRecord(messages=[{"role": "user", "content": obj["prompt"]}], meta=meta,
                            source=where)
    raise PromptFileError(f"{where}: a record needs 'prompt' or 'messages' (keys: {sorted(obj)})")


def read_records(path) -> list[PromptRecord]:
    """The prompt records of a JSONL file (gzip or not), in order; [] for a file without any.
    A malformed line raises PromptFileError naming file and line; so does a line over
    MAX_LINE_BYTES and a corrupt gzip stream."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    out = []
    try:
        with open_bytes(path) as f:
            for ln, raw in numbered_lines(f, MAX_LINE_BYTES):
                out.append(_line_record(raw, f"{path}:{ln}"))
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:  # truncated or corrupt
        raise PromptFileError(f"{path}: not a readable gzip file ({type(e).__name__}: {e})") \
            from None
    return [r for r in out if r is not None]


def _line_object(raw: bytes | None, where: str):
    """One JSONL line's JSON value; None for a blank line. A line over MAX_LINE_BYTES, not
    UTF-8 or not JSON raises PromptFileError naming `where` (file:line)."""
    if raw is None:
        raise PromptFileError(f"{where}: line over {MAX_LINE_BYTES:,} bytes")
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PromptFileError(f"{where}: not UTF-8 (byte {e.start})") from None
    if not line.strip():
        return None
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise PromptFileError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise PromptFileError(f"{where}: invalid JSON (nested too deeply)") from None


def _line_record(raw: bytes | None, where: str) -> PromptRecord | None:
    """One line's record; None for a blank line."""
    obj = _line_object(raw, where)
    return None if obj is None else record_from_obj(obj, where)


def read_jsonl(path) -> list[PromptRecord]:
    """Read prompt records (read_records); a file with none is a PromptFileError too."""
    out = read_records(path)
    if not out:
        raise PromptFileError(f"{path}: no prompts in file")
    return out


# How the prompt asks for the answer (rollout.strategy names one or several of these, as
# config.STRATEGIES lists them); appended to the last user message. fewshot adds no suffix:
# example exchanges (rollout.fewshot_file, read_fewshot) go before the record's messages.
STRATEGY_SUFFIX = {
    "plain": "",
    "cot": "\nThink step by step, then give the final answer on the last line.",
    "structured": "\nReply with the final answer on its own line, as: Answer: <answer>",
    "fewshot": "",
}
MAX_FEWSHOT = 16  # examples in rollout.fewshot_file: each one lengthens every prompt


def read_fewshot(path) -> list[dict]:
    """rollout.fewshot_file's examples as chat turns [user, assistant, user, assistant, ...].
    Each line is {"prompt": str, "response": str} or {"messages": [{"role": "user", ...},
    {"role": "assistant", ...}]} (one user turn, then its answer). '' -> []. A malformed line
    raises PromptFileError naming file and line."""
    if not path:
        return []
    if not Path(path).is_file():
        raise FileNotFoundError(f"rollout.fewshot_file {path} does not exist")
    turns, n = [], 0
    with open_bytes(Path(path)) as f:
        for ln, raw in numbered_lines(f, MAX_LINE_BYTES):
            obj = _line_object(raw, f"{path}:{ln}")
            if obj is not None:
                turns += _fewshot_pair(obj, f"{path}:{ln}")
                n += 1
    if not 1 <= n <= MAX_FEWSHOT:
        raise PromptFileError(f"{path}: rollout.fewshot_file needs 1 to {MAX_FEWSHOT} examples, "
                              f"has {n}")
    return turns


def _fewshot_pair(obj, where: str) -> list[dict]:
    """One example line's JSON value -> [its user turn, its assistant turn]."""
    if isinstance(obj, dict) and "messages" in obj:
        msgs = obj["messages"]
    elif isinstance(obj, dict) and "prompt" in obj:
        msgs = [{"role": "user", "content": obj["prompt"]},
                {"role": "assistant", "content": obj.get("response")}]
    else:
        raise PromptFileError(f"{where}: an example needs 'prompt' and 'response', or "
                              f"'messages'")
    if not (isinstance(msgs, list) and len(msgs) == 2 and all(isinstance(m, dict) for m in msgs)
            and [m.get("role") for m in msgs] == ["user", "assistant"]
            and all(isinstance(m.get("content"), str) and m["content"].strip() for m in msgs)):
        raise PromptFileError(f"{where}: an example is one user message and its assistant "
                              f"answer, both non-empty strings")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def encode_prompt(rec: PromptRecord, tokenizer, strategy: str = "plain",
                  system_prompt: str = "", fewshot: list[dict] = ()) -> list[int]:
    """Chat-template the record (with the strategy's instruction) into prompt token ids.
    fewshot: example turns (read_fewshot) put after the system message and before the
    record's messages, under the fewshot strategy only."""
    msgs = [dict(m) for m in rec.messages]
    if system_prompt and msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": system_prompt})
    if strategy == "fewshot":
        if not fewshot:
            raise ValueError("encode_prompt: the fewshot strategy needs example turns "
                             "(rollout.fewshot_file)")
        at = int(msgs[0]["role"] == "system")
        msgs[at:at] = [dict(m) for m in fewshot]
    suffix = STRATEGY_SUFFIX[strategy]
    if suffix:
        last = max(i for i, m in enumerate(msgs) if m["role"] == "user")
        msgs[last]["content"] += suffix
    text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]
