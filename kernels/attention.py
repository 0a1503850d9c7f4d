"""Varlen (packed-sequence) causal attention with GQA: Triton forward and backward.

FlashAttention-2 style. q [T, Hq, D], k/v [T, Hkv, D] hold B sequences back to back, delimited
by cu_seqlens int32 [B+1]; attention is (causal) inside each sequence and never crosses one.
Forward: one program per (q block of a sequence, batch*q-head); online softmax in the exp2
domain; saves the natural-log logsumexp per (q-head, token) as lse [Hq, T] fp32.
Backward (no atomics, so bitwise deterministic): delta = rowsum(dO * O); a dk/dv kernel (one
program per k block of a sequence and kv head, looping over the q heads of its GQA group and
over q blocks, so the group sum happens in registers in a fixed order); a dq kernel (one
program per q block and q head, looping over k blocks).

Every loop is split into an unmasked part (blocks fully inside the sequence and fully below the
causal diagonal) and a masked part (the diagonal and the sequence tail). Programs whose block
starts past their sequence's end exit at once (grids are sized by max_seqlen).
"""
from __future__ import annotations

import numbers

import torch
import triton
import triton.language as tl

from tao_fast.kernels import reference
from tao_fast.kernels.utils import (check_device, empty, empty_like, interpreting,
                                    reference_grads, run_or_fallback)

_OP = "varlen_attention"
_LOG2E = 1.4426950408889634  # kernels spell constants out: jit code reads no Python globals
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
HEAD_DIMS = (16, 32, 64, 128, 256)


def _cfg(bm, bn, warps, stages):
    return dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)


def _pre(block, warps):
    return dict(BLOCK=block, num_warps=warps)


# The interpreter uses small blocks so tests cover multi-block loops, diagonal blocks and
# sequence tails at small T (the interpreter tests depend on these shapes).
_INTERP_CONFIGS = (_cfg(32, 16, 4, 1), _pre(64, 4), _cfg(16, 32, 4, 1), _cfg(32, 16, 4, 1))

