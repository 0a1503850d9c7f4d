"""A run's prompts from its `data` section: each source's training prompts and held-out ones.

data.train is one source or a list of them (a mix, tao_fast/data/mix.py): a builtin task
(tao_fast/data/tasks.py), a JSONL prompt file, or a directory of them. In a mix, a source's
`task` (a builtin task's own name by default) is written into data.task_field of its records
that name none, so a route scorer and the per-task figures can tell the tasks apart.
"""
from __future__ import annotations

from dataclasses import dataclass

from tao_fast.config import ConfigError, DataConfig, Source
from tao_fast.data.prompts import PromptFileError, PromptRecord, read_jsonl
from tao_fast.data.rounds import note, read_train_file, scan
from tao_fast.data.tasks import builtin_split

SKIPPED_LISTED = 10  # skipped files named in the note; the rest are counted


@dataclass
class SourcePrompts:
    """One source of data.train and its prompts now (a directory's: every file there now)."""
    spec: Source
    task: str  # written into data.task_field of its records that name none ("" = nothing)
    train: list[PromptRecord]
    held: list[PromptRecord]  # a builtin task's held-out split; [] for files

    @property
    def builtin(self) -> list[PromptRecord] | None:
        """A builtin task's fixed prompts (every round uses them all); None for files."""
        return self.train if self.spec.builtin else None


def source_task(src: Source, data: DataConfig) -> str:
    """The task name a source gives its records: its `task`, else in a mix a builtin task's
    own name, else none."""
    return src.task or (src.builtin if data.mixed else "")


def tag(recs: list[PromptRecord], task: str, field: str) -> list[PromptRecord]:
    """recs with meta[field] = task where they name none (no-op for task "")."""
    if task:
        for r in recs:
            r.meta.setdefault(field, task)
    return recs


def load_sources(data: DataConfig, seed: int) -> list[SourcePrompts]:
    """Every source of data.train with its prompts; a builtin task's two splits share no
    prompt (seeded by `seed`). A directory's files that are not read, and its empty prompt
    files, are named in a note on stderr."""
    out = []
    for i, src in enumerate(data.sources):
        where = "data.train" if isinstance(data.train, str) else f"data.train[{i}]"
        task = source_task(src, data)
        if src.builtin:
            n_train = data.n_train if src.n_train is None else src.n_train
            n_eval = data.n_eval if src.n_eval is None else src.n_eval
            try:
                train, held = builtin_split(src.builtin, n_train, n_eval, seed, ops=data.ops,
                                            digits=data.digits, words=data.words)
            except ValueError as e:
                raise ConfigError(f"{where}: {src.source} with n_train={n_train}, "
                                  f"n_eval={n_eval}: {e}") from None
        else:
            train, held = _train_files(src.source), []
        out.append(SourcePrompts(src, task, tag(train, task, data.task_field),
                                 tag(held, task, data.task_field)))
    return out


def load_prompts(data: DataConfig, seed: int) -> tuple[list[PromptRecord], list[PromptRecord]]:
    """(train, held-out) prompt records of every source together. train is every prompt there
    now (rounds take it in parts, tao_fast/data/rounds.py); held-out is data.eval's file when
    set, else the builtin tasks' held-out splits."""
    srcs = load_sources(data, seed)
    return [r for s in srcs for r in s.train], held_out(data, srcs)


def held_out(data: DataConfig, srcs: list[SourcePrompts]) -> list[PromptRecord]:
    """The held-out prompts: data.eval's file when set, else the builtin tasks' splits."""
    return read_jsonl(data.eval) if data.eval else [r for s in srcs for r in s.held]


def _train_files(train: str) -> list[PromptRecord]:
    """Every prompt behind a file or directory source now."""
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
