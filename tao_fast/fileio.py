"""Atomic file writes (temp file beside the destination, fsync, rename): a crash leaves the old
file or the new one, never half of one. No torch import, so data tools can use it cheaply."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable


def atomic_write_chunks(path, chunks: Iterable[str], mode: int | None = None) -> None:
    """Write the chunks in order (streamed), then rename into place. mode: permission bits
    of the new file (mkstemp's 0o600 otherwise)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path, text: str) -> None:
    atomic_write_chunks(path, [text])


def atomic_write_lines(path, lines: Iterable[str], mode: int | None = None) -> None:
    """Each line followed by a newline."""
    atomic_write_chunks(path, (line + "\n" for line in lines), mode)