# GPU configs: (fwd, bwd preprocess, dkdv, dq) per (dtype, D). UNMEASURED for speed (no GPU
# lent): each is chosen by compiling offline for sm_90a with Triton 3.6 and 3.9 through Triton's
# own launch path (tests/kernels/test_sm90_compile.py, which checks every entry) so that it
# fits the 232,448 B of shared memory of an H100/H200 and spills no registers. Comments: shared
# memory of fwd / dkdv / dq (the preprocess needs <= 512 B), the most registers any of the four
# uses (Triton 3.6 / 3.9); every entry: 0 spill bytes in both. Tune the speed with
# bench/gpu_attention.py.
# Constraint (fwd and dq): BLOCK_M % BLOCK_N == 0, so the unmasked k range ends on a BLOCK_N edge.
_CONFIGS_16BIT = {  # bf16 and fp16 compile alike (the same figures)
    16: (_cfg(128, 64, 8, 3), _pre(128, 4), _cfg(32, 128, 8, 3), _cfg(128, 32, 8, 3)),
    # 16,384 / 14,848 / 14,336 B; 215 / 162 regs
    32: (_cfg(128, 64, 8, 3), _pre(128, 4), _cfg(32, 128, 8, 3), _cfg(128, 32, 8, 3)),
    # 32,768 / 29,184 / 28,672 B; 234 / 188 regs
    64: (_cfg(128, 64, 8, 3), _pre(128, 4), _cfg(32, 128, 8, 3), _cfg(128, 32, 8, 3)),
    # 65,536 / 57,856 / 57,344 B; 253 / 231 regs
    128: (_cfg(128, 64, 8, 3), _pre(128, 4), _cfg(32, 64, 8, 2), _cfg(64, 32, 8, 3)),
    # 131,072 / 65,792 / 81,920 B; 255 / 254 regs. dkdv 32x64 at 3 stages (82,944 B) spilled
    # 56 B in both versions; 16x64 (246 / 209 regs) and 32x32 (186 / 170) also fit, unspilled
    256: (_cfg(64, 32, 8, 2), _pre(128, 4), _cfg(32, 32, 8, 2), _cfg(32, 32, 4, 2)),
    # 98,304 / 67,840 / 67,584 B; 255 / 254 regs
}
_CONFIGS_FP32 = {  # fp32 tiles take twice the bytes: smaller tiles / fewer stages above D=64
    16: (_cfg(128, 64, 8, 3), _pre(128, 4), _cfg(32, 128, 8, 3), _cfg(128, 32, 8, 3)),
    # 32,768 / 25,088 / 26,624 B; 205 / 128 regs
    32: (_cfg(128, 64, 8, 3), _pre(128, 4), _cfg(32, 128, 8, 3), _cfg(128, 32, 8, 3)),
    # 65,536 / 49,664 / 53,248 B; 228 / 178 regs
    64: (_cfg(128, 64, 8, 3), _pre(128, 4), _cfg(32, 128, 8, 3), _cfg(128, 32, 8, 3)),
    # 131,072 / 98,816 / 106,496 B; 253 / 254 regs
    128: (_cfg(128, 32, 8, 2), _pre(64, 4), _cfg(32, 32, 8, 3), _cfg(64, 32, 8, 2)),
    # 131,072 / 82,432 / 131,072 B; 248 / 228 regs. Before: fwd 128x64 at 3 stages needed
    # 262,144 B (OutOfResources at launch); dkdv 32x64 spilled 156-812 B, dq 64x32 at 3
    # stages 28 B (3.6); preprocess 128 rows: 250 regs (3.9)
    256: (_cfg(32, 16, 4, 2), _pre(64, 8), _cfg(32, 16, 8, 2), _cfg(32, 32, 8, 2)),
    # 67,840 / 131,328 / 163,840 B; 230 / 216 regs. Before: fwd 64x32 spilled 132-420 B,
    # dkdv / dq 4-32 B, the preprocess (128 rows x 256 fp32 at 4 warps) 9,116 B
}
_GPU_CONFIGS = {(dtype, D): (_CONFIGS_FP32 if dtype == torch.float32 else _CONFIGS_16BIT)[D]
                for dtype in DTYPES for D in HEAD_DIMS}  # what configs() reads on a GPU

