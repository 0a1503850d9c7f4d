"""A user's own scoring function, run in the sandbox that runs code and SQL candidates.

Spec: "python:module:function" (module importable from the working directory or sys.path) or
"python:path/to/file.py:function". The function is called as `f(prompt, candidates)` with the
prompt's last user message (str) and the group's responses (list[str]) and returns one float per
candidate. With `{type: python, spec: "python:...", record: true}` it is called as
`f(record, candidates)` with the whole prompt record: a dict of the prompt line's fields
("messages", every other key of the line: a test list, a database, a rubric, a task tag) and
"prompt", the last user message. Either form may return, per candidate, a float or a dict
{"reward": float, ...}: the dict's other keys are that candidate's details (in eval_*.json
and the report). If the function raises on a prompt, that prompt's candidates get
`failure_value` and the error is kept in their details; if the whole call dies (timeout,
memory, a crash), every candidate of the batch does. The user's code is never imported into
the trainer's process.

The function runs in one persistent child of tao_fast/scoring/sandbox.py (a sandbox.Worker)
per scorer object: the construction-time import check starts it and imports the module, then
each batch is one request to the same process, so the module is imported once and its
module-level state (caches, counters, loaded models) survives from batch to batch. A batch that
does not end cleanly (past scoring.timeout_s, the function exiting or crashing the process,
an output flood, the memory limit hit: a MemoryError) fails its candidates as above and costs
the child: its whole process group is killed and the next batch starts a fresh one, which
imports the module again, with fresh state (so never count on the state being there). The
error says what happened ("timed out after N s", "worker exited with code 3", "... signal 11
(SIGSEGV)"). `close()` stops the child; so do garbage collection and interpreter exit.

Every layer of the sandbox holds (its docstring says what each covers): network, pid and mount
namespaces where the kernel allows them; uid nobody when the trainer is root; the audit hook
refusing subprocesses, signals, sockets and writes outside the child's work directory; the
stripped environment. Per batch: the wall clock (scoring.timeout_s; for the first, the start
and import too) and CPU time (timeout_s + 1 s, re-armed before each batch; the child is
restarted when its total nears 10 batches' worth). Per child, for its whole life: the address
space (scoring.memory_mb: the module's state counts too), file size, process and open-file
limits, and the work directory, which is kept from batch to batch. When a child ends, the
whole process group is killed (and, in a pid namespace, everything the function started dies
with it); a reply the function gave is kept even if something it started still holds the
output pipe.

What the function can still do, and what differs from calling it in the trainer:
- Read: its module is imported where it lies, with the trainer's working directory as its
  cwd (relative reads work as in the trainer); sys.path is the trainer's. As root, where uid
  nobody cannot list that module's directory or the cwd (or enter a directory above them, or
  the interpreter's), the child keeps CAP_DAC_READ_SEARCH: it can then READ any file on the
  machine, never write one. Reading is NOT sandboxed beyond that.
- Write: only under its work directory ($TMPDIR and $HOME point there; a tmpfs of 64 MB where
  the mount namespace is allowed, else a directory the child is restarted for once it holds
  over 64 MB), files of at most 16 MB each. It lasts as long as the child. Writes to its cwd
  are refused.
- No network (a scorer that calls a web API does not work here), no subprocesses, no signals
  to other processes, no ctypes. The environment is PATH, HOME, TMPDIR, LANG and one BLAS/OpenMP
  thread: the trainer's variables (tokens, keys) are not passed.
- The audit hook is not a boundary against a C extension the module loads: such code can fork
  or open sockets; then the namespaces, uid nobody and the rlimits are what hold.
"""
from __future__ import annotations

import os
import sys

from tao_fast.scoring import sandbox
from tao_fast.scoring.base import ScoreResult, Scorer, failed_batch
from tao_fast.scoring.sandbox_worker import call_user


def source_dirs(target: str, cwd: str) -> list[str]:
    """The directories the user's code is read from: cwd, and the file's directory or where
    the top-level module lies on the path (found on disk, nothing imported); all of sys.path
    where it is not found there (a module that an import hook provides)."""
    from importlib.machinery import PathFinder

    if target.endswith(".py"):
        return [cwd, os.path.dirname(os.path.join(cwd, target))]
    spec = PathFinder.find_spec(target.split(".")[0], [cwd, *sys.path])
    if spec is None or not spec.origin or not os.path.isfile(spec.origin):
        return [cwd, *[p for p in sys.path if os.path.isdir(p)]]
    return [cwd, os.path.dirname(spec.origin)]


