"""Every GPU kernel variant compiles for sm_90a (H100/H200) and fits its shared memory, with the
installed Triton (3.9) and with 3.6 (what the GPU machine has), without a GPU.

tests/kernels/sm90_compile.py runs the public ops on meta tensors through Triton's own launch
path (see its docstring; the CUDA driver is the one mock). One subprocess per Triton version,
both at once, each with a fresh Triton cache (ptxas must run to report registers and spills).
Triton 3.6 is installed once into ~/.cache/tao_fast/triton-3.6.0 (pip --target, no deps) and
put first on the subprocess's PYTHONPATH. Where that install fails: a failure under CI, a skip
elsewhere. The table of shared memory, registers and spills is printed with the results.
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
if importlib.util.find_spec("triton.backends.nvidia") is None:
    pytest.skip("this triton build has no NVIDIA backend", allow_module_level=True)

import torch  # noqa: E402

from tao_fast.fileio import atomic_dir  # noqa: E402
from tao_fast.kernels import attention, linear_logprob, pg_loss  # noqa: E402
from tao_fast.kernels.utils import SMEM_LIMIT  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("sm90_compile.py")
OLD_TRITON = "3.6.0"
_spec = importlib.util.spec_from_file_location("sm90_compile", SCRIPT)
sm90 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sm90)


def _old_triton_dir() -> Path:
    """Triton 3.6 in the user cache, installed on first use (pip --target, no deps)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    dest = cache / "tao_fast" / f"triton-{OLD_TRITON}"
    if (dest / f"triton-{OLD_TRITON}.dist-info").is_dir():
        return dest
    try:
        with atomic_dir(dest, keep_existing=True) as tmp:
            subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet",
                            "--target", str(tmp), f"triton=={OLD_TRITON}"],
                           check=True, capture_output=True, text=True, timeout=900)
    except (subprocess.SubprocessError, OSError) as err:
        detail = getattr(err, "stderr", None) or str(err)
        reason = f"cannot install triton=={OLD_TRITON} into {dest}: {detail.strip()[-500:]}"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return dest


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """{"installed": OUT.json, "3.6.0": OUT.json} (sm90_compile.py's results), the two versions
    compiled concurrently; one run where the installed Triton is 3.6.0 itself."""
    import triton

    tmp = tmp_path_factory.mktemp("sm90")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    paths = {"installed": ""}
    if triton.__version__ != OLD_TRITON:
        paths[OLD_TRITON] = str(_old_triton_dir())
    procs = {}
    for name, extra in paths.items():
        run_env = dict(env, TRITON_CACHE_DIR=str(tmp / f"cache-{name}"),
                       PYTHONPATH=os.pathsep.join(p for p in (extra, str(ROOT)) if p))
        procs[name] = (tmp / f"{name}.json", subprocess.Popen(
            [sys.executable, str(SCRIPT), str(tmp / f"{name}.json")], env=run_env, cwd=ROOT,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    results = {}
    for name, (out, proc) in procs.items():
        log, _ = proc.communicate(timeout=1500)
        assert proc.returncode == 0, f"sm90_compile.py ({name}) failed:\n{log[-4000:]}"
        results[name] = json.loads(out.read_text())
    results.setdefault(OLD_TRITON, results["installed"])
    assert results[OLD_TRITON]["triton"] == OLD_TRITON, results[OLD_TRITON]["triton"]
    return results


def test_variant_list_covers_the_config_tables():
    """Quick (no compile): the compiled variants are every key of each op's GPU config table,
    with every constexpr switch the host wrappers set from the inputs."""
    vs = sm90.variants()
    by_op = {op: [v for v in vs if v["op"] == op] for op in ("attention", "linear_logprob",
                                                            "pg_loss")}
    assert set(attention._GPU_CONFIGS) == {(d, D) for d in attention.DTYPES
                                           for D in attention.HEAD_DIMS}
    causal = {v["key"] for v in by_op["attention"] if v["flags"]["causal"]}
    assert causal == set(attention._GPU_CONFIGS)
    assert any(not v["flags"]["causal"] for v in by_op["attention"])
    assert set(linear_logprob._GPU_CONFIGS) == set(linear_logprob.DTYPES)
    for dtype in linear_logprob.DTYPES:
        flags = {(v["flags"]["WITH_ENT"], v["flags"]["EVEN_H"], v["flags"]["EVEN_H_DLOGITS"])
                 for v in by_op["linear_logprob"] if v["key"] == dtype}
        assert {(e, h, h) for e in (False, True) for h in (False, True)} <= flags, dtype
    assert {v["key"] for v in by_op["pg_loss"]} == set(pg_loss.DTYPES)
    assert {v["flags"]["all_options"] for v in by_op["pg_loss"]} == {False, True}
    assert torch.float32 in pg_loss.DTYPES and torch.bfloat16 in linear_logprob.DTYPES


def _launch_matches(launch, cfg) -> bool:
    """The launch used the config: its block constexprs, num_warps and num_stages."""
    for key, want in cfg.items():
        got = launch[key] if key in ("num_warps", "num_stages") else launch["blocks"].get(key)
        if got != want:
            return False
    return True


@pytest.mark.parametrize("version", ["installed", OLD_TRITON])
def test_every_variant_compiles_for_sm90_and_fits(compiled, version, capsys):
    result = compiled[version]
    assert not result["errors"], "\n".join(f"{e['variant']}: {e['error']}"
                                          for e in result["errors"])
    launches = result["launches"]
    for v in sm90.variants():
        mine = [ln for ln in launches if ln["variant"] == v["name"]]
        assert {ln["kernel"] for ln in mine} == set(v["expected"]), v["name"]
        for ln in mine:
            where = f"{v['name']} {ln['kernel']} (Triton {result['triton']})"
            assert _launch_matches(ln, v["expected"][ln["kernel"]]), f"{where}: {ln}"
            assert ln["shared"] <= SMEM_LIMIT, f"{where}: {ln['shared']} B shared memory"
            assert ln["global_scratch"] == 0, f"{where}: needs a Triton allocator"
    if version == OLD_TRITON:  # both versions are in: print the table once
        by_version = {r["triton"]: r for r in compiled.values()}
        with capsys.disabled():
            took = ", ".join(f"Triton {v}: {r['seconds']} s" for v, r in by_version.items())
            print(f"\nsm_90a offline compile (shared memory limit {SMEM_LIMIT:,} B), {took}")
            print(sm90.table(by_version))