@triton.jit
def _load_kv(k_base, v_base, stride_kt, stride_vt, offs_n, offs_d, L, MASK: tl.constexpr,
             UPCAST: tl.constexpr):
    """K and V tiles [BLOCK_N, D] of one kv head; rows at or past L read as 0 when MASK."""
    k_ptrs = k_base + offs_n[:, None] * stride_kt + offs_d[None, :]
    v_ptrs = v_base + offs_n[:, None] * stride_vt + offs_d[None, :]
    if MASK:
        k = tl.load(k_ptrs, mask=offs_n[:, None] < L, other=0.0)  # [BLOCK_N, D]
        v = tl.load(v_ptrs, mask=offs_n[:, None] < L, other=0.0)  # [BLOCK_N, D]
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    return k, v


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_n0, offs_d,
               L, lo, hi, qk_scale, MASK: tl.constexpr, CAUSAL: tl.constexpr,
               BLOCK_N: tl.constexpr, UPCAST: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0  # [BLOCK_N]
        k, v = _load_kv(k_base, v_base, stride_kt, stride_vt, offs_n, offs_d, L, MASK, UPCAST)
        qk = tl.dot(q, tl.trans(k)) * qk_scale  # [BLOCK_M, BLOCK_N], log2 domain
        if MASK:
            keep = offs_n[None, :] < L
            if CAUSAL:
                keep = keep & (offs_m[:, None] >= offs_n[None, :])
            qk = tl.where(keep, qk, float("-inf"))
        # Column `lo == 0` is valid for every row, so m_ij is finite after the first block.
        m_ij = tl.maximum(m_i, tl.max(qk, 1))  # [BLOCK_M]
        p = tl.math.exp2(qk - m_ij[:, None])  # [BLOCK_M, BLOCK_N]
        alpha = tl.math.exp2(m_i - m_ij)  # [BLOCK_M]
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc=acc * alpha[:, None])  # [BLOCK_M, D] fp32
        m_i = m_ij
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, CU, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt,
                stride_vh, stride_ot, stride_oh, T, HQ, qk_scale,
                GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    pid_bh = tl.program_id(1)
    b = pid_bh // HQ
    h = pid_bh % HQ
    seq_start = tl.load(CU + b)
    L = tl.load(CU + b + 1) - seq_start
    if start_m >= L:  # block past this sequence's end (grid is sized by max_seqlen)
        return
    tok0 = seq_start.to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q_ptrs = Q + tok0 * stride_qt + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :]
    q = tl.load(q_ptrs, mask=offs_m[:, None] < L, other=0.0)  # [BLOCK_M, D]
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + tok0 * stride_kt + (h // GROUP) * stride_kh
    v_base = V + tok0 * stride_vt + (h // GROUP) * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    full_end = (L // BLOCK_N) * BLOCK_N  # k blocks wholly inside the sequence
    if CAUSAL:
        full_end = tl.minimum(full_end, start_m)  # ... and wholly left of the diagonal
        hi = tl.minimum(L, start_m + BLOCK_M)  # k blocks right of the diagonal are skipped
    else:
        hi = L
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m,
                               offs_n0, offs_d, L, 0, full_end, qk_scale, False, CAUSAL,
                               BLOCK_N, UPCAST)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m,
                               offs_n0, offs_d, L, full_end, hi, qk_scale, True, CAUSAL,
                               BLOCK_N, UPCAST)
    acc = acc / l_i[:, None]
    row_ok = offs_m < L
    o_ptrs = O + tok0 * stride_ot + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :]
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=row_ok[:, None])
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453  # [BLOCK_M] natural log
    tl.store(LSE + h.to(tl.int64) * T + tok0 + offs_m, lse, mask=row_ok)


