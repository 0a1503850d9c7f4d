"""`tao_fast.kernels` in a plain checkout (`PYTHONPATH=.`, no install step, as a GPU machine
without network gets the project): the kernels live in the top-level kernels/ folder (the
project's layout), so this package's search path is that folder and its __init__ runs here.

An install (`pip install .` or `-e .`) maps kernels/ to tao_fast.kernels itself (pyproject's
package-dir); a wheel never contains this file.
"""
from pathlib import Path as _Path

_src = _Path(__file__).resolve().parents[2] / "kernels"
__path__ = [str(_src)]  # noqa: F811 - the submodules (attention, linear_logprob, ...) are there
with open(_src / "__init__.py", encoding="utf-8") as _f:
    exec(compile(_f.read(), str(_src / "__init__.py"), "exec"))
del _f
