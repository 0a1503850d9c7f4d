"""Reading request logs: files and directories of JSONL, CSV/TSV and Parquet (gzip or not),
and one logged record -> the chat messages of its prompt. `tao_fast.data.ingest` cleans,
deduplicates and splits what comes out of here; its docstring lists the formats and decisions.
"""
from __future__ import annotations

import csv
import json
import sys
import zlib
from collections import deque
from pathlib import Path

from tao_fast.data.lines import numbered_lines, open_bytes
from tao_fast.data.prompts import PromptFileError

MAX_LINE_BYTES = 64 << 20  # a longer JSONL line (or the CSV row holding it) is skipped unread,
# as "too long"
MAX_CSV_REREADS = 1000  # malformed multi-line CSV rows per file whose later lines are re-read
FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv",
           ".tsv": "tsv", ".parquet": "parquet", ".pq": "parquet"}
TEXT_PARTS = ("text", "input_text", "output_text")
ROLE_MAP = {"developer": "system", "system": "system", "user": "user", "assistant": "assistant",
            "tool": "tool", "function": "tool"}


class IngestError(PromptFileError):
    """Input that cannot be read at all (missing column, corrupt file): the run stops."""


class Drop(Exception):
    """One record is skipped, for `reason` (a summary key); `detail` says more."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


# ---- reading -------------------------------------------------------------------------------
def _format(path: Path) -> str | None:
    sfx = [s.lower() for s in path.suffixes]
    if sfx and sfx[-1] == ".gz":
        sfx.pop()
    return FORMATS.get(sfx[-1]) if sfx else None


def _expand(paths, out_dir: Path) -> tuple[list[Path], list[str]]:
    files, skipped, seen = [], [], set()
    out = out_dir.resolve()
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"input {p} does not exist")
        if p.is_dir():
            found = [f for f in sorted(p.rglob("*")) if f.is_file()
                     and not any(part.startswith(".") for part in f.relative_to(p).parts)
                     and out not in f.resolve().parents]
            skipped += [str(f) for f in found if _format(f) is None]
            found = [f for f in found if _format(f) is not None]
            if not found:
                raise IngestError(f"{p}: no .jsonl/.json/.ndjson/.csv/.tsv/.parquet files "
                                  "(optionally .gz) in this directory")
        else:
            found = [p]
        for f in found:
            if f.resolve() not in seen:
                seen.add(f.resolve())
                files.append(f)
    return files, skipped


def _lines(f):
    """(line number, bytes) per line; bytes is None for a line over MAX_LINE_BYTES (unread)."""
    return numbered_lines(f, MAX_LINE_BYTES)


def read_jsonl_objects(path: Path):
    """(line, object, None) or (line, None, Drop) per non-blank line."""
    with open_bytes(path) as f:
        for ln, raw in _lines(f):
            if raw is None:
                yield ln, None, Drop("too long", f"line over {MAX_LINE_BYTES:,} bytes")
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield ln, None, Drop("not UTF-8", f"byte {e.start}")
                continue
            if not text.strip():
                continue
            try:
                obj, err = json.loads(text), None
            except json.JSONDecodeError as e:
                obj, err = None, Drop("invalid JSON", f"{e.msg} at column {e.colno}")
            except RecursionError:
                obj, err = None, Drop("invalid JSON", "nested too deeply")
            yield ln, obj, err


class _TooLong(Exception):
    """A physical line over MAX_LINE_BYTES inside a CSV row (raised through csv.reader)."""


class _CsvLines:
    """The text lines of a CSV file for csv.reader, numbered, with the lines of the row being
    parsed kept: a malformed row is skipped and the lines after its first are read again (an
    unterminated quote must not swallow the rows after it)."""

    def __init__(self, f):
        self.src, self.back, self.row, self.rereads = _lines(f), deque(), [], 0

    def __iter__(self):
        return self

    def __next__(self) -> str:
        ln, raw = self.back.popleft() if self.back else next(self.src)
        self.row.append((ln, raw))
        if raw is None:
            raise _TooLong
        return raw.decode("utf-8", "surrogateescape")  # bad bytes are checked per cell

    def start(self) -> int:
        """The line where the row just read (or refused) starts."""
        return self.row[0][0] if self.row else 0

    def end_row(self, reread: bool = False) -> None:
        """Done with this row; reread: its lines after the first go back to be parsed again
        (at most MAX_CSV_REREADS rows a file, so an adversarial file stays linear)."""
        if reread and len(self.row) > 1 and self.rereads < MAX_CSV_REREADS:
            self.rereads += 1
            self.back.extendleft(reversed(self.row[1:]))
        self.row = []


def _csv_rows(lines: _CsvLines, rows):
    """(line where the row starts, row, None) or (line, None, Drop) per row after the header."""
    while True:
        try:
            row, err = next(rows), None
        except StopIteration:
            return
        except _TooLong:
            row, err = None, Drop("too long", f"a line over {MAX_LINE_BYTES:,} bytes")
        except csv.Error as e:  # strict: an unterminated quote, text after a closing quote
            row, err = None, Drop("bad CSV row", f"{e}; rows after its first line read again")
        start = lines.start()
        lines.end_row(reread=isinstance(err, Drop) and err.reason == "bad CSV row")
        if row != []:  # [] is a blank line
            yield start, row, err


def read_csv_column(path: Path, column: str, delimiter: str = ","):
    """(line where the row starts, cell, None) or (line, None, Drop) per non-blank row. Parsed
    strictly: a row with an unterminated quote (which would swallow the rows after it into one
    cell) or text after a closing quote is a "bad CSV row", and parsing resumes at its second
    line. NOT caught: a stray quote that a later quote closes at a field's end; that is valid
    CSV, read as one multi-line cell."""
    old = csv.field_size_limit(min(sys.maxsize, 2 ** 31 - 1))  # prompts can be huge
    try:
        with open_bytes(path) as f:
            lines = _CsvLines(f)
            rows = csv.reader(lines, delimiter=delimiter, strict=True)
            try:
                header = next(rows, None)
            except (csv.Error, _TooLong) as e:
                raise IngestError(f"{path}:1: unreadable CSV header ({e or 'too long'})") from None
            lines.end_row()
            if header is None:
                return
            if column not in header:
                raise IngestError(f"{path}: no column {column!r} (columns: {header}); "
                                  "pass --column NAME")
            yield from _csv_cells(_csv_rows(lines, rows), header, column)
    finally:
        csv.field_size_limit(old)


def _csv_cells(rows, header: list[str], column: str):
    idx = header.index(column)
    for ln, row, err in rows:
        if err is not None:
            yield ln, None, err
        elif idx >= len(row):
            yield ln, None, Drop("bad CSV row", f"{len(row)} fields, header has {len(header)}")
        else:
            try:
                row[idx].encode("utf-8")
            except UnicodeEncodeError:
                yield ln, None, Drop("not UTF-8", f"in column {column!r}")
                continue
            yield ln, row[idx], None


def read_parquet_column(path: Path, column: str):
    """(row number, value, None) per row of `column` (text, or a list of messages)."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise IngestError(f"{path}: reading Parquet needs the 'pyarrow' package "
                          "(pip install pyarrow)") from None
    try:
        with open_bytes(path) as src:
            pf = pq.ParquetFile(src)
            names = pf.schema_arrow.names
            if column not in names:
                raise IngestError(f"{path}: no column {column!r} (columns: {names}); "
                                  "pass --column NAME")
            n = 0
            for batch in pf.iter_batches(batch_size=4096, columns=[column]):
                for value in batch.column(0).to_pylist():
                    n += 1
                    yield n, value, None
    except pa.ArrowException as e:
        raise IngestError(f"{path}: not a readable Parquet file ({e})") from None


