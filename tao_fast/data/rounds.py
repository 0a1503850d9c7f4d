"""Which prompts each round trains on: the new ones since the last round, plus a replayed share.

A source of `data.train` is a JSONL prompt file, a directory of them (e.g. one `tao-fast ingest`
output per week of request logs: *.jsonl and *.jsonl.gz files are read, except heldout*; any
other file is skipped and named in a note, except ingest's own ingest_summary.json), or a
builtin task; a mix of several sources plans each one this way (tao_fast/data/mix.py).
A file of a directory that holds no prompt (an empty file) is skipped with a note rather than
stopping the run: one week without usable logs should not stop training on the others; it is
not recorded as used, so it counts as new once it has prompts. At the
start of every round the directory is scanned again; files no earlier round used are the new
data. The round's pool is every new prompt plus old prompts drawn (seeded) so that they make up
`data.replay_frac` of the pool; a round with no new file replays the old prompts alone.

The run's manifest.jsonl gets one line per round: the files read (with size and sha256), how
many prompts were new and replayed, and every prompt's id, so a run is auditable and a resumed
run rebuilds exactly the pool it was using. A resume (a run with a saved training state) checks
that the manifest covers the state's round and that every file its rounds read is still there
unchanged (size and sha256): otherwise a ResumeError naming the file and what changed, never a
silently different run.
"""
from __future__ import annotations

import hashlib
import json
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tao_fast.config import ResumeError
from tao_fast.data.prompts import PromptRecord, read_jsonl, read_records

PROMPT_SUFFIXES = (".jsonl", ".jsonl.gz")
INGEST_SIDE_FILES = ("ingest_summary.json",)  # written beside the prompts, not reported