@triton.jit
def _bwd_preprocess(O, DO, DELTA, stride_ot, stride_oh, stride_dot, stride_doh, T,
                    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
    offs_t = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    h = tl.program_id(1)
    offs_d = tl.arange(0, HEAD_DIM)
    row = offs_t.to(tl.int64)[:, None]
    o = tl.load(O + row * stride_ot + h * stride_oh + offs_d[None, :], mask=row < T, other=0.0)
    do = tl.load(DO + row * stride_dot + h * stride_doh + offs_d[None, :], mask=row < T, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # [BLOCK]
    tl.store(DELTA + h.to(tl.int64) * T + offs_t, delta, mask=offs_t < T)


@triton.jit
def _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                offs_n, offs_m0, offs_d, L, lo, hi, qk_scale, MASK: tl.constexpr,
                BLOCK_M: tl.constexpr, UPCAST: tl.constexpr):
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + offs_m0  # [BLOCK_M]
        row_ok = offs_m < L
        q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :], mask=row_ok[:, None],
                    other=0.0)  # [BLOCK_M, D]
        do = tl.load(do_base + offs_m[:, None] * stride_dot + offs_d[None, :],
                     mask=row_ok[:, None], other=0.0)  # [BLOCK_M, D]
        # lse = +inf past the sequence end makes p = 0 there (do = 0 already zeroes those rows).
        lse2 = tl.load(lse_base + offs_m, mask=row_ok, other=float("inf")) * 1.4426950408889634
        delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)  # [BLOCK_M]
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        pT = tl.math.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse2[None, :])  # [BLOCK_N, BLOCK_M]
        if MASK:  # causal diagonal
            pT = tl.where(offs_m[None, :] >= offs_n[:, None], pT, 0.0)
        dv = tl.dot(pT.to(do.dtype), do, acc=dv)  # [BLOCK_N, D]
        dpT = tl.dot(v, tl.trans(do))  # [BLOCK_N, BLOCK_M]
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(q.dtype), q, acc=dk)  # [BLOCK_N, D]
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, CU, stride_qt, stride_qh, stride_kt,
                     stride_kh, stride_vt, stride_vh, stride_dot, stride_doh, stride_dkt,
                     stride_dkh, stride_dvt, stride_dvh, T, HKV, sm_scale, qk_scale,
                     GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr):
    start_n = tl.program_id(0) * BLOCK_N
    pid_bh = tl.program_id(1)
    b = pid_bh // HKV
    hk = pid_bh % HKV
    seq_start = tl.load(CU + b)
    L = tl.load(CU + b + 1) - seq_start
    if start_n >= L:
        return
    tok0 = seq_start.to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    n_ok = offs_n[:, None] < L
    k_ptrs = K + tok0 * stride_kt + hk * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :]
    v_ptrs = V + tok0 * stride_vt + hk * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :]
    k = tl.load(k_ptrs, mask=n_ok, other=0.0)  # [BLOCK_N, D]
    v = tl.load(v_ptrs, mask=n_ok, other=0.0)  # [BLOCK_N, D]
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    if CAUSAL:  # q blocks above the diagonal see none of this k block: start at the diagonal
        lo = (start_n // BLOCK_M) * BLOCK_M
        mid = tl.minimum(tl.cdiv(start_n + BLOCK_N, BLOCK_M) * BLOCK_M, L)
    else:
        lo = 0
        mid = 0
    # The GQA group's q heads are summed here, in a fixed order: no atomics, deterministic.
    for g in range(GROUP):
        h = hk * GROUP + g
        q_base = Q + tok0 * stride_qt + h * stride_qh
        do_base = DO + tok0 * stride_dot + h * stride_doh
        lse_base = LSE + h.to(tl.int64) * T + tok0
        delta_base = DELTA + h.to(tl.int64) * T + tok0
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt,
                             stride_dot, offs_n, offs_m0, offs_d, L, lo, mid, qk_scale, True,
                             BLOCK_M, UPCAST)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt,
                             stride_dot, offs_n, offs_m0, offs_d, L, mid, L, qk_scale, False,
                             BLOCK_M, UPCAST)
    dk = dk * sm_scale
    dk_ptrs = DK + (tok0 + offs_n[:, None]) * stride_dkt + hk * stride_dkh + offs_d[None, :]
    dv_ptrs = DV + (tok0 + offs_n[:, None]) * stride_dvt + hk * stride_dvh + offs_d[None, :]
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=n_ok)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=n_ok)


