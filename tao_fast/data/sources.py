"""A run's prompts from its `data` section: the training prompts and the held-out ones."""
from __future__ import annotations

from tao_fast.config import ConfigError, DataConfig
from tao_fast.data.arithmetic import arithmetic_split
from tao_fast.data.prompts import PromptFileError, PromptRecord, read_jsonl
from tao_fast.data.rounds import note, read_train_file, scan

SKIPPED_LISTED = 10  # skipped files named in the note; the rest are counted


def load_prompts(data: DataConfig, seed: int) -> tuple[list[PromptRecord], list[PromptRecord]]:
    """(train, held-out) prompt records; the builtin task's two sets share no question (seeded
    by `seed`). For a JSONL file or directory, train is every prompt there now (rounds take it
    in parts, tao_fast/data/rounds.py); data.eval, when set, is the held-out file. A directory's
    files that are not read, and its empty prompt files, are named in a note on stderr."""
    if data.train == "builtin:arithmetic":
        train, held = arithmetic_split(data.n_train, data.n_eval, seed, ops=data.ops,
                                       digits=data.digits, words=data.words)
    elif data.train.startswith("builtin:"):
        raise ConfigError(f"data.train: unknown builtin task {data.train!r} (builtin:arithmetic)")
    else:
        train, held = _train_files(data.train), []
    if data.eval:
        held = read_jsonl(data.eval)
    return train, held


def _train_files(train: str) -> list[PromptRecord]:
    """Every prompt behind data.train now (a file, or a directory of them)."""
    files, skipped = scan(train)
    if skipped:
        names = ", ".join(str(f) for f in skipped[:SKIPPED_LISTED])
        more = f" and {len(skipped) - SKIPPED_LISTED} more" if len(skipped) > SKIPPED_LISTED else ""
        note(f"data.train: skipped {len(skipped)} file(s) that are not *.jsonl or *.jsonl.gz: "
             f"{names}{more}")
    recs = [r for f in files for r in read_train_file(f, train)]
    if not recs:
        raise PromptFileError(f"data.train: no prompts in {train}: every prompt file there is "
                              f"empty ({', '.join(str(f) for f in files[:SKIPPED_LISTED])})")
    return recs
