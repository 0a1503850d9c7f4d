"""Code execution verifier (spec type "code"): run each candidate's Python against tests, sandboxed.

    {"type": "code"}                                 tests from each record's "tests" field
    {"type": "code", "tests": "tests/add.py", "reward": "all"}

The tests of a prompt come from its record's `tests_field` (default "tests"), else from the
`tests` file (relative to base_dir; checked at construction). Either a string of Python, in which
every top-level `assert` is one test, every top-level `def test_*()` is one test (called after the
file ran) and any other statement is set-up, or a list of strings, each one test. Reward: the
fraction of tests passed, or with reward="all" 1 only when every test passes.

The code is the last ```python (or ```py, else bare ```) fenced block of the response, else the
whole response. Every candidate runs in its own sandbox (tao_fast.scoring.sandbox: no network,
uid nobody, rlimits, an audit-hook guard; see there for what each layer covers), a few at a time.
A candidate that hangs, crashes or exhausts memory simply fails the tests it had not passed yet:
that is a low score, not a scorer failure. Failures (failure_value, counted) are the scorer's own:
a prompt without tests, tests that do not parse, a sandbox that cannot start.

Options: timeout_s (wall clock per candidate), memory_mb (its address space), name (metrics
prefix), site_packages (let candidates import installed packages; default: standard library only).
Details per candidate: passed, total, first_error (a failed test, the candidate's own crash, or
"timed out"), timed_out. The candidate runs as module `__candidate__` (its `if __name__ ==
"__main__":` block does not run), with an empty stdin; its prints are discarded.

Limits: the tests run in the candidate's own process, so a candidate written to attack the harness
(patching builtins, objects equal to everything, walking frames) can fake passes; the sandbox keeps
the machine safe, not the reward honest. `check(prompts)` fails early (ConfigError) on a prompt
without usable tests.
"""
from __future__ import annotations

import ast
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import tao_fast.scoring.sandbox as sandbox
from tao_fast.config import ConfigError
from tao_fast.scoring.base import ScoreResult, Scorer

_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)


def last_fence(text: str, langs: tuple[str, ...]) -> str:
    """The last fenced block tagged with one of `langs`, else the last untagged one, else text."""
    blocks = [(lang.lower(), body) for lang, body in _FENCE.findall(text)]
    for wanted in (langs, ("",)):
        bodies = [body for lang, body in blocks if lang in wanted]
        if bodies:
            return bodies[-1]
    return text


def split_tests(tests, where: str = "tests") -> list[tuple[str, bool]]:
    """Tests as [(python source, is_test)] in run order. ValueError when none or a syntax error."""
    if isinstance(tests, (list, tuple)):
        steps = [(str(t), True) for t in tests]
        for i, (src, _) in enumerate(steps):
            try:
                compile(src, f"{where}[{i}]", "exec")
            except SyntaxError as e:
                raise ValueError(f"{where}[{i}]: {e}") from None
    elif isinstance(tests, str):
        try:
            tree = ast.parse(tests, where)
        except SyntaxError as e:
            raise ValueError(f"{where}: {e}") from None
        steps, calls = [], []
        for node in tree.body:
            steps.append((ast.unparse(node), isinstance(node, ast.Assert)))
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                calls.append((f"{node.name}()", True))
        steps += calls
    else:
        raise TypeError(f"{where}: expected a string of Python or a list of strings, "
                         f"got {type(tests).__name__}")
    if not any(is_test for _, is_test in steps):
        raise ValueError(f"{where}: no tests (top-level asserts or test_* functions)")
    return steps


def _run_candidate(payload, emit):
    """Sandbox worker: the candidate's code, then the test steps in order; one message per test."""
    import traceback

    def line(e):
        return traceback.format_exception_only(type(e), e)[-1].strip()[:300]

    ns = {"__name__": "__candidate__"}
    try:
        exec(compile(payload["code"], "<candidate>", "exec"), ns)  # noqa: S102 - sandboxed
    except SyntaxError as e:
        emit({"err": f"candidate: {line(e)}"})
        return
    except BaseException as e:  # noqa: BLE001 - what it defined before failing may still pass
        emit({"err": f"candidate: {line(e)}"})
    for src, is_test in payload["steps"]:
        try:
            exec(compile(src, "<test>", "exec"), ns)  # noqa: S102 - sandboxed
            err = None
        except BaseException as e:  # noqa: BLE001 - SystemExit and friends fail the test too
            err = f"{src.splitlines()[0][:120]}: {line(e)}"
        if is_test:
            emit({"ok": err is None, "err": err})
        elif err:
            emit({"err": err})


