"""What runs inside the sandbox (tao_fast/scoring/sandbox.py) for PythonFunctionScorer: import
the user's function and call it on every item of the batch.

`call_user` is a sandbox worker: its source alone is sent to the child, so it imports only the
standard library, inside its body. Payload: {"target", "func", "cwd", "path", "check"?: true,
"items"?: [{"prompt", "candidates"}]}. It emits one reply: {"ok": true} for a check,
{"results": [{"rewards": [...]} | {"error": "..."}]} for items, or {"fatal": "..."} when the
function cannot be loaded.
"""
from __future__ import annotations


def call_user(payload, emit):
    """Load payload's target:func (a module found on payload["path"], or a .py file relative
    to payload["cwd"]) with cwd as the working directory, and emit the reply."""
    import importlib
    import importlib.util
    import math
    import os
    import sys
    import traceback

    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")  # threads count against the sandbox's process limit
    sys.path[:0] = [p for p in payload["path"] if p not in sys.path]
    try:
        os.chdir(payload["cwd"])  # relative reads as in the trainer; writes stay refused
    except OSError:
        pass

    def load(target, func):
        if target.endswith(".py"):
            path = os.path.join(payload["cwd"], target)
            if not os.path.exists(path):
                raise ImportError(f"file {path} does not exist")
            spec = importlib.util.spec_from_file_location("tao_user_scorer", path)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
        else:
            mod = importlib.import_module(target)
        fn = getattr(mod, func, None)
        if not callable(fn):
            raise ImportError(f"{target} has no callable {func!r}")
        return fn

    def call(fn, item):
        r = [float(x) for x in fn(item["prompt"], item["candidates"])]
        if len(r) != len(item["candidates"]):
            raise ValueError(f"returned {len(r)} rewards for {len(item['candidates'])} "
                             f"candidates")
        if not all(math.isfinite(x) for x in r):
            raise ValueError(f"returned a non-finite reward: {r}")
        return {"rewards": r}

    try:
        fn = load(payload["target"], payload["func"])
    except Exception as e:  # noqa: BLE001 - reported to the parent
        emit({"fatal": f"cannot load: {type(e).__name__}: {e}"[:2000]})
        return
    if payload.get("check"):
        emit({"ok": True})
        return
    results = []
    for item in payload["items"]:
        try:
            results.append(call(fn, item))
        except Exception as e:  # noqa: BLE001 - recorded on the candidates
            tb = traceback.format_exception_only(type(e), e)[-1].strip()
            results.append({"error": tb[:500]})
    emit({"results": results})
