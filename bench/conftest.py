"""pytest configuration for bench/: `pytest bench/ --benchmark-only` from the repository root.

The micro-benchmarks live in bench_*.py files (not test_*.py, so that the project's plain
`pytest`, whose testpaths is ["tests"], never runs them, and a `pytest tests/` run never picks
them up by name). This conftest collects them when bench/ is named on the command line, and
puts bench/ on sys.path so that they can import helpers from the GPU scripts
(`from gpu_attention import ...`) whatever pytest's import mode is.
"""
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

try:  # as in tests/conftest.py: the Triton interpreter's tl.dot runs on numpy's BLAS, and a
    # spinning 2-thread BLAS on a loaded 2-core machine is orders of magnitude slower
    from threadpoolctl import threadpool_limits

    threadpool_limits(1, user_api="blas")
except ImportError:
    pass


def pytest_collect_file(file_path, parent):
    """Collect bench/bench_*.py as test modules (their benchmarks are test_* functions)."""
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and not parent.session.isinitpath(file_path)):  # a named file: pytest collects it
        return pytest.Module.from_parent(parent, path=file_path)
    return None