def pool_size() -> int:
    """Sandboxes run at once: 2 to 4, about half the cores."""
    return min(4, max(2, (os.cpu_count() or 2) // 2))


class CodeExecScorer(Scorer):
    def __init__(self, *, tests_field: str = "tests", tests: str = "", reward: str = "fraction",
                 name: str = "code", site_packages: bool = False, timeout_s: float = 10.0,
                 memory_mb: int = 1024, failure_value: float = 0.0, base_dir="."):
        if reward not in ("fraction", "all"):
            raise ValueError(f"reward must be 'fraction' or 'all', got {reward!r}")
        if not timeout_s > 0 or not memory_mb > 0:
            raise ValueError(f"timeout_s and memory_mb must be > 0 (got {timeout_s}, {memory_mb})")
        self.name, self.tests_field, self.reward = name, tests_field, reward
        self.timeout_s, self.memory_mb = float(timeout_s), int(memory_mb)
        self.failure_value, self.site_packages = failure_value, site_packages
        self.default_steps = None
        if tests:
            path = Path(base_dir) / tests
            if not path.is_file():
                raise FileNotFoundError(f"tests file {path} does not exist")
            self.default_steps = split_tests(path.read_text(encoding="utf-8"), str(path))

    def _steps(self, rec, i: int):
        tests = rec.meta.get(self.tests_field)
        if tests is None or tests == "" or tests == []:
            if self.default_steps is None:
                raise ValueError(f"prompt {i} has no {self.tests_field!r} field and no tests "
                                 f"file is configured")
            return self.default_steps
        return split_tests(tests, f"prompt {i} {self.tests_field!r}")

    def check(self, prompts):
        """ConfigError naming the first prompt with no tests (none of its own, no tests file) or
        with tests that do not parse."""
        for i, rec in enumerate(prompts):
            try:
                self._steps(rec, i)
            except (ValueError, TypeError) as e:
                raise ConfigError(f"{self.name}: {e}") from None

    def run_one(self, text: str, steps) -> dict:
        """Details of one candidate: passed, total, first_error, timed_out (+ error on failure)."""
        total = sum(is_test for _, is_test in steps)
        code = last_fence(text, ("python", "py", "python3"))
        try:
            res = sandbox.run(_run_candidate, {"code": code, "steps": steps},
                              timeout_s=self.timeout_s, memory_mb=self.memory_mb,
                              site_packages=self.site_packages)
        except Exception as e:  # noqa: BLE001 - e.g. no temp dir: the scorer failed, not the code
            return {"error": f"sandbox: {type(e).__name__}: {e}", "passed": 0, "total": total}
        if not res.started or res.error:
            return {"error": res.error, "passed": 0, "total": total}
        oks = [m["ok"] for m in res.messages if "ok" in m]
        errs = [m["err"] for m in res.messages if m.get("err")]
        if res.timed_out:
            errs.append(f"timed out after {self.timeout_s:g} s")
        elif not res.done:
            errs.append("killed: output flood" if res.flooded
                        else f"crashed (exit {res.returncode})")
        return {"passed": sum(oks), "total": total, "first_error": errs[0] if errs else None,
                "timed_out": res.timed_out}

    def score(self, prompts, candidates) -> ScoreResult:
        rewards = [[self.failure_value] * len(g) for g in candidates]
        details = [[{} for _ in g] for g in candidates]
        jobs = []
        for i, (rec, group) in enumerate(zip(prompts, candidates, strict=True)):
            try:
                steps = self._steps(rec, i)
            except (ValueError, TypeError) as e:
                details[i] = [{"error": str(e)} for _ in group]
                continue
            jobs += [(i, j, text, steps) for j, text in enumerate(group)]
        with ThreadPoolExecutor(pool_size()) as pool:
            outs = pool.map(lambda job: self.run_one(job[2], job[3]), jobs)
            for (i, j, _, _), d in zip(jobs, outs):
                details[i][j] = d
                if "error" not in d:
                    frac = d["passed"] / d["total"]
                    rewards[i][j] = frac if self.reward == "fraction" else float(frac == 1.0)
        failed = sum("error" in d for g in details for d in g)
        n = sum(map(len, candidates))
        passed = sum(d.get("passed", 0) for g in details for d in g)
        total = sum(d.get("total", 0) for g in details for d in g)
        stats = {f"{self.name}/pass_rate": passed / total if total else 0.0,
                 f"{self.name}/all_pass_rate": sum(
                     d.get("total", 0) > 0 and d.get("passed") == d.get("total")
                     for g in details for d in g) / n if n else 0.0}
        return ScoreResult(rewards, details, {self.name: failed} if failed else {}, stats)
