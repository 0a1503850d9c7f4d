"""Compile every GPU kernel variant the host wrappers launch, for sm_90a, without a GPU.

Run as a script (tests/kernels/test_sm90_compile.py does, once per Triton version, with that
Triton first on PYTHONPATH and TRITON_INTERPRET unset):

    python tests/kernels/sm90_compile.py OUT.json
    python tests/kernels/sm90_compile.py --table OUT-3.6.json OUT-3.9.json   # Markdown table

The public ops run on meta tensors (shapes, dtypes and strides, no data), so each kernel goes
through Triton's own launch path: argument specialization (16-byte alignment and divisibility
of every pointer and integer, integers equal to 1 as constants), the configs the host wrappers
pick, compilation with the bundled ptxas, and the launch-time checks (shared memory and threads
against the device's limits). MOCK, for what cannot run here: `OfflineDriver` stands in for the
CUDA driver. It reports an H100/H200 (sm_90, 232,448 B of shared memory per block, 132 SMs),
loads no module and launches nothing; registers and spills come from ptxas's own report
(`ptxas -v`, which Triton runs and prints with TRITON_DUMP_PTXAS_LOG).

OUT.json: {"triton": version, "launches": [...], "errors": [...]}; a launch holds the variant,
the kernel, its block constexprs, num_warps, num_stages, shared memory bytes, registers, spill
bytes, and global scratch bytes (which would need a Triton allocator: none is set).
"""
from __future__ import annotations

import io
import json
import re
import sys
import time

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget

from tao_fast.kernels import attention, linear_logprob, pg_loss
from tao_fast.kernels.utils import SM90_MULTIPROCESSORS, SMEM_LIMIT

META = torch.device("meta")
_PTXAS_LOG = io.StringIO()  # sys.stdout while compiling: Triton prints the ptxas report there
_STATE = {"variant": None, "launches": []}


class _KernelInfo:
    """What load_binary hands back as the 'function': the ptxas figures of one cubin."""

    def __init__(self, name, shared, regs, spill_stores, spill_loads):
        self.name, self.shared, self.regs = name, shared, regs
        self.spill_stores, self.spill_loads = spill_stores, spill_loads


