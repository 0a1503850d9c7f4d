"""`tao-fast tune --follow LOGDIR`: rounds that start when new traffic has arrived.

LOGDIR is a request-log directory as `tao-fast serve` writes it: `active-<pid>.jsonl`, the file
being appended (never read), and completed files `requests-<UTC>-<seq>.jsonl.gz`, each put in
place at once (os.replace). A round reads completed files only: `requests-*.jsonl` and
`requests-*.jsonl.gz` directly in LOGDIR (not in its subdirectories). Nothing else there is
read, since nothing else is known to be complete: to feed other logs, move them in under such
a name (mv / os.replace within one filesystem, so they appear whole).

Round r begins when the completed files that no earlier round read hold at least
data.min_new_prompts new training prompts, counted after `tao-fast ingest`'s cleaning, near-dup
removal and stable held-out split (tao_fast/data/ingest.py), de-duplicated against every
earlier round's prompts, training and held-out, exact and near duplicates alike ("seen in an
earlier round" in the round's summary). Until then the recipe polls LOGDIR every
data.follow_poll_s seconds, ingests again only when a new file has appeared, and logs how many
new prompts there are out of how many it needs; data.follow_max_wait_s bounds the wait (then
the run ends after the rounds done; before the first, it is an error). The ingest is written to
RUN_DIR/.follow-staging/ and renamed to RUN_DIR/follow/round-NNN/ (train.jsonl, heldout.jsonl,
ingest_summary.json) once enough prompts are in. data.train is RUN_DIR/follow, so the rounds
machinery (tao_fast/data/rounds.py) takes round-NNN/train.jsonl as the round's new file (with
data.replay_frac of old prompts) and manifest.jsonl records it with its sha256. The log files a
round read are its ingest_summary.json's `files`: a resumed run (`--resume RUN_DIR`; its
config carries data.follow) never reads them again, and uses a round directory already there
as it is. The first round is waited for before any model loads; data.follow_rounds (0: until
SIGTERM / SIGINT) replaces run.rounds.

Held-out prompts: unless data.eval names a file, every evaluation (before, after each round,
after) uses the first round's heldout.jsonl, a fixed set. The union of every round's held-out
prompts so far would grow the set, but each round's figure would then be on other questions
than the one before it and than eval_before's: a round's gain could not be told apart from a
change of questions. The later rounds' heldout.jsonl files are written all the same, and their
prompts are never trained on (the split is a hash of the prompt, and each round drops what an
earlier one holds): `tao-fast eval --prompts RUN_DIR/follow/round-NNN/heldout.jsonl` measures
a checkpoint on the newest traffic. With ingest's 10% held out, the first round's set is small
(about data.min_new_prompts / 9 prompts): give data.eval for a larger fixed set.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

from tao_fast.config import ConfigError, DataConfig, TaoConfig
from tao_fast.data.ingest import IngestError, ingest
from tao_fast.data.prompts import PromptFileError, PromptRecord, read_records
from tao_fast.fileio import atomic_write_lines
from tao_fast.stop import RunStopped, StopRequest

LOG_PATTERNS = ("requests-*.jsonl", "requests-*.jsonl.gz")  # tao-fast serve's completed logs
ROUNDS_DIR = "follow"  # RUN_DIR/follow/round-NNN/: data.train of a follow run
STAGING = ".follow-staging"  # RUN_DIR/.follow-staging/: a round's ingest before it is complete


class FollowTimeout(PromptFileError):
    """data.follow_max_wait_s passed before the first round's prompts arrived."""


def follow_config(cfg: TaoConfig, run_dir: Path) -> TaoConfig:
    """cfg with data.follow made absolute and data.train set to RUN_DIR/follow; a ConfigError
    when data.train names other prompts or run.rounds is set (data.follow_rounds counts)."""
    data, rounds_dir = cfg.data, str(Path(run_dir) / ROUNDS_DIR)
    default = DataConfig().train
    if data.train not in (default, rounds_dir) and not (
            isinstance(data.train, str) and Path(data.train).name == ROUNDS_DIR):
        raise ConfigError(f"data.train: {data.train!r} with data.follow: a follow run trains on "
                          f"the rounds it ingests from {data.follow} (RUN_DIR/{ROUNDS_DIR}); "
                          f"leave data.train unset")
    if cfg.run.rounds != 1:
        raise ConfigError(f"run.rounds: {cfg.run.rounds} with data.follow: a follow run's "
                          f"rounds are data.follow_rounds (0 = until stopped); leave run.rounds "
                          f"at 1")
    data = dataclasses.replace(data, train=rounds_dir,
                               follow=str(Path(data.follow).expanduser().resolve()))
    return dataclasses.replace(cfg, data=data)


def check_logdir(logdir: str) -> Path:
    """LOGDIR as a readable directory, else a one-line error naming data.follow."""
    p = Path(logdir)
    if not p.exists():
        raise ConfigError(f"data.follow: log directory {p} does not exist")
    if not p.is_dir():
        raise ConfigError(f"data.follow: {p} is not a directory (tao-fast serve's log "
                          f"directory: requests-*.jsonl.gz files)")
    try:
        next(os.scandir(p), None)
    except OSError as e:
        raise ConfigError(f"data.follow: cannot read {p} ({e.strerror})") from None
    return p


