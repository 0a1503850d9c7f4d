"""Reading text files a line at a time, within bounds: gzip read transparently (by its `.gz`
suffix or its magic bytes), no line held whole past a byte limit. The prompt reader (prompts.py)
and the request-log readers (logs.py) share these."""
from __future__ import annotations

import gzip
from pathlib import Path

GZIP_MAGIC = b"\x1f\x8b"
UTF8_BOM = b"\xef\xbb\xbf"


def is_gzip(path: Path) -> bool:
    """A `.gz` name or gzip's magic bytes at the start (a compressed file without the suffix)."""
    with Path(path).open("rb") as f:
        return f.read(2) == GZIP_MAGIC or Path(path).suffix.lower() == ".gz"


def open_bytes(path: Path):
    """A binary file object of the file's content, decompressed when it is gzip."""
    return gzip.open(path, "rb") if is_gzip(path) else Path(path).open("rb")


def numbered_lines(f, limit: int):
    """(line number, bytes) per line of a binary file; bytes is None for a line over `limit`
    bytes, which is skipped unread (at most `limit` + 1 MiB held). A UTF-8 byte-order mark
    on line 1 is dropped."""
    ln = 0
    while raw := f.readline(limit + 1):
        ln += 1
        if len(raw) > limit and not raw.endswith(b"\n"):
            while (rest := f.readline(1 << 20)) and not rest.endswith(b"\n"):
                pass
            raw = None
        elif ln == 1 and raw.startswith(UTF8_BOM):
            raw = raw[len(UTF8_BOM):]
        yield ln, raw
