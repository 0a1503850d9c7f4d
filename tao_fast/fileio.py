"""Atomic writes of files and directories (built under a temporary name beside the
destination, then renamed into place): a crash leaves the old one or the new one, never half of
one. New files and directories get the usual modes (0o666 / 0o777 less the umask), not the
private 0o600 / 0o700 of a temporary one, so a server running as another user can read a
checkpoint. No torch import, so data tools can use it cheaply."""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it: put it straight back
    os.umask(mask)
    return mask


_UMASK = _umask()
FILE_MODE = 0o666 & ~_UMASK  # what open() would give a new file
DIR_MODE = 0o777 & ~_UMASK  # what mkdir() would give a new directory


def atomic_write_chunks(path, chunks: Iterable[str], mode: int | None = None) -> None:
    """Write the chunks in order (streamed), then rename into place. mode: permission bits
    of the new file (FILE_MODE otherwise)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE if mode is None else mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path, text: str) -> None:
    atomic_write_chunks(path, [text])


def atomic_write_lines(path, lines: Iterable[str], mode: int | None = None) -> None:
    """Each line followed by a newline."""
    atomic_write_chunks(path, (line + "\n" for line in lines), mode)


@contextmanager
def atomic_dir(dest, *, keep_existing: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `dest`; when the block ends without an exception it
    becomes `dest` (by rename), and on an exception it is removed and `dest` is untouched.

    An existing `dest` is replaced: it stays in place until the new one is complete, is moved
    aside, and goes once the new one is in. keep_existing=True keeps it instead and drops the
    new one (a cache that another process filled first)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".tmp-", dir=dest.parent))
    try:
        os.chmod(tmp, DIR_MODE)
        yield tmp
        if not dest.exists():
            os.replace(tmp, dest)
        elif keep_existing:
            shutil.rmtree(tmp)
        else:
            old = dest.with_name(dest.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