def completed_logs(logdir: Path) -> list[Path]:
    """LOGDIR's completed request logs, by name (serve's names sort by time)."""
    return sorted({f for pat in LOG_PATTERNS for f in logdir.glob(pat) if f.is_file()})


def round_dirs(run_dir: Path) -> list[Path]:
    """The rounds' directories written so far, in order."""
    return sorted(d for d in (Path(run_dir) / ROUNDS_DIR).glob("round-*") if d.is_dir())


def logs_read(run_dir: Path) -> set[str]:
    """The log files (resolved paths) that the rounds so far ingested."""
    out = set()
    for d in round_dirs(run_dir):
        summary = d / "ingest_summary.json"
        try:
            files = json.loads(summary.read_text())["files"]
        except (OSError, ValueError, KeyError) as e:
            raise PromptFileError(f"{summary}: unreadable ({e}): which log files that round read "
                                  f"is not known") from None
        out.update(str(Path(f["path"]).resolve()) for f in files)
    return out


def held_out(run_dir: Path) -> list[PromptRecord]:
    """The first round's held-out prompts: every evaluation's fixed set (module docstring)."""
    dirs = round_dirs(run_dir)
    path = dirs[0] / "heldout.jsonl" if dirs else None
    return read_records(path) if path is not None and path.exists() else []


class Follower:
    """Waits for a round's traffic in LOGDIR and ingests it into RUN_DIR/follow/round-NNN."""

    def __init__(self, data: DataConfig, run_dir: Path, stop: StopRequest, log):
        self.logdir = check_logdir(data.follow)
        self.data, self.run_dir, self.stop, self.log = data, Path(run_dir), stop, log

    def round_dir(self, rnd: int) -> Path:
        return self.run_dir / ROUNDS_DIR / f"round-{rnd:03d}"

    def await_round(self, rnd: int) -> bool:
        """Round `rnd`'s prompts in its directory: there already, or waited for and ingested.
        False when data.follow_max_wait_s passed first; RunStopped on SIGTERM / SIGINT."""
        out = self.round_dir(rnd)
        if out.is_dir():
            return True
        staging, need = self.run_dir / STAGING, self.data.min_new_prompts
        read, seen = logs_read(self.run_dir), self.seen_files()
        t0, files, have = time.monotonic(), None, -1
        self.log(f"[tao-fast] round {rnd}: waiting for {need} new prompts in {self.logdir} "
                 f"(polling every {self.data.follow_poll_s:g} s)")
        while True:
            pending = [f for f in completed_logs(self.logdir) if str(f.resolve()) not in read]
            if pending != files:
                files, n = pending, self.ingest(pending, staging, seen)
                if n >= need:
                    break
                if n != have:
                    self.log(f"[tao-fast] round {rnd}: {n}/{need} new prompts so far "
                             f"({len(pending)} new log file(s))")
                have = n
            waited = time.monotonic() - t0
            if self.data.follow_max_wait_s and waited >= self.data.follow_max_wait_s:
                self.log(f"[tao-fast] round {rnd}: {max(have, 0)}/{need} new prompts after "
                         f"{waited:.0f} s (data.follow_max_wait_s): no more rounds")
                return False
            if self.stop.sleep(self.data.follow_poll_s):
                raise RunStopped(f"stopped by {self.stop.name} while round {rnd} waited for "
                                 f"traffic ({max(have, 0)}/{need} new prompts); `tao-fast tune "
                                 f"--resume {self.run_dir}` goes on following {self.logdir}")
        self.commit(staging, out)
        self.log(f"[tao-fast] round {rnd}: {n} new prompts from {len(files)} log file(s) -> {out}")
        return True

    def seen_files(self) -> list[Path]:
        """The earlier rounds' prompt files, training and held-out: a new round drops them."""
        return [f for d in round_dirs(self.run_dir) for f in (d / "train.jsonl",
                                                              d / "heldout.jsonl") if f.exists()]

    def ingest(self, files: list[Path], staging: Path, seen: list[Path]) -> int:
        """Ingest `files` afresh into `staging`; returns its number of training prompts. A
        log file ingest cannot read is an IngestError naming it."""
        shutil.rmtree(staging, ignore_errors=True)
        if not files:
            return 0
        try:
            return ingest(files, staging, seen=seen).train
        except FileNotFoundError as e:  # a file removed from LOGDIR between listing and read
            raise IngestError(f"data.follow: {e}") from None

    def commit(self, staging: Path, out: Path) -> None:
        """The staged ingest becomes the round's directory (one rename); its summary names it."""
        summary = staging / "ingest_summary.json"
        s = json.loads(summary.read_text())
        s["out_dir"] = str(out)
        atomic_write_lines(summary, [json.dumps(s, indent=1)], 0o644)
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, out)
