"""Turn request logs into a prompt set: `tao-fast ingest` and `ingest()`.

Inputs (files, or directories searched recursively, sorted, hidden entries skipped; `.gz`
suffix or gzip magic bytes are decompressed transparently):
- JSONL (.jsonl .ndjson .json, and explicit files of any other suffix): one object per line,
  either an OpenAI chat-completions request body (`{"model", "messages"}`), a log wrapper
  (`{"request": {...}, "response": {...}}`), a batch-API input line (`{"custom_id", "body"}`),
  `{"messages": [...]}`, a Responses-API body (`{"instructions", "input"}`), or a prompt
  record (`{"prompt": "..."}`, or the key named by `column`).
- CSV / TSV with a header row; `column` names the prompt column. Parsed strictly: a row with
  an unterminated quote (which would swallow the rows after it into one cell) is reported as a
  malformed "bad CSV row" at its file:line and skipped, and reading resumes at its next line; a
  row with a physical line over MAX_LINE_BYTES is dropped as "too long".
- Parquet (needs pyarrow); `column` holds text, or a list of {role, content} messages.

Decisions:
- The prompt is the conversation up to and including the *last user message*: assistant
  turns before it are context and stay; everything after it (the logged answer, tool calls
  and results) is dropped so no answer leaks. System prompts stay ("developer" becomes
  "system").
- Tool/function turns (or assistant tool calls) inside that prompt: the record is dropped
  ("tool turns"); a prompt set has no way to replay them. Tool *definitions* are not carried.
- Content parts: text parts are joined with "\\n" (as vLLM does); any image/audio/file part
  in the prompt drops the record ("non-text content"): the text alone would ask about
  something the model cannot see.
- Non-UTF-8 bytes (or lone-surrogate escapes): the line is reported and skipped, not repaired.
- Other fields of a record (model, temperature, metadata) are not carried over.
- Duplicates: same normalised conversation (see dedup.normalize) -> "duplicate"; word-3-gram
  Jaccard >= near_dup_threshold of the non-system text, among records with the same system
  prompt and the same numbers -> "near-duplicate". The first seen is kept.
- Held-out split: sha256 of the normalised non-system conversation -> [0, 1) < heldout_frac.
  The same question is always on the same side, in every run and round, whatever system
  prompt it came with; a near-duplicate cluster is kept as one prompt, so it is on one side.
- Earlier rounds (`seen`: their prompt files, e.g. an earlier OUT's train.jsonl and
  heldout.jsonl, or directories of them): a record that is an exact or near duplicate of one of
  their prompts (the same tests as above) is dropped as "seen in an earlier round", so a
  round trains only on what is new and a prompt once held out never becomes a training one.

Outputs in OUT (each written to a temp file, then os.replace): train.jsonl, heldout.jsonl
(`{"messages", "id", "source": "file:line"}`, input order; read_jsonl reads them) and
ingest_summary.json. For Parquet the "line" is the 1-based row number. No train.jsonl is written
when every kept prompt is held out (an empty one would stop every `tune` of OUT), and nothing at
all when no prompt is kept: OUT is left as it was. The summary's `written` lists what was.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tao_fast.data.dedup import (
    digest,
    digits,
    near_duplicates,
    normalize,
    unit_fraction,
)
from tao_fast.data.logs import (  # noqa: F401 - readers re-exported for callers
    FORMATS,
    MAX_LINE_BYTES,
    Drop,
    IngestError,
    _expand,
    _format,
    _from_obj,
    _from_value,
    _read,
    read_csv_column,
    read_jsonl_objects,
    read_parquet_column,
)
from tao_fast.fileio import atomic_write_lines

DEFAULT_MAX_CHARS = 32_000
N_EXAMPLES = 5  # malformed locations listed per file in the summary
SEEN = "seen in an earlier round"  # the drop reason of a prompt an earlier round holds
MALFORMED = frozenset({"not UTF-8", "invalid JSON", "not a JSON object", "no prompt",
                       "bad prompt", "bad messages", "bad CSV row"})


@dataclass
class FileStats:
    path: str
    format: str
    read: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    malformed: list[str] = field(default_factory=list)  # the first N_EXAMPLES "file:line: why"

    def drop(self, d: Drop, where: str) -> None:
        self.dropped[d.reason] = self.dropped.get(d.reason, 0) + 1
        if d.reason in MALFORMED and len(self.malformed) < N_EXAMPLES:
            self.malformed.append(f"{where}: {d.reason}" + (f" ({d.detail})" if d.detail else ""))


@dataclass
class IngestSummary:
    out_dir: str
    read: int
    kept: int
    train: int
    heldout: int
    dropped: dict[str, int]
    malformed: int
    files: list[FileStats]
    skipped_files: list[str]
    settings: dict
    seconds: float
    written: list[str] = field(default_factory=list)  # the files of OUT this ingest wrote
    seen_prompts: int = 0  # earlier rounds' prompts (`seen`) the records were checked against

    def to_dict(self) -> dict:
        return asdict(self)

    def malformed_lines(self) -> list[str]:
        return [m for f in self.files for m in f.malformed]

    def text(self) -> str:
        drops = ", ".join(f"{k} {v:,}" for k, v in sorted(self.dropped.items(), key=lambda kv: -kv[1]))
        return (f"ingest: read {self.read:,} records from {len(self.files)} file(s) -> kept "
                f"{self.kept:,} (train {self.train:,}, held-out {self.heldout:,}) in {self.out_dir}"
                f" [{self.seconds:.1f} s]\n  dropped {sum(self.dropped.values()):,}"
                + (f": {drops}" if drops else "")
                + (f"\n  skipped {len(self.skipped_files)} file(s) of unknown type"
                   if self.skipped_files else "")
                + ("" if self.train else
                   "\n  no train.jsonl written: every kept prompt is held out" if self.kept else
                   f"\n  nothing written to {self.out_dir}: no prompt kept"))


def _check(msgs: list[dict], max_chars: int | None, tokenizer, max_tokens: int | None) -> None:
    last_user = next(m for m in reversed(msgs) if m["role"] == "user")
    if not last_user["content"].strip():
        raise Drop("empty")
    n = sum(len(m["content"]) for m in msgs)
    if max_chars is not None and n > max_chars:
        raise Drop("too long", f"{n:,} characters")
    for m in msgs:
        try:
            m["content"].encode("utf-8")
        except UnicodeEncodeError:
            raise Drop("not UTF-8", "a lone surrogate escape in the text") from None
    if tokenizer is not None and max_tokens is not None:
        n = len(tokenizer.encode("\n".join(m["content"] for m in msgs)))
        if n > max_tokens:
            raise Drop("too long", f"{n:,} tokens")


# ---- the run -------------------------------------------------------------------------------
@dataclass
class _Rec:
    messages: list[dict]
    source: str
    file: int
    key: str  # normalised conversation, system included: exact duplicates, the id
    split_key: str  # normalised non-system conversation: the split, near duplicates
    guard: bytes  # system prompt + numbers: only records alike in these are near-dup compared


def _rec(msgs: list[dict], source: str, file: int) -> _Rec:
    norm = [(m["role"], normalize(m["content"])) for m in msgs]
    system = "\n".join(t for r, t in norm if r == "system")
    split_key = "\n".join(f"{r}: {t}" for r, t in norm if r != "system")
    return _Rec(msgs, source, file, key="\n".join(f"{r}: {t}" for r, t in norm),
                split_key=split_key, guard=digest(system + "\0" + digits(split_key))[:16])


_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def _jsonl_line(r: _Rec) -> str:
    """One output line: UTF-8 text, with the Unicode line breaks that str.splitlines() and
    some JSONL readers split on escaped."""
    return json.dumps({"messages": r.messages, "id": digest(r.key)[:8].hex(), "source": r.source},
                      ensure_ascii=False).translate(_LINE_BREAKS)


def ingest(paths, out_dir, *, column: str = "prompt", heldout_frac: float = 0.1,
           max_chars: int | None = DEFAULT_MAX_CHARS, near_dup_threshold: float | None = 0.9,
           tokenizer=None, max_tokens: int | None = None, progress: bool = False,
           seen=()) -> IngestSummary:
    """Read request logs / prompt files under `paths`, clean them, and write OUT/train.jsonl,
    OUT/heldout.jsonl and OUT/ingest_summary.json. `near_dup_threshold=None` turns near-dup
    removal off; `tokenizer` (anything with .encode(text) -> ids) with `max_tokens` adds a
    token limit to the character limit; `seen` (prompt files or directories of earlier
    rounds) drops what they hold already. Raises IngestError for unreadable input."""
    t0 = time.perf_counter()
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not 0.0 <= heldout_frac <= 1.0:
        raise IngestError(f"heldout_frac must be in [0, 1], got {heldout_frac}")
    if near_dup_threshold is not None and not 0.0 < near_dup_threshold <= 1.0:
        raise IngestError(f"near_dup_threshold must be in (0, 1], got {near_dup_threshold}")
    if max_chars is not None and max_chars < 1:
        raise IngestError(f"max_chars must be positive, got {max_chars}")
    out = Path(out_dir)
    files, skipped = _expand(paths, out)
    if not files:
        raise IngestError("no input files given")
    stats = [FileStats(str(f), _format(f) or "jsonl") for f in files]
    recs: list[_Rec] = []
    prior = _seen_records(seen)  # earlier rounds' prompts: dropped where met again
    prior_keys, keys = {r.key for r in prior}, set()
    from tqdm import tqdm

    with tqdm(desc="ingest", unit=" rec", disable=None if progress else True,
              file=sys.stderr) as bar:
        for fi, (path, st) in enumerate(zip(files, stats)):
            for ln, value, err in _read(path, st.format, column):
                st.read += 1
                bar.update()
                try:
                    if err is not None:
                        raise err
                    msgs = _from_obj(value, column) if st.format == "jsonl" else _from_value(value)
                    _check(msgs, max_chars, tokenizer, max_tokens)
                    rec = _rec(msgs, f"{path}:{ln}", fi)
                    if rec.key in prior_keys:
                        raise Drop(SEEN)
                    if rec.key in keys:
                        raise Drop("duplicate")
                except Drop as d:
                    st.drop(d, f"{path}:{ln}")
                    continue
                keys.add(rec.key)
                recs.append(rec)
    if near_dup_threshold is not None and recs:
        docs = prior + recs  # the earlier rounds' prompts first: a match to one is "seen"
        rep = near_duplicates([r.split_key.split() for r in docs], [r.guard for r in docs],
                              threshold=near_dup_threshold)[len(prior):]
        for r, j in zip(recs, rep):
            if j >= 0:
                stats[r.file].drop(Drop(SEEN if j < len(prior) else "near-duplicate"), r.source)
        recs = [r for r, j in zip(recs, rep) if j < 0]
    held = [unit_fraction(r.split_key) < heldout_frac for r in recs]
    for r in recs:
        stats[r.file].kept += 1
    dropped: dict[str, int] = {}
    for st in stats:
        for k, v in st.dropped.items():
            dropped[k] = dropped.get(k, 0) + v
    summary = IngestSummary(
        out_dir=str(out), read=sum(s.read for s in stats), kept=len(recs),
        train=len(recs) - sum(held), heldout=sum(held), dropped=dict(sorted(dropped.items())),
        malformed=sum(v for k, v in dropped.items() if k in MALFORMED), files=stats,
        skipped_files=skipped, seconds=round(time.perf_counter() - t0, 3),
        settings={"column": column, "heldout_frac": heldout_frac, "max_chars": max_chars,
                  "max_tokens": max_tokens, "near_dup_threshold": near_dup_threshold,
                  "seen": [str(x) for x in _as_list(seen)]},
        seen_prompts=len(prior))
    _write_outputs(out, recs, held, summary)
    return summary


def _as_list(paths) -> list:
    return [paths] if isinstance(paths, (str, os.PathLike)) else list(paths or ())


def _seen_records(paths) -> list[_Rec]:
    """The prompts of earlier rounds' files (or directories of *.jsonl / *.jsonl.gz files,
    held-out ones included) as records to compare against; a missing one is an IngestError."""
    from tao_fast.data.prompts import read_records

    files = []
    for p in map(Path, _as_list(paths)):
        if not p.exists():
            raise IngestError(f"seen: {p} does not exist (an earlier round's prompt file)")
        files += sorted(f for f in p.rglob("*") if f.is_file() and f.name.lower().endswith(
            (".jsonl", ".jsonl.gz"))) if p.is_dir() else [p]
    return [_rec(r.messages, f"{f}:seen", -1) for f in files for r in read_records(f)]


def _write_outputs(out: Path, recs: list[_Rec], held: list[bool], summary: IngestSummary) -> None:
    """train.jsonl, heldout.jsonl and ingest_summary.json, each atomically. Nothing at all when
    no prompt was kept (OUT stays as it was); no train.jsonl when every kept prompt is held out
    (an earlier one there is removed): an empty train.jsonl would stop every `tune` of OUT."""
    if not recs:
        return
    out.mkdir(parents=True, exist_ok=True)
    written = ["heldout.jsonl", "ingest_summary.json"]
    if summary.train:
        atomic_write_lines(out / "train.jsonl",
                           (_jsonl_line(r) for r, h in zip(recs, held) if not h), 0o644)
        written.insert(0, "train.jsonl")
    atomic_write_lines(out / "heldout.jsonl", (_jsonl_line(r) for r, h in zip(recs, held) if h),
                       0o644)
    summary.written = written
    atomic_write_lines(out / "ingest_summary.json", [json.dumps(summary.to_dict(), indent=1)],
                       0o644)
    if not summary.train:
        (out / "train.jsonl").unlink(missing_ok=True)
