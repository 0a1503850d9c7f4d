"""A run's prompts from its `data` section: the training prompts and the held-out ones."""
from __future__ import annotations

from tao_fast.config import ConfigError, DataConfig
from tao_fast.data.arithmetic import arithmetic_split
from tao_fast.data.prompts import PromptRecord, read_jsonl
from tao_fast.data.rounds import discover


def load_prompts(data: DataConfig, seed: int) -> tuple[list[PromptRecord], list[PromptRecord]]:
    """(train, held-out) prompt records; the builtin task's two sets share no question (seeded
    by `seed`). For a JSONL file or directory, train is every prompt there now (rounds take it
    in parts, tao_fast/data/rounds.py); data.eval, when set, is the held-out file."""
    if data.train == "builtin:arithmetic":
        train, held = arithmetic_split(data.n_train, data.n_eval, seed, ops=data.ops,
                                       digits=data.digits, words=data.words)
    elif data.train.startswith("builtin:"):
        raise ConfigError(f"data.train: unknown builtin task {data.train!r} (builtin:arithmetic)")
    else:
        train, held = [r for f in discover(data.train) for r in read_jsonl(f)], []
    if data.eval:
        held = read_jsonl(data.eval)
    return train, held