@triton.jit
def _dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_n0,
              offs_d, L, lo, hi, qk_scale, MASK: tl.constexpr, CAUSAL: tl.constexpr,
              BLOCK_N: tl.constexpr, UPCAST: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0  # [BLOCK_N]
        k, v = _load_kv(k_base, v_base, stride_kt, stride_vt, offs_n, offs_d, L, MASK, UPCAST)
        p = tl.math.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse2[:, None])  # [BLOCK_M, BLOCK_N]
        if MASK:
            keep = offs_n[None, :] < L
            if CAUSAL:
                keep = keep & (offs_m[:, None] >= offs_n[None, :])
            p = tl.where(keep, p, 0.0)
        dp = tl.dot(do, tl.trans(v))  # [BLOCK_M, BLOCK_N]
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, acc=dq)  # [BLOCK_M, D]
    return dq


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, CU, stride_qt, stride_qh, stride_kt, stride_kh,
                   stride_vt, stride_vh, stride_dot, stride_doh, stride_dqt, stride_dqh, T, HQ,
                   sm_scale, qk_scale, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                   CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   UPCAST: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    pid_bh = tl.program_id(1)
    b = pid_bh // HQ
    h = pid_bh % HQ
    seq_start = tl.load(CU + b)
    L = tl.load(CU + b + 1) - seq_start
    if start_m >= L:
        return
    tok0 = seq_start.to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < L
    q_ptrs = Q + tok0 * stride_qt + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)  # [BLOCK_M, D]
    do = tl.load(DO + tok0 * stride_dot + h * stride_doh + offs_m[:, None] * stride_dot
                 + offs_d[None, :], mask=row_ok[:, None], other=0.0)  # [BLOCK_M, D]
    lse2 = tl.load(LSE + h.to(tl.int64) * T + tok0 + offs_m, mask=row_ok,
                   other=float("inf")) * 1.4426950408889634  # [BLOCK_M]
    delta = tl.load(DELTA + h.to(tl.int64) * T + tok0 + offs_m, mask=row_ok, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    k_base = K + tok0 * stride_kt + (h // GROUP) * stride_kh
    v_base = V + tok0 * stride_vt + (h // GROUP) * stride_vh
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    full_end = (L // BLOCK_N) * BLOCK_N
    if CAUSAL:
        full_end = tl.minimum(full_end, start_m)
        hi = tl.minimum(L, start_m + BLOCK_M)
    else:
        hi = L
    dq = _dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_n0,
                   offs_d, L, 0, full_end, qk_scale, False, CAUSAL, BLOCK_N, UPCAST)
    dq = _dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_n0,
                   offs_d, L, full_end, hi, qk_scale, True, CAUSAL, BLOCK_N, UPCAST)
    dq = dq * sm_scale
    dq_ptrs = DQ + (tok0 + offs_m[:, None]) * stride_dqt + h * stride_dqh + offs_d[None, :]
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _loop_bound_probe(X, OUT):
    acc = 0.0
    for _ in range(0, tl.load(X)):  # loop bound read from memory, as the kernels do
        acc += 1.0
    tl.store(OUT, acc)


def interpreter_unsupported_reason() -> str | None:
    """None when these kernels can run in the Triton interpreter here, else why not.

    Triton 3.6's interpreter does int(ndarray of shape (1,)) for a loop bound loaded from
    memory, which numpy >= 2.4 refuses (3.9 squeezes first); the compiled GPU path is
    unaffected. Tests skip with this reason.
    """
    try:
        out = torch.zeros(1)
        _loop_bound_probe[(1,)](torch.tensor([3], dtype=torch.int32), out)
        if out.item() == 3.0:
            return None
    except Exception:  # noqa: BLE001 (triton.runtime.errors.InterpreterError)
        pass
    return (f"Triton {triton.__version__} interpreter cannot run loops with bounds loaded "
            f"from memory on this numpy")


def configs(dtype: torch.dtype, D: int) -> tuple[dict, dict, dict, dict]:
    """(fwd, bwd preprocess, dkdv, dq) launch configs for q's dtype and head dim D: the block
    sizes (constexprs) plus num_warps / num_stages, as the host wrappers pass them."""
    if interpreting():
        return _INTERP_CONFIGS
    return _GPU_CONFIGS[dtype, D]


def unsupported_reason(q: torch.Tensor) -> str | None:
    """None when the kernels cover q's dtype and head dim, else why not (one line)."""
    D = q.shape[-1]
    if D not in HEAD_DIMS:
        return (f"head dim D={D} not supported: the Triton kernel takes D in {HEAD_DIMS} "
                "(pad the head dim, or use backend='torch')")
    if q.dtype not in DTYPES:
        return f"dtype must be float16, bfloat16 or float32, got {q.dtype}"
    return None


def _variant(q: torch.Tensor) -> tuple:
    return (str(q.dtype).removeprefix("torch."), f"D={q.shape[-1]}")


def _check_inputs(q, k, v, cu_seqlens, max_seqlen):
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"q [T, Hq, D], k/v [T, Hkv, D] expected, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    T, Hq, D = q.shape
    if k.shape != v.shape or k.shape[0] != T or k.shape[2] != D:
        raise ValueError(f"k and v must be [T={T}, Hkv, D={D}], got {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if Hq % k.shape[1]:
        raise ValueError(f"Hq={Hq} must be a multiple of Hkv={k.shape[1]}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device == cu_seqlens.device):
        raise ValueError(f"q, k, v, cu_seqlens must be on one device, got {q.device}, {k.device}, "
                         f"{v.device}, {cu_seqlens.device}")
    check_device(_OP, q)
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype != torch.int32:
        raise ValueError(f"cu_seqlens must be int32 [B+1] with B >= 1, got {cu_seqlens.dtype} "
                         f"{tuple(cu_seqlens.shape)}")
    if not isinstance(max_seqlen, numbers.Integral) or isinstance(max_seqlen, bool) \
            or max_seqlen < 0:  # a tensor here would cost a host sync per call
        raise ValueError(f"max_seqlen must be a Python int >= 0, got {max_seqlen!r}")
    if cu_seqlens.device.type == "cpu":  # values checked only where that costs no device sync
        cu = cu_seqlens.tolist()
        lens = [e - s for s, e in zip(cu[:-1], cu[1:])]
        if cu[0] != 0 or cu[-1] != T or min(lens) < 0 or max(lens) > max_seqlen:
            raise ValueError(f"cu_seqlens must rise from 0 to T={T} with steps <= max_seqlen="
                             f"{max_seqlen}, got {cu}")


def _last_dim_contiguous(x):
    # Kernels take any token/head strides but need unit stride along D.
    return x if x.stride(-1) == 1 else x.contiguous()


def varlen_attention_forward(q, k, v, cu_seqlens, max_seqlen: int, causal: bool = True,
                             scale=None, out=None, lse=None):
    """Forward only, no autograd. Returns out [T, Hq, D] (q's dtype) and lse [Hq, T] fp32.

    `out` / `lse` may be given preallocated (tests poison them to check every element is
    written). cu_seqlens values are trusted on CUDA (checking them would sync the host).
    """
    _check_inputs(q, k, v, cu_seqlens, max_seqlen)
    reason = unsupported_reason(q)
    if reason is not None:
        raise ValueError(reason)
    q, k, v = map(_last_dim_contiguous, (q, k, v))
    T, Hq, D = q.shape
    Hkv, max_seqlen = k.shape[1], int(max_seqlen)
    scale = D ** -0.5 if scale is None else float(scale)
    out = empty_like(q) if out is None else out  # [T, Hq, D]
    lse = empty(Hq, T, device=q.device, dtype=torch.float32) if lse is None else lse  # [Hq, T]
    if out.shape != q.shape or out.stride(-1) != 1 or lse.shape != (Hq, T) \
            or not lse.is_contiguous():
        raise ValueError("out must be [T, Hq, D] with unit stride in D, lse contiguous [Hq, T]")
    B = cu_seqlens.numel() - 1
    cfg = configs(q.dtype, D)[0]
    upcast = interpreting() and q.dtype == torch.bfloat16  # interpreter bf16 tl.dot is broken
    grid = (triton.cdiv(max_seqlen, cfg["BLOCK_M"]), B * Hq)
    if T and max_seqlen:
        _fwd_kernel[grid](q, k, v, out, lse, cu_seqlens, q.stride(0), q.stride(1), k.stride(0),
                          k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
                          T, Hq, scale * _LOG2E, GROUP=Hq // Hkv, HEAD_DIM=D, CAUSAL=bool(causal),
                          UPCAST=upcast, **cfg)
    return out, lse


def varlen_attention_backward(do, q, k, v, out, lse, cu_seqlens, max_seqlen: int,
                              causal: bool = True, scale=None, dq=None, dk=None, dv=None):
    """Gradients dq [T, Hq, D], dk, dv [T, Hkv, D] from dout [T, Hq, D]; no atomics.

    dq/dk/dv may be given preallocated (tests poison them).
    """
    q, k, v, out, do = map(_last_dim_contiguous, (q, k, v, out, do))
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    B = cu_seqlens.numel() - 1
    scale = D ** -0.5 if scale is None else float(scale)
    dq = empty_like(q) if dq is None else dq  # [T, Hq, D]
    dk = empty_like(k) if dk is None else dk  # [T, Hkv, D]
    dv = empty_like(v) if dv is None else dv  # [T, Hkv, D]
    if not T or not max_seqlen:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = empty(Hq, T, device=q.device, dtype=torch.float32)  # [Hq, T] rowsum(dO * O)
    _, cfg_pre, cfg_kv, cfg_q = configs(q.dtype, D)
    upcast = interpreting() and q.dtype == torch.bfloat16
    _bwd_preprocess[(triton.cdiv(T, cfg_pre["BLOCK"]), Hq)](
        out, do, delta, out.stride(0), out.stride(1), do.stride(0), do.stride(1), T,
        HEAD_DIM=D, **cfg_pre)
    common = dict(GROUP=Hq // Hkv, HEAD_DIM=D, CAUSAL=bool(causal), UPCAST=upcast)
    _bwd_dkdv_kernel[(triton.cdiv(max_seqlen, cfg_kv["BLOCK_N"]), B * Hkv)](
        q, k, v, do, lse, delta, dk, dv, cu_seqlens, q.stride(0), q.stride(1), k.stride(0),
        k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1), dk.stride(0),
        dk.stride(1), dv.stride(0), dv.stride(1), T, Hkv, scale, scale * _LOG2E,
        **common, **cfg_kv)
    _bwd_dq_kernel[(triton.cdiv(max_seqlen, cfg_q["BLOCK_M"]), B * Hq)](
        q, k, v, do, lse, delta, dq, cu_seqlens, q.stride(0), q.stride(1), k.stride(0),
        k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1), dq.stride(0),
        dq.stride(1), T, Hq, scale, scale * _LOG2E, **common, **cfg_q)
    return dq, dk, dv


class VarlenAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, causal, scale, fallback):
        out, lse = varlen_attention_forward(q, k, v, cu_seqlens, max_seqlen, causal, scale)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
        ctx.max_seqlen, ctx.causal, ctx.scale, ctx.fallback = max_seqlen, causal, scale, fallback
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
        rest = (cu_seqlens, ctx.max_seqlen, ctx.causal, ctx.scale)
        dq, dk, dv = run_or_fallback(
            _OP, _variant(q), ctx.fallback,
            lambda: varlen_attention_backward(dout, q, k, v, out, lse, *rest),
            lambda: reference_grads(lambda *qkv: (reference.varlen_attention(*qkv, *rest),),
                                    (q, k, v), ctx.needs_input_grad[:3], (dout,)))
        return dq, dk, dv, None, None, None, None, None


def varlen_attention(q, k, v, cu_seqlens, max_seqlen: int, causal: bool = True, scale=None,
                     fallback: bool = False):
    """Attention over packed sequences (causal inside each, nothing across), GQA, differentiable.

    q [T, Hq, D], k/v [T, Hkv, D] (Hq % Hkv == 0; D in 16..256, power of 2), cu_seqlens int32
    [B+1] (0, ..., T), max_seqlen: Python int >= the longest sequence. fp16/bf16 on GPU; fp32
    works too (tl.dot then uses TF32 on GPU) and is what the interpreter tests use.
    scale defaults to D**-0.5. Returns out [T, Hq, D] in q's dtype. The backward uses no
    atomics, so it is deterministic (no `deterministic` switch is needed).
    fallback=True (ops' backend="auto"): where a kernel cannot compile or launch, or D / dtype
    is not covered, the torch reference computes it (forward or backward) after one warning
    per reason; fallback=False raises instead.
    """
    _check_inputs(q, k, v, cu_seqlens, max_seqlen)
    return run_or_fallback(
        _OP, _variant(q), fallback,
        lambda: VarlenAttentionFunction.apply(q, k, v, cu_seqlens, max_seqlen, causal, scale,
                                              fallback),
        lambda: reference.varlen_attention(q, k, v, cu_seqlens, max_seqlen, causal, scale),
        unsupported=unsupported_reason(q))
