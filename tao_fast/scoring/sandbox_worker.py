"""What runs inside the sandbox (tao_fast/scoring/sandbox.py) for PythonFunctionScorer: import
the user's function and call it on every item of the batch.

`call_user` is a sandbox worker: its source alone is sent to the child, so it imports only the
standard library, inside its body. Payload: {"target", "func", "cwd", "path", "check"?: true,
"items"?: [{"prompt", "candidates"}]}. It emits one reply: {"ok": true} for a check,
{"results": [{"rewards": [...], "details"?: [{...}]} | {"error": "..."}]} for items (details
where the function returned {"reward": x, ...} dicts), or {"fatal": "..."} when the function
cannot be loaded.

In a persistent sandbox.Worker it is called again in the same process for every batch: the
function it loaded is kept on it (`call_user.loaded`), so the user's module is imported once
per child and its module-level state lives as long as the child does.
"""
from __future__ import annotations


def call_user(payload, emit):
    """Load payload's target:func (a module found on payload["path"], or a .py file relative
    to payload["cwd"]) with cwd as the working directory, unless an earlier call in this
    process loaded it, and emit the reply."""
    import importlib
    import importlib.util
    import json
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

    def reward_of(x):  # a float, or {"reward": float, ...details}
        if isinstance(x, dict):
            if "reward" not in x:
                raise ValueError(f"returned a dict without 'reward': {sorted(x)}")
            return float(x["reward"]), {k: v for k, v in x.items() if k != "reward"}
        return float(x), None

    def call(fn, item):
        out = [reward_of(x) for x in fn(item["prompt"], item["candidates"])]
        r = [x[0] for x in out]
        if len(r) != len(item["candidates"]):
            raise ValueError(f"returned {len(r)} rewards for {len(item['candidates'])} "
                             f"candidates")
        if not all(math.isfinite(x) for x in r):
            raise ValueError(f"returned a non-finite reward: {r}")
        if all(d is None for _, d in out):
            return {"rewards": r}
        details = [d or {} for _, d in out]
        json.dumps(details)  # details must travel as JSON: a TypeError fails this prompt
        return {"rewards": r, "details": details}

    loaded = call_user.__dict__.setdefault("loaded", {})  # kept while the process lives
    key = (payload["target"], payload["func"])
    try:
        fn = loaded[key] if key in loaded else load(*key)
    except Exception as e:  # noqa: BLE001 - reported to the parent; the next call retries
        emit({"fatal": f"cannot load: {type(e).__name__}: {e}"[:2000]})
        return
    loaded[key] = fn
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