class _Utils:
    def get_device_properties(self, device):
        return {"max_shared_mem": SMEM_LIMIT, "multiprocessor_count": SM90_MULTIPROCESSORS,
                "max_num_regs": 65536, "warpSize": 32, "sm_clock_rate": 0, "mem_clock_rate": 0,
                "mem_bus_width": 0}

    def load_binary(self, name, cubin, shared, device):
        log = _PTXAS_LOG.getvalue()
        _PTXAS_LOG.seek(0)
        _PTXAS_LOG.truncate()
        regs = re.findall(r"Used (\d+) registers", log)
        spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
        if not regs or not spills:
            raise RuntimeError(f"no ptxas report for {name} (a cached cubin? use a fresh "
                               f"TRITON_CACHE_DIR)")
        info = _KernelInfo(name, shared, int(regs[-1]), *map(int, spills[-1]))
        # Registers are allocated per warp in units of 256: the most threads a block can have.
        warp_regs = -(-info.regs * 32 // 256) * 256
        max_threads = min(1024, 65536 // warp_regs * 32)
        return info, info, info.regs, info.spill_stores, max_threads

    def unload_module(self, module):
        pass


class _Launcher:
    """Records the launch Triton would make: kernel, constexprs, options, resources."""

    def __init__(self, src, metadata):
        self.src, self.metadata = src, metadata

    def __call__(self, gx, gy, gz, stream, function, packed_metadata, launch_metadata,
                 enter_hook, exit_hook, *args):
        names = self.src.fn.arg_names
        consts = {names[k[0]]: v for k, v in self.src.constants.items()
                  if names[k[0]].startswith("BLOCK") or names[k[0]] == "HEAD_DIM"}
        md = self.metadata
        _STATE["launches"].append(dict(
            variant=_STATE["variant"], kernel=function.name, grid=[gx, gy, gz],
            blocks=consts, num_warps=md.num_warps, num_stages=md.num_stages, shared=md.shared,
            regs=function.regs, spill_stores=function.spill_stores,
            spill_loads=function.spill_loads,
            global_scratch=md.global_scratch_size + getattr(md, "profile_scratch_size", 0)))


class OfflineDriver:
    """MOCK of Triton's CUDA driver (no GPU here): an sm_90 target that launches nothing."""

    def __init__(self):
        self.utils = _Utils()
        self.launcher_cls = _Launcher

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_device_capability(self, device=0):
        return (9, 0)


def _name(dtype):
    return str(dtype).removeprefix("torch.")


def _attention(dtype, D, causal):
    T, Hq, Hkv = 8191, 8, 2  # GQA group 4; T not a multiple of 16, as packed batches are
    qkv = torch.empty(T, Hq + 2 * Hkv, D, dtype=dtype, device=META)  # fused projection views
    q, k, v = qkv[:, :Hq], qkv[:, Hq:Hq + Hkv], qkv[:, Hq + Hkv:]
    q, k, v = (x.requires_grad_() for x in (q.detach(), k.detach(), v.detach()))
    cu = torch.empty(5, dtype=torch.int32, device=META)
    out = attention.varlen_attention(q, k, v, cu, 4096, causal=causal)
    out.backward(torch.empty_like(out))


def _linear_logprob(dtype, T, H, with_ent):
    hidden = torch.empty(T, H, dtype=dtype, device=META, requires_grad=True)
    weight = torch.empty(151936, H, dtype=dtype, device=META, requires_grad=True)
    targets = torch.empty(T, dtype=torch.int64, device=META)
    logp, ent = linear_logprob.linear_logprob(hidden, weight, targets, 0.7, with_ent)
    loss = logp.sum() + (ent.sum() if with_ent else 0)
    loss.backward()


def _pg_loss(dtype, full):
    N = 8191
    logp = torch.empty(N, dtype=dtype, device=META, requires_grad=True)
    f32 = dict(dtype=torch.float32, device=META)
    old, adv, ref, samp = (torch.empty(N, **f32) for _ in range(4))
    mask = torch.empty(N, dtype=torch.bool, device=META)
    if full:  # every option on: KL (k3), dual clip, TIS with cap, per-sequence mean
        loss, _ = pg_loss.pg_loss(logp, old, adv, mask, ref_logp=ref, kl_coef=0.1, dual_clip=3.0,
                                  sampler_logp=samp, tis_cap=2.0, agg="seq-mean-token-mean",
                                  cu_seqlens=torch.empty(9, dtype=torch.int32, device=META))
    else:
        loss, _ = pg_loss.pg_loss(logp, old, adv, mask)
    loss.backward()


def _attention_expected(dtype, D):
    fwd, pre, dkdv, dq = attention._GPU_CONFIGS[dtype, D]
    return {"_fwd_kernel": fwd, "_bwd_preprocess": pre, "_bwd_dkdv_kernel": dkdv,
            "_bwd_dq_kernel": dq}


def variants():
    """Every variant, as dicts: name; op; key (what the op's GPU config table is keyed by);
    flags (the constexpr switches it sets); expected ({kernel name: the config the host wrapper
    must launch it with}, from the op's own table); call (runs the public op on meta tensors).

    attention: every (dtype, D) of its table, causal (the trainer's) forward and backward; the
    non-causal branch in bf16 only: it has the same tiles, hence the same shared memory, and
    compiled for all 15 (dtype, D) it used at most 6 registers more than causal, no spills.
    linear_logprob: per dtype, with and without entropy, H a multiple of BLOCK_H (4096) and not
    (1040: rows still 16-byte aligned, as any real hidden size is); a 100-token batch (one token
    tile: group_t = 1 becomes a compile-time constant) in bf16. pg_loss: per logp dtype, plain
    and with every option on (KL, dual clip, TIS, per-sequence mean)."""
    out = []
    for dtype in attention.DTYPES:
        for D in attention.HEAD_DIMS:
            for causal in (True, False) if dtype == torch.bfloat16 else (True,):
                out.append(dict(
                    name=f"attention {_name(dtype)} D={D}{'' if causal else ' non-causal'}",
                    op="attention", key=(dtype, D), flags=dict(causal=causal),
                    expected=_attention_expected(dtype, D),
                    call=lambda d=dtype, D=D, c=causal: _attention(d, D, c)))
    for dtype in linear_logprob.DTYPES:
        fwd, dlogits = linear_logprob._GPU_CONFIGS[dtype]
        sizes = ((8191, 4096), (8191, 1040)) + (((100, 4096),) if dtype == torch.bfloat16 else ())
        for with_ent in (False, True):
            for T, H in sizes:
                out.append(dict(
                    name=f"linear_logprob {_name(dtype)} T={T} H={H}"
                         f"{' entropy' if with_ent else ''}",
                    op="linear_logprob", key=dtype,
                    flags=dict(WITH_ENT=with_ent, EVEN_H=H % fwd["BLOCK_H"] == 0,
                               EVEN_H_DLOGITS=H % dlogits["BLOCK_H"] == 0),
                    expected={"_fwd_kernel": fwd, "_dlogits_kernel": dlogits},
                    call=lambda d=dtype, T=T, H=H, e=with_ent: _linear_logprob(d, T, H, e)))
    for dtype in pg_loss.DTYPES:
        for full in (False, True):
            kernels = ("_pg_fwd_kernel", "_seq_sum_kernel") if full else ("_pg_fwd_kernel",)
            out.append(dict(
                name=f"pg_loss {_name(dtype)} {'all options' if full else 'plain'}",
                op="pg_loss", key=dtype, flags=dict(all_options=full),
                expected={k: pg_loss.CONFIG for k in kernels},
                call=lambda d=dtype, f=full: _pg_loss(d, f)))
    return out


def table(results) -> str:
    """A Markdown table of compile results ({triton version: OUT.json content}): one row per
    variant and kernel (the worst of its launches: several specializations may compile)."""
    versions = sorted(results)
    rows = {}
    for v in versions:
        for ln in results[v]["launches"]:
            cfg = ", ".join(f"{k}={x}" for k, x in ln["blocks"].items() if k != "HEAD_DIM")
            key = (ln["variant"], ln["kernel"], f"{cfg}, {ln['num_warps']}w/{ln['num_stages']}s")
            cell = rows.setdefault(key, {}).setdefault(v, [0, 0, 0])
            cell[:] = [max(cell[0], ln["shared"]), max(cell[1], ln["regs"]),
                       max(cell[2], ln["spill_stores"])]
    head = ["variant", "kernel", "config"] + [f"{w} {v}" for v in versions
                                             for w in ("smem B", "regs", "spill B")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (variant, kernel, cfg), cells in rows.items():
        vals = [f"{x:,}" if isinstance(x, int) else x for v in versions
                for x in cells.get(v, ["-"] * 3)]
        lines.append("| " + " | ".join([variant, kernel.strip("_"), cfg] + vals) + " |")
    return "\n".join(lines)


def main(path: str) -> None:
    triton.runtime.driver.set_active(OfflineDriver())
    knobs.nvidia.dump_ptxas_log = True
    errors, t0 = [], time.time()
    real_stdout, sys.stdout = sys.stdout, _PTXAS_LOG
    try:
        for v in variants():
            _STATE["variant"] = v["name"]
            try:
                v["call"]()
            except Exception as err:  # noqa: BLE001 - recorded; the test fails on any
                errors.append(dict(variant=v["name"],
                                   error=f"{type(err).__name__}: {err}"[:2000]))
    finally:
        sys.stdout = real_stdout
    with open(path, "w", encoding="utf-8") as f:
        json.dump(dict(triton=triton.__version__, seconds=round(time.time() - t0, 1),
                       launches=_STATE["launches"], errors=errors), f, indent=1)


if __name__ == "__main__":
    if sys.argv[1] == "--table":  # --table A.json B.json: print the Markdown table
        print(table({r["triton"]: r for r in (json.load(open(p)) for p in sys.argv[2:])}))
    else:
        main(sys.argv[1])
