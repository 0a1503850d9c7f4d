"""The bench scripts as modules for the tests: bench/ is not a package, so each is loaded from
its file (with bench/ on sys.path, for their `from harness import ...`)."""
import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def load(name: str):
    """bench/<name>.py as module `name` (registered in sys.modules: dataclasses look their
    module up there)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod
