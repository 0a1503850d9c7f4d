"""Which prompts each round trains on: the new ones since the last round, plus a replayed share.

`data.train` is a JSONL prompt file, a directory of them (e.g. one `tao-fast ingest` output per
week of request logs: files named heldout*.jsonl are skipped), or builtin:arithmetic. At the
start of every round the directory is scanned again; files no earlier round used are the new
data. The round's pool is every new prompt plus old prompts drawn (seeded) so that they make up
`data.replay_frac` of the pool; a round with no new file replays the old prompts alone.

The run's manifest.jsonl gets one line per round: the files read (with size and sha256), how
many prompts were new and replayed, and every prompt's id, so a run is auditable and a resumed
run rebuilds exactly the pool it was using.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

from tao_fast.data.prompts import PromptRecord, read_jsonl


def prompt_id(rec: PromptRecord) -> str:
    """Stable id of a prompt: a hash of its messages (what the model sees)."""
    blob = json.dumps(rec.messages, sort_keys=True, ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def discover(train: str) -> list[Path]:
    """The prompt files behind data.train, in a stable order."""
    p = Path(train)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*.jsonl") if not f.name.startswith("heldout"))
        if not files:
            raise FileNotFoundError(f"data.train: directory {p} holds no *.jsonl prompt files")
        return files
    if not p.exists():
        raise FileNotFoundError(f"prompt file {p} does not exist")
    return [p]


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

    def manifest_line(self) -> dict:
        return {"round": self.round, "new_files": self.new_files, "n_new": self.n_new,
                "n_replay": self.n_replay, "prompt_ids": [prompt_id(r) for r in self.prompts]}


def read_manifest(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "manifest.jsonl"
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def plan_round(rnd: int, train: str, manifest: list[dict], replay_frac: float, seed: int,
               builtin: list[PromptRecord] | None = None) -> RoundPlan:
    """The pool of round `rnd` given the manifest of the rounds before it."""
    rng = random.Random(seed * 7919 + rnd)
    if builtin is not None:  # a fixed task: every round uses the same prompts
        return RoundPlan(rnd, list(builtin), [{"path": train}] if rnd == 1 else [],
                         len(builtin) if rnd == 1 else 0, 0 if rnd == 1 else len(builtin))
    used = {f["path"] for line in manifest for f in line["new_files"]}
    files = discover(train)
    new = [f for f in files if str(f.resolve()) not in used]
    old = [f for f in files if str(f.resolve()) in used]
    new_recs = [r for f in new for r in read_jsonl(f)]
    old_recs = [r for f in old for r in read_jsonl(f)]
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
    the same order; a file changed since is an error rather than a silent different run."""
    if builtin is not None:
        by_id = {prompt_id(r): r for r in builtin}
    else:
        by_id = {prompt_id(r): r for f in discover(train) for r in read_jsonl(f)}
    missing = [i for i in line["prompt_ids"] if i not in by_id]
    if missing:
        raise ValueError(f"resume: {len(missing)} prompts of round {line['round']} are no longer "
                         f"in {train} (a prompt file changed or was removed since the run began)")
    return [by_id[i] for i in line["prompt_ids"]]
