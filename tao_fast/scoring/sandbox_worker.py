"""Child process of PythonFunctionScorer: reads one JSON request on stdin, writes one JSON line.

Request: {"target", "func", "cwd", "check"?: true, "items"?: [{"prompt", "candidates"}]}.
Reply: {"ok": true} for a check, {"results": [{"rewards": [...]} | {"error": "..."}]} for items,
or {"fatal": "..."} when the function cannot be loaded. Runs under the parent's rlimits.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import math
import sys
import traceback


def load(target: str, func: str, cwd: str):
    if target.endswith(".py"):
        import os

        path = target if os.path.isabs(target) else os.path.join(cwd, target)
        if not os.path.exists(path):
            raise ImportError(f"file {path} does not exist")
        spec = importlib.util.spec_from_file_location("tao_user_scorer", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    else:
        sys.path.insert(0, cwd)
        mod = importlib.import_module(target)
    fn = getattr(mod, func, None)
    if not callable(fn):
        raise ImportError(f"{target} has no callable {func!r}")
    return fn


def main():
    req = json.loads(sys.stdin.read())
    real_stdout, sys.stdout = sys.stdout, sys.stderr  # user prints must not corrupt the reply
    try:
        fn = load(req["target"], req["func"], req["cwd"])
    except Exception as e:  # noqa: BLE001 - reported to the parent
        real_stdout.write(json.dumps({"fatal": f"cannot load: {type(e).__name__}: {e}"}) + "\n")
        return
    if req.get("check"):
        real_stdout.write(json.dumps({"ok": True}) + "\n")
        return
    results = []
    for item in req["items"]:
        try:
            r = [float(x) for x in fn(item["prompt"], item["candidates"])]
            if len(r) != len(item["candidates"]):
                raise ValueError(f"returned {len(r)} rewards for {len(item['candidates'])} "
                                 f"candidates")
            if not all(math.isfinite(x) for x in r):
                raise ValueError(f"returned a non-finite reward: {r}")
            results.append({"rewards": r})
        except Exception as e:  # noqa: BLE001 - recorded on the candidates
            tb = traceback.format_exception_only(type(e), e)[-1].strip()
            results.append({"error": tb})
    real_stdout.write(json.dumps({"results": results}) + "\n")


if __name__ == "__main__":
    main()
