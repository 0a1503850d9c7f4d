"""A user's own scoring function, run in a sandboxed subprocess.

Spec: "python:module:function" (module importable from the working directory or sys.path) or
"python:path/to/file.py:function". The function is called as `f(prompt, candidates)` with the
prompt's last user message (str) and the group's responses (list[str]) and returns one float per
candidate. It runs in a child process with limits on CPU time, address space and wall clock; if
the function raises on a prompt, that prompt's candidates get `failure_value` and the error is
kept in their details; if the whole child dies (timeout, memory), every candidate of the batch
does. The user's code is never imported into the trainer's process.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

from tao_fast.scoring.base import ScoreResult, Scorer, failed_batch


def _limits(cpu_s: int, mem_mb: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s))
        resource.setrlimit(resource.RLIMIT_AS, (mem_mb << 20, mem_mb << 20))
        os.setsid()
    return apply


class PythonFunctionScorer(Scorer):
    def __init__(self, spec: str, *, failure_value: float = 0.0, timeout_s: float = 60.0,
                 memory_mb: int = 2048):
        parts = spec.split(":")
        if len(parts) != 3 or parts[0] != "python" or not parts[1] or not parts[2]:
            raise ValueError(f"scorer {spec!r}: expected 'python:module:function' or "
                             f"'python:path/to/file.py:function'")
        self.name = spec
        self.target, self.func = parts[1], parts[2]
        self.failure_value = failure_value
        self.timeout_s, self.memory_mb = timeout_s, memory_mb
        self._run({"check": True})  # import it once, in the sandbox, before any generation

    def _run(self, payload: dict) -> dict:
        payload = {**payload, "target": self.target, "func": self.func, "cwd": os.getcwd()}
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "tao_fast.scoring.sandbox_worker"],
                input=json.dumps(payload), capture_output=True, text=True,
                timeout=self.timeout_s, preexec_fn=_limits(int(self.timeout_s) + 1, self.memory_mb))
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{self.name}: timed out after {self.timeout_s:.0f} s") from None
        if proc.returncode != 0 or not proc.stdout.strip():
            tail = (proc.stderr or "").strip().splitlines()[-3:]
            raise RuntimeError(f"{self.name}: worker exited with {proc.returncode}: "
                               f"{' | '.join(tail) or 'no output'}")
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        if "fatal" in out:
            raise ValueError(f"{self.name}: {out['fatal']}")
        return out

    def score(self, prompts, candidates) -> ScoreResult:
        try:
            out = self._run({"items": [{"prompt": p.text, "candidates": list(c)}
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
                details.append([{} for _ in group])
        return ScoreResult(rewards, details, {self.name: failures} if failures else {})