class PythonFunctionScorer(Scorer):
    def __init__(self, spec: str, *, record: bool = False, failure_value: float = 0.0,
                 timeout_s: float = 60.0, memory_mb: int = 2048):
        parts = spec.split(":")
        if len(parts) != 3 or parts[0] != "python" or not parts[1] or not parts[2]:
            raise ValueError(f"scorer {spec!r}: expected 'python:module:function' or "
                             f"'python:path/to/file.py:function'")
        self.name = spec
        self.target, self.func = parts[1], parts[2]
        self.record = bool(record)  # f(record dict, candidates) instead of f(prompt text, ...)
        self.failure_value = failure_value
        self.timeout_s, self.memory_mb = timeout_s, memory_mb
        self._worker = sandbox.Worker(call_user, timeout_s=timeout_s, memory_mb=memory_mb,
                                      site_packages=True,
                                      read_dirs=source_dirs(self.target, os.getcwd()))
        try:  # the worker's first start imports the function, before any generation
            self._run({"check": True})
        except BaseException:
            self._worker.close()
            raise

    def close(self) -> None:
        """Stop the sandboxed child now (garbage collection and interpreter exit also do);
        a later batch would start a fresh one."""
        self._worker.close()

    def _run(self, payload: dict) -> dict:
        """One call of the persistent worker -> its reply; RuntimeError when the call died
        (the child is then gone), ValueError when the function cannot be loaded."""
        cwd = os.getcwd()
        payload = {**payload, "target": self.target, "func": self.func, "cwd": cwd,
                   "path": [cwd, *sys.path]}
        res = self._worker.call(payload)
        reply = next((m for m in res.messages if isinstance(m, dict)
                      and m.keys() & {"ok", "results", "fatal"}), None)
        if reply is None:
            raise RuntimeError(f"{self.name}: {self._death(res)}")
        if "fatal" in reply:
            raise ValueError(f"{self.name}: {reply['fatal']}")
        return reply

    def _death(self, res: sandbox.SandboxResult) -> str:
        """Why a call gave no reply, in words."""
        if res.timed_out:
            return f"timed out after {self.timeout_s:g} s"
        if res.flooded:
            return "worker killed: its output went over the sandbox's cap"
        if res.error is not None:  # the worker itself raised, or the sandbox did not start
            return res.error if not res.started else f"worker failed: {res.error}"
        if not res.done:
            tail = " | ".join(res.stderr.strip().splitlines()[-3:])
            return f"worker exited with {sandbox.describe_exit(res.exit_code)}: " \
                   f"{tail or 'no output'}"
        return "worker gave no reply"

    def score(self, prompts, candidates) -> ScoreResult:
        try:
            out = self._run({"items": [{"prompt": self._arg(p), "candidates": list(c)}
                                       for p, c in zip(prompts, candidates)]})
        except (RuntimeError, ValueError) as e:
            return failed_batch(self.name, candidates, self.failure_value, str(e))
        rewards, details, failures = [], [], 0
        for res, group in zip(out["results"], candidates):
            if "error" in res:
                failures += len(group)
                rewards.append([self.failure_value] * len(group))
                details.append([{"error": res["error"]} for _ in group])
            else:
                rewards.append(res["rewards"])
                details.append(res.get("details") or [{} for _ in group])
        if any(r.get("error", "").startswith("MemoryError") for r in out["results"]):
            # the module's state may be what holds the memory (a cache that grew): in a fresh
            # child the next batch gets the whole memory_mb again instead of failing the same way
            self._worker.close()
        return ScoreResult(rewards, details, {self.name: failures} if failures else {})

    def _arg(self, rec):
        """What the function gets as its first argument: the prompt's text, or (record=True)
        the record's fields as a dict."""
        if not self.record:
            return rec.text
        return {**rec.meta, "messages": [dict(m) for m in rec.messages], "prompt": rec.text}