def _read(path: Path, fmt: str, column: str):
    try:
        if fmt == "parquet":
            yield from read_parquet_column(path, column)
        elif fmt in ("csv", "tsv"):
            yield from read_csv_column(path, column, "\t" if fmt == "tsv" else ",")
        else:
            yield from read_jsonl_objects(path)
    except (OSError, EOFError, zlib.error) as e:
        raise IngestError(f"{path}: unreadable ({type(e).__name__}: {e})") from None


# ---- one record -> messages ----------------------------------------------------------------
def _content(c, i: int) -> str:
    if c is None or isinstance(c, str):
        return c or ""
    if not isinstance(c, list):
        raise Drop("bad messages", f"messages[{i}].content is a {type(c).__name__}")
    texts = []
    for p in c:
        if isinstance(p, str):
            texts.append(p)
        elif isinstance(p, dict) and p.get("type") in TEXT_PARTS and isinstance(p.get("text"), str):
            texts.append(p["text"])
        elif isinstance(p, dict) and p.get("type") in TEXT_PARTS:
            raise Drop("bad messages", f"messages[{i}]: a text part without a string 'text'")
        else:
            kind = p.get("type") if isinstance(p, dict) else type(p).__name__
            raise Drop("non-text content", f"messages[{i}] has a {kind!r} part")
    return "\n".join(texts)


