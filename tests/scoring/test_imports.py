"""tao_fast.scoring has no import cycle: every `import` statement of its modules (at module level
or inside a function) makes an edge of a graph that must be acyclic, no module imports the
package `__init__` (which only re-exports), and each module imports first in a fresh
interpreter. build_scorer reaches a scorer's module by name (build.SCORER_TYPES) only when a
spec asks for that type, after every module has loaded; that lookup is no import statement."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

import tao_fast.scoring

PACKAGE = "tao_fast.scoring"
ROOT = Path(tao_fast.scoring.__file__).parent
MODULES = sorted(f"{PACKAGE}.{p.stem}" for p in ROOT.glob("*.py") if p.stem != "__init__")


def _module_of(name: str) -> str | None:
    """`name` if it is tao_fast.scoring or one of its modules, else None."""
    return name if name == PACKAGE or name in MODULES else None


def _imports_in(source: str, where: str = "<source>") -> set[str]:
    """The scoring modules that the import statements of `source` name (anywhere in it)."""
    out = set()
    for node in ast.walk(ast.parse(source, where)):
        if isinstance(node, ast.Import):
            out |= {_module_of(a.name) for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package the file is in
                parts = PACKAGE.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            for a in node.names:  # `from pkg import mod` imports the module
                out.add(_module_of(f"{base}.{a.name}") or _module_of(base))
    out.discard(None)
    return out


def _imports(module: str) -> set[str]:
    """The scoring modules `module` imports (itself left out)."""
    path = ROOT / ("__init__.py" if module == PACKAGE else f"{module.rsplit('.', 1)[1]}.py")
    return _imports_in(path.read_text(), str(path)) - {module}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` (as a path that ends where it starts), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m):
        state[m] = 1
        path.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        state[m] = 2
        path.pop()
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_cycle_finder_finds_cycles():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_walker_sees_imports_inside_functions():
    """Every import statement counts, not only module-level ones: the old extract.py imported
    rules inside extract_answer while rules imported extract, and that is a cycle here."""
    old_extract = ("import json\n\ndef extract_answer(text, spec):\n"
                   "    from tao_fast.scoring.rules import parse_json_candidate\n")
    old_rules = ("from tao_fast.scoring import score_each\n"
                 "from tao_fast.scoring.extract import extract_answer, parse_fraction\n")
    extract, rules = f"{PACKAGE}.extract", f"{PACKAGE}.rules"
    assert _imports_in(old_extract) == {rules}
    assert _imports_in(old_rules) == {PACKAGE, extract}
    assert _cycle({extract: _imports_in(old_extract), rules: _imports_in(old_rules)}) == \
        [extract, rules, extract]
    assert _imports_in("from . import sandbox\nfrom .base import Scorer\n") == \
        {f"{PACKAGE}.sandbox", f"{PACKAGE}.base"}
    assert f"{PACKAGE}.sandbox" in _imports(f"{PACKAGE}.code_exec")


def test_no_import_cycle_in_scoring():
    graph = {m: _imports(m) for m in [PACKAGE, *MODULES]}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))
    into_init = sorted(m for m in MODULES if PACKAGE in graph[m])
    assert not into_init, f"import from the package __init__ (use scoring.base): {into_init}"


@pytest.mark.parametrize("module", MODULES)
def test_each_module_imports_first_in_a_fresh_interpreter(module):
    out = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