def prompt_id(rec: PromptRecord) -> str:
    """Stable id of a prompt: a hash of its messages (what the model sees)."""
    blob = json.dumps(rec.messages, sort_keys=True, ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _is_prompt_file(f: Path) -> bool:
    return f.name.lower().endswith(PROMPT_SUFFIXES) and not f.name.startswith("heldout")


def scan(train: str) -> tuple[list[Path], list[Path]]:
    """(the prompt files behind data.train in a stable order, the other files of its directory,
    which are skipped: hidden entries and ingest's summary left out)."""
    p = Path(train)
    if p.is_dir():
        found = sorted(f for f in p.rglob("*") if f.is_file())
        files = [f for f in found if _is_prompt_file(f)]
        skipped = [f for f in found if not _is_prompt_file(f) and not f.name.startswith("heldout")
                   and f.name not in INGEST_SIDE_FILES
                   and not any(x.startswith(".") for x in f.relative_to(p).parts)]
        if not files:
            raise FileNotFoundError(f"data.train: directory {p} holds no *.jsonl or *.jsonl.gz "
                                    f"prompt files")
        return files, skipped
    if not p.exists():
        raise FileNotFoundError(f"prompt file {p} does not exist")
    return [p], []


def discover(train: str) -> list[Path]:
    """The prompt files behind data.train, in a stable order."""
    return scan(train)[0]


def note(msg: str) -> None:
    print(f"tao-fast: note: {msg}", file=sys.stderr, flush=True)


def read_train_file(f: Path, train: str, quiet: bool = False) -> list[PromptRecord]:
    """The prompts of one file behind data.train. A file of a directory with none is skipped
    (with a note unless quiet); data.train naming the file itself must hold prompts."""
    if not Path(train).is_dir():
        return read_jsonl(f)
    recs = read_records(f)
    if not recs and not quiet:
        note(f"data.train: {f} holds no prompts: skipped")
    return recs


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class RoundPlan:
    round: int
    prompts: list[PromptRecord]  # the round's pool
    new_files: list[dict]  # {path, bytes, sha256} of each file first used by this round
    n_new: int
    n_replay: int
    mix: list[dict] = field(default_factory=list)  # per source (tao_fast/data/mix.py)

    def manifest_line(self) -> dict:
        line = {"round": self.round, "new_files": self.new_files, "n_new": self.n_new,
                "n_replay": self.n_replay, "prompt_ids": [prompt_id(r) for r in self.prompts]}
        return {**line, "mix": self.mix} if self.mix else line


def read_manifest(run_dir: Path) -> list[dict]:
    """The run's manifest.jsonl, one dict per round begun. Where the run has a saved training
    state (it is being resumed), also checks that the manifest covers the state's round and that
    every file those rounds read is unchanged. Errors are ResumeErrors naming the file (and
    line): a line that is not JSON or lacks a field, the manifest missing or short, a prompt file
    gone or changed."""
    run_dir = Path(run_dir)
    path = run_dir / "manifest.jsonl"
    lines = _manifest_lines(path) if path.exists() else []
    saved = _saved_round(run_dir)
    if saved is not None:
        if len(lines) < saved:
            have = f"holds {len(lines)} round(s)" if path.exists() else "is missing"
            raise ResumeError(f"resume: {path} {have}, but the run's saved training state is in "
                              f"round {saved}: the prompt pools cannot be rebuilt (restore the "
                              f"file, or start a new run)")
        for line in lines[:saved]:
            for entry in line["new_files"]:
                _check_unchanged(entry, line["round"])
    return lines


def _manifest_lines(path: Path) -> list[dict]:
    out = []
    for ln, text in enumerate(path.read_bytes().decode("utf-8", "replace").splitlines(), 1):
        if not text.strip():
            continue
        try:
            line = json.loads(text)
        except json.JSONDecodeError as e:
            raise ResumeError(f"{path}:{ln}: not JSON ({e.msg} at column {e.colno})") from None
        missing = [k for k in ("round", "new_files", "prompt_ids") if not isinstance(line, dict)
                   or k not in line]
        if missing:
            raise ResumeError(f"{path}:{ln}: not a manifest line (no {', '.join(missing)})")
        out.append(line)
    return out


def _saved_round(run_dir: Path) -> int | None:
    """The round of the newest saved training state (state/latest names it, its state.json
    holds the round: tao_fast/rl/state.py); None without one, or where it cannot be read
    (loading the state reports that)."""
    try:
        name = (run_dir / "state" / "latest").read_text().strip()
        return int(json.loads((run_dir / "state" / name / "state.json").read_text())["round"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _check_unchanged(entry: dict, rnd: int) -> None:
    """A ResumeError when a prompt file that round `rnd` read is gone or changed since."""
    if "sha256" not in entry:  # a builtin task: nothing on disk
        return
    p = Path(entry["path"])
    if not p.is_file():
        raise ResumeError(f"resume: {p}, read by round {rnd}, is gone (moved or removed since): "
                          f"restore it, or start a new run")
    size, digest = p.stat().st_size, _sha256(p)
    if size != entry["bytes"] or digest != entry["sha256"]:
        raise ResumeError(f"resume: {p} changed since round {rnd} read it ({entry['bytes']:,} -> "
                          f"{size:,} bytes, sha256 {entry['sha256'][:12]} -> {digest[:12]}): its "
                          f"prompts cannot be rebuilt; restore it, or start a new run")


def plan_round(rnd: int, train: str, manifest: list[dict], replay_frac: float, seed: int,
               builtin: list[PromptRecord] | None = None) -> RoundPlan:
    """The pool of round `rnd` given the manifest of the rounds before it."""
    rng = random.Random(seed * 7919 + rnd)
    if builtin is not None:  # a fixed task: every round uses the same prompts
        return RoundPlan(rnd, list(builtin), [{"path": train}] if rnd == 1 else [],
                         len(builtin) if rnd == 1 else 0, 0 if rnd == 1 else len(builtin))
    used = {f["path"] for line in manifest for f in line["new_files"]}
    files = discover(train)
    # quiet: load_prompts (the run's setup) has noted the empty files already
    new = {f: read_train_file(f, train, quiet=True) for f in files if str(f.resolve()) not in used}
    new = {f: recs for f, recs in new.items() if recs}  # an empty file is not used yet
    new_recs = [r for recs in new.values() for r in recs]
    old_recs = [r for f in files if str(f.resolve()) in used
                for r in read_train_file(f, train, quiet=True)]
    if new_recs and old_recs and replay_frac > 0:
        k = min(len(old_recs), round(len(new_recs) * replay_frac / (1 - replay_frac)))
        replay = rng.sample(old_recs, k)
    else:
        replay = [] if new_recs else old_recs
    entries = [{"path": str(f.resolve()), "bytes": f.stat().st_size, "sha256": _sha256(f)}
               for f in new]
    return RoundPlan(rnd, new_recs + replay, entries, len(new_recs), len(replay))


def pool_from_manifest(line: dict, train: str, builtin: list[PromptRecord] | None = None):
    """Rebuild a round's pool from its manifest line (for --resume): the same prompts, in
    the same order; prompts no longer there are a ResumeError rather than a silent different
    run (read_manifest has already named a changed file; this catches the rest, e.g. a builtin
    task's settings changed)."""
    if builtin is not None:
        by_id = {prompt_id(r): r for r in builtin}
    else:
        by_id = {prompt_id(r): r for f in discover(train)
                 for r in read_train_file(f, train, quiet=True)}
    missing = [i for i in line["prompt_ids"] if i not in by_id]
    if missing:
        raise ResumeError(f"resume: {len(missing)} prompts of round {line['round']} are no "
                          f"longer in {train} (a prompt file changed or was removed since the "
                          f"run began)")
    return [by_id[i] for i in line["prompt_ids"]]