def _messages(msgs) -> list[dict]:
    """Chat messages up to the last user turn: system and earlier turns kept, answer dropped."""
    if not isinstance(msgs, list) or not msgs:
        raise Drop("bad messages", "'messages' must be a non-empty list")
    roles = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise Drop("bad messages", f"messages[{i}] is a {type(m).__name__}")
        role = m.get("role")
        if role is None and "call" in str(m.get("type", "")):  # Responses API tool items
            role = "tool"
        if role not in ROLE_MAP:
            raise Drop("bad messages", f"messages[{i}]: unknown role {role!r}")
        roles.append(ROLE_MAP[role])
    last = max((i for i, r in enumerate(roles) if r == "user"), default=-1)
    if last < 0:
        raise Drop("no user message")
    out = []
    for i, (role, m) in enumerate(zip(roles[:last + 1], msgs)):
        if role == "tool" or m.get("tool_calls") or m.get("function_call"):
            raise Drop("tool turns", f"messages[{i}]")
        out.append({"role": role, "content": _content(m.get("content"), i)})
    return out


def _from_obj(obj, column: str) -> list[dict]:
    if not isinstance(obj, dict):
        raise Drop("not a JSON object", f"a JSON {type(obj).__name__}")
    keys = sorted(map(str, obj))[:8]
    # unwrap log envelopes: {"request": ..}, batch-API {"body": ..}, {"input": {..}, "output": ..}
    while not (any(k in obj for k in ("messages", column, "prompt"))
               or isinstance(obj.get("input"), (str, list))):
        obj = next((obj[k] for k in ("request", "body", "input") if isinstance(obj.get(k), dict)),
                   None)
        if obj is None:
            raise Drop("no prompt", f"no 'messages' or {column!r}; keys: {keys}")
    if "messages" in obj:
        return _messages(obj["messages"])
    if column in obj or "prompt" in obj:
        return _from_value(obj[column] if column in obj else obj["prompt"])
    inp = obj["input"]  # Responses API: `instructions` + `input` (text or message items)
    inp = [{"role": "user", "content": inp}] if isinstance(inp, str) else inp
    if isinstance(obj.get("instructions"), str) and obj["instructions"]:
        inp = [{"role": "system", "content": obj["instructions"]}] + inp
    return _messages(inp)


def _from_value(v) -> list[dict]:
    """A CSV/Parquet cell or a `prompt` field: text, or a list of messages."""
    if isinstance(v, list) and len(v) == 1 and isinstance(v[0], str):
        v = v[0]  # the completions API's prompt list of one
    if isinstance(v, str):
        return [{"role": "user", "content": v}]
    if v is None:
        raise Drop("empty")
    if isinstance(v, list) and all(isinstance(m, dict) for m in v):
        return _messages(v)
    raise Drop("bad prompt", f"a {type(v).__name__}, not text")
