"""Fused linear log-prob (+ entropy): log softmax((hidden @ weight.T) / temperature)[targets].

Spec: `reference.linear_logprob`. The forward never holds logits beyond one [BLOCK_T, BLOCK_V]
tile: each program owns BLOCK_T tokens and one slice of the vocab, recomputes its logit tiles
with `tl.dot` over H chunks (fp32 accumulation) and keeps an online logsumexp (running max m,
sum s = sum exp(z - m), and for the entropy a = sum exp(z - m) * (z - m)); the slices' partials
are merged in torch in a fixed order (a few [S, T] fp32 tensors).

Backward (derivation, z = x / temperature, x = hidden @ weight.T, p = softmax(z)):
    d logp / dz_j = 1[j = target] - p_j
    d ent  / dz_j = -p_j * (z_j - E_p[z])          (ent = lse - E_p[z] = -sum p log p)
    dx_j = (g_logp * (1[j = target] - p_j) - g_ent * p_j * (z_j - E_p[z])) / temperature
    d hidden = dx @ weight,   d weight = dx.T @ hidden
Decision (deterministic, no atomics): a Triton kernel recomputes the logit tiles of a CHUNK of
tokens and writes dx for that chunk ([C, V] in the input dtype, the "per-tile partials");
cuBLAS then reduces them in a fixed order: d hidden[chunk] = dx @ W and d weight += dx.T @ h.
A fully fused deterministic backward (one kernel looping V tiles per T tile for d hidden, one
looping T tiles per V tile for d weight) must keep a [BLOCK_T, H] fp32 accumulator; for
H = 4096 that does not fit in registers, so it is a read-modify-write of global memory per V
tile: about 2/BLOCK_V bytes per flop, i.e. memory-bound on an H100 by ~3x (estimate, not
measured). The chunk is bounded by _DX_CHUNK_BYTES (1 GiB: 4096 tokens of a 128k vocab in
bf16); with more than one chunk, d weight accumulates in fp32.
Run-to-run bitwise reproducible on one GPU model: no atomics, fixed reduction orders, cuBLAS
on one stream (torch's deterministic mode additionally wants CUBLAS_WORKSPACE_CONFIG=:4096:8).
The vocab split count follows the SM count, so another GPU model may differ in the last bits.
"""
from __future__ import annotations

import warnings

import torch
import triton
import triton.language as tl

from tao_fast.kernels import reference
from tao_fast.kernels.utils import (check_device, empty, interpreting, multiprocessor_count,
                                    reference_grads, run_or_fallback)

_OP = "linear_logprob"
IGNORE_INDEX = -100
_IGN = tl.constexpr(IGNORE_INDEX)  # jit code may only read constexpr globals
_NEG = tl.constexpr(-1.0e30)  # finite "-inf": exp(_NEG - m) = 0 and 0 * _NEG = 0, no NaN
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _cfg(bt, bv, bh, warps, stages):
    return dict(BLOCK_T=bt, BLOCK_V=bv, BLOCK_H=bh, num_warps=warps, num_stages=stages)


# GPU configs (fwd, dlogits) per input dtype. Timing UNMEASURED (no GPU lent). Compiled
# offline for sm_90a with Triton 3.6 and 3.9 through Triton's own launch path
# (tests/kernels/test_sm90_compile.py checks each, with and without entropy, H a multiple of
# BLOCK_H and not): bf16/fp16 128x128x64 at 8 warps, 3 stages: 98,304 B of shared memory, fwd
# 173-190 registers, dlogits 127-209, 0 spills. fp32 inputs (IEEE dot, no tensor cores)
# 64x128x32 at 8 warps, 2 stages: 24,576 B, fwd 172-208 registers, dlogits 128, 0 spills. A
# hidden size that is not a multiple of 16 (unaligned rows; no real model has one) spills
# ~170 B in the 16-bit fwd (Triton 3.9, H=1000).
_GPU_CONFIGS = {
    torch.bfloat16: (_cfg(128, 128, 64, 8, 3), _cfg(128, 128, 64, 8, 3)),
    torch.float16: (_cfg(128, 128, 64, 8, 3), _cfg(128, 128, 64, 8, 3)),
    torch.float32: (_cfg(64, 128, 32, 8, 2), _cfg(64, 128, 32, 8, 2)),
}
# Forward vocab slices: at H=4096 a [128, H] hidden tile and a [128, H] weight tile are 1 MiB
# each, so ~8 token tiles x 16 slices live at once keep ~24 MiB in the 50 MiB L2 (estimate).
_GPU_SPLITS = 16
# The interpreter runs each program in numpy with ~1 ms of Python overhead per tile step: fewer,
# bigger tiles are faster (measured, T=1025 V=32003 H=576 forward: 64/512/64 20 s, this 4 s).
# Several vocab splits so that the tests exercise the partial-merge path.
_INTERP_BLOCKS = dict(BLOCK_T=256, BLOCK_V=2048, BLOCK_H=128)
_INTERP_SPLITS = 3
_DX_CHUNK_BYTES = 1 << 30  # backward dx chunk; tests/bench lower it to force several chunks
# d weight over several chunks: fp32 temporaries per vocab slice of at most this many bytes
# (a [V, H] fp32 product of a 128k vocab at H=4096 would be 2 GiB at once).
_DW_SLICE_BYTES = 256 << 20


@triton.jit
def _logits_tile(h_ptr, w_ptr, rows, cols, stride_h, stride_w, H, inv_temp,
                 BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                 EVEN_H: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """z = (h[rows] @ w[cols].T) * inv_temp: one [BLOCK_T, BLOCK_V] fp32 tile, looping over H.
    rows/cols are clamped in range by the caller (edge tiles re-read the last row/column and
    the caller discards those lanes), so only a ragged H needs a load mask."""
    offs_h = tl.arange(0, BLOCK_H)
    h_ptrs = h_ptr + rows.to(tl.int64)[:, None] * stride_h + offs_h[None, :]  # [BLOCK_T, BLOCK_H]
    w_ptrs = w_ptr + cols.to(tl.int64)[None, :] * stride_w + offs_h[:, None]  # [BLOCK_H, BLOCK_V]
    acc = tl.zeros([BLOCK_T, BLOCK_V], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        if EVEN_H:
            ht = tl.load(h_ptrs)
            wt = tl.load(w_ptrs)
        else:
            h_ok = offs_h < H - h0
            ht = tl.load(h_ptrs, mask=h_ok[None, :], other=0.0)
            wt = tl.load(w_ptrs, mask=h_ok[:, None], other=0.0)
        if UPCAST:  # interpreter only: its bf16 tl.dot is wrong
            ht = ht.to(tl.float32)
            wt = wt.to(tl.float32)
        acc = tl.dot(ht, wt, acc, input_precision=PREC)  # [BLOCK_T, BLOCK_V]
        h_ptrs += BLOCK_H
        w_ptrs += BLOCK_H
    return acc * inv_temp


@triton.jit
def _fwd_kernel(h_ptr, w_ptr, tgt_ptr, part_ptr, T, V, H, stride_h, stride_w, inv_temp,
                v_per_split, n_split, group_t,
                BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                EVEN_H: tl.constexpr, WITH_ENT: tl.constexpr, UPCAST: tl.constexpr,
                PREC: tl.constexpr):
    """Online logsumexp of one token tile over one vocab slice -> part[4, n_split, T].

    Launch order: groups of `group_t` token tiles x all vocab slices run together, so at any
    time the live programs share group_t hidden tiles and n_split weight tiles in L2 (a 1-D
    grid, grouped like a GEMM; token-tile-fastest alone would keep ~132 hidden tiles live)."""
    pid = tl.program_id(0)
    per_group = group_t * n_split
    first_t = (pid // per_group) * group_t
    rows_in_group = tl.minimum(tl.cdiv(T, BLOCK_T) - first_t, group_t)
    pid_t = first_t + (pid % per_group) % rows_in_group
    pid_s = (pid % per_group) // rows_in_group
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = offs_t < T
    tgt = tl.load(tgt_ptr + offs_t, mask=t_ok, other=_IGN)  # [BLOCK_T]
    rows = tl.minimum(offs_t, T - 1)
    m = tl.full([BLOCK_T], _NEG, dtype=tl.float32)
    s = tl.zeros([BLOCK_T], dtype=tl.float32)
    a = tl.zeros([BLOCK_T], dtype=tl.float32)
    zt = tl.zeros([BLOCK_T], dtype=tl.float32)
    v_lo = pid_s * v_per_split
    v_hi = tl.minimum(v_lo + v_per_split, V)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        v_ok = offs_v < v_hi
        z = _logits_tile(h_ptr, w_ptr, rows, tl.minimum(offs_v, V - 1), stride_h, stride_w, H,
                         inv_temp, BLOCK_T, BLOCK_V, BLOCK_H, EVEN_H, UPCAST, PREC)
        z = tl.where(v_ok[None, :], z, _NEG)  # [BLOCK_T, BLOCK_V]
        m_new = tl.maximum(m, tl.max(z, 1))
        alpha = tl.exp(m - m_new)
        zc = z - m_new[:, None]  # [BLOCK_T, BLOCK_V]
        p = tl.exp(zc)  # [BLOCK_T, BLOCK_V], 0 on padded columns
        if WITH_ENT:  # a tracks sum exp(z - m) * (z - m): no cancellation against m
            a = alpha * (a + (m - m_new) * s) + tl.sum(p * zc, 1)
        s = alpha * s + tl.sum(p, 1)
        zt += tl.sum(tl.where(offs_v[None, :] == tgt[:, None], z, 0.0), 1)
        m = m_new
    out = part_ptr + pid_s * T + offs_t
    plane = n_split * T
    tl.store(out, m, mask=t_ok)
    tl.store(out + plane, s, mask=t_ok)
    tl.store(out + 2 * plane, a, mask=t_ok)
    tl.store(out + 3 * plane, zt, mask=t_ok)


@triton.jit
def _dlogits_kernel(h_ptr, w_ptr, tgt_ptr, lse_ptr, ez_ptr, glp_ptr, gent_ptr, dx_ptr,
                    T, V, H, stride_h, stride_w, stride_dx, inv_temp,
                    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                    EVEN_H: tl.constexpr, WITH_ENT: tl.constexpr, UPCAST: tl.constexpr,
                    PREC: tl.constexpr):
    """dx = d loss / d (hidden @ weight.T) for one [BLOCK_T, BLOCK_V] tile (see module doc)."""
    pid_t = tl.program_id(0)  # fastest: neighbours share the W tile, the h chunk stays in L2
    pid_v = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    t_ok = offs_t < T
    v_ok = offs_v < V
    tgt = tl.load(tgt_ptr + offs_t, mask=t_ok, other=_IGN)  # [BLOCK_T]
    live = t_ok & (tgt != _IGN)  # ignored tokens: zero upstream grad -> dx = 0
    lse = tl.load(lse_ptr + offs_t, mask=t_ok, other=0.0)
    glp = tl.load(glp_ptr + offs_t, mask=live, other=0.0)
    z = _logits_tile(h_ptr, w_ptr, tl.minimum(offs_t, T - 1), tl.minimum(offs_v, V - 1),
                     stride_h, stride_w, H, inv_temp, BLOCK_T, BLOCK_V, BLOCK_H, EVEN_H,
                     UPCAST, PREC)  # [BLOCK_T, BLOCK_V]
    p = tl.exp(z - lse[:, None])  # [BLOCK_T, BLOCK_V]
    onehot = tl.where(offs_v[None, :] == tgt[:, None], 1.0, 0.0)
    dz = glp[:, None] * (onehot - p)
    if WITH_ENT:
        ez = tl.load(ez_ptr + offs_t, mask=t_ok, other=0.0)
        gent = tl.load(gent_ptr + offs_t, mask=live, other=0.0)
        dz -= gent[:, None] * p * (z - ez[:, None])
    dx = dz * inv_temp
    ptrs = dx_ptr + offs_t.to(tl.int64)[:, None] * stride_dx + offs_v[None, :]
    tl.store(ptrs, dx.to(dx_ptr.dtype.element_ty), mask=t_ok[:, None] & v_ok[None, :])


def configs(dtype: torch.dtype) -> tuple[dict, dict]:
    """(fwd, dlogits) launch configs for the input dtype: BLOCK_T/V/H plus num_warps and
    num_stages, as the host wrappers pass them."""
    if interpreting():
        return _INTERP_BLOCKS, _INTERP_BLOCKS
    return _GPU_CONFIGS[dtype]


def _constexprs(cfg: dict, hidden: torch.Tensor) -> dict:
    """A config plus the flags that follow from the inputs."""
    fp32 = hidden.dtype == torch.float32
    return dict(cfg, EVEN_H=hidden.shape[1] % cfg["BLOCK_H"] == 0,
                UPCAST=interpreting() and hidden.dtype == torch.bfloat16,
                PREC="ieee" if fp32 else "tf32")  # fp32: IEEE like torch's matmul, not TF32


def _forward(hidden, weight, targets, inv_temp, with_ent):
    """-> logp [T], entropy [T] or None, lse [T], E_p[z] [T] or None (all fp32)."""
    T, H = hidden.shape
    V = weight.shape[0]
    cfg = _constexprs(configs(hidden.dtype)[0], hidden)
    n_t = triton.cdiv(T, cfg["BLOCK_T"])
    n_vt = triton.cdiv(V, cfg["BLOCK_V"])
    if interpreting():
        n_split, group_t = min(_INTERP_SPLITS, n_vt), 2
    else:  # ~1 program per SM live (255 regs x 256 threads): ~8 token tiles x 16 vocab slices
        sms = multiprocessor_count(hidden.device)
        n_split = max(1, min(n_vt, max(_GPU_SPLITS, triton.cdiv(2 * sms, n_t))))
        group_t = max(1, sms // n_split)
    tiles_per_split = triton.cdiv(n_vt, n_split)
    n_split = triton.cdiv(n_vt, tiles_per_split)  # no empty slice
    part = empty(4, n_split, T, dtype=torch.float32, device=hidden.device)  # [4, S, T]
    _fwd_kernel[(n_t * n_split,)](
        hidden, weight, targets, part, T, V, H, hidden.stride(0), weight.stride(0), inv_temp,
        tiles_per_split * cfg["BLOCK_V"], n_split, group_t, WITH_ENT=with_ent, **cfg)
    m, s, a, zt = part.unbind(0)  # each [n_split, T]
    big_m = m.max(0).values  # [T]
    scale = torch.exp(m - big_m)  # [n_split, T]
    s_tot = (s * scale).sum(0)  # [T]
    lse = big_m + torch.log(s_tot)
    valid = targets != IGNORE_INDEX
    bad = valid & ((targets < 0) | (targets >= V))  # out-of-range target -> NaN, no host sync
    logp = torch.where(valid, zt.sum(0) - lse, torch.zeros_like(lse))
    logp = torch.where(bad, torch.full_like(logp, float("nan")), logp)
    if not with_ent:
        return logp, None, lse, None
    ez_rel = (scale * (a + (m - big_m) * s)).sum(0) / s_tot  # E_p[z] - big_m
    ent = torch.where(valid, torch.log(s_tot) - ez_rel, torch.zeros_like(lse))
    return logp, ent, lse, big_m + ez_rel


# d weight summed over several token chunks, always in fp32 (the products are never rounded to
# the input dtype; the sum is rounded once, at the end):
#   "fp32-mm": CUDA, 16-bit inputs: each chunk's product by a 16-bit cuBLAS GEMM with fp32
#       output, torch.mm(a, b, out_dtype=torch.float32) (documented: "Supported only on CUDA
#       and for torch.float32 given torch.float16/torch.bfloat16 input dtypes"), added into the
#       fp32 accumulator. Not torch.addmm(acc, a, b, out_dtype=...): its CUDA implementation
#       has required `input` (acc) in the 16-bit dtype of mat1/mat2 in some releases, and the
#       earlier fallback for that rounded every chunk's product to bf16.
#   "fp32-cast-addmm": CPU (no 16-bit -> fp32 GEMM there) or CUDA where mm(out_dtype=) raised:
#       acc.addmm_ of the operands cast to fp32 (exact, slower).
#   "fp32-addmm": fp32 inputs: acc.addmm_.
# One chunk needs no accumulation: "single-chunk-native", one GEMM in the input dtype (cuBLAS
# accumulates in fp32 and rounds once).
_MM_OUT_DTYPE_ERROR: list[str] = []  # why torch.mm(out_dtype=fp32) failed on CUDA, if it did
_LAST_BACKWARD: dict = {}


def backward_info() -> dict:
    """How the last backward ran: {"dw_accumulation": "single-chunk-native" | "fp32-mm" |
    "fp32-cast-addmm" | "fp32-addmm" | "none" (no d weight asked) | "torch-reference" (the
    backend="auto" fallback ran it), "chunks": int (token chunks of dx; 0 for the reference),
    "chunk_tokens": int, "dx_dtype": str (dtype of the dlogits chunk)}; {} before any."""
    return dict(_LAST_BACKWARD)


def _record_backward(path: str, chunks: int, chunk_tokens: int, dx_dtype: str) -> None:
    _LAST_BACKWARD.clear()
    _LAST_BACKWARD.update(dw_accumulation=path, chunks=chunks, chunk_tokens=chunk_tokens,
                          dx_dtype=dx_dtype)


def _dw_path(acc: torch.Tensor, dtype: torch.dtype) -> str:
    if dtype == torch.float32:
        return "fp32-addmm"
    return "fp32-mm" if acc.is_cuda and not _MM_OUT_DTYPE_ERROR else "fp32-cast-addmm"


def _accumulate_dw(acc: torch.Tensor, dx: torch.Tensor, h: torch.Tensor) -> str:
    """acc [V, H] fp32 += dx.T @ h (dx [n, V], h [n, H] in the input dtype), in fp32, a vocab
    slice at a time (fp32 temporaries <= _DW_SLICE_BYTES). Returns the path that ran."""
    path = _dw_path(acc, dx.dtype)
    if path == "fp32-addmm":
        acc.addmm_(dx.t(), h)
        return path
    rows = max(1, _DW_SLICE_BYTES // (4 * max(acc.shape[1], dx.shape[0])))
    h32 = None  # [n, H] fp32, made on the first slice that needs it
    for v0 in range(0, acc.shape[0], rows):
        part = dx[:, v0:v0 + rows].t()  # [rows, n]
        if path == "fp32-mm":
            try:
                acc[v0:v0 + rows].add_(torch.mm(part, h, out_dtype=torch.float32))  # [rows, H]
                continue
            except (RuntimeError, TypeError, NotImplementedError) as err:  # acc is untouched
                _mm_out_dtype_failed(err)
                path = "fp32-cast-addmm"
        h32 = h.float() if h32 is None else h32
        acc[v0:v0 + rows].addmm_(part.float(), h32)
    return path


def _mm_out_dtype_failed(err: BaseException) -> None:
    _MM_OUT_DTYPE_ERROR.append(f"{type(err).__name__}: {err}"[:300])
    warnings.warn(f"tao_fast linear_logprob: torch.mm(out_dtype=torch.float32) failed on CUDA "
                  f"({_MM_OUT_DTYPE_ERROR[0]}); d weight now accumulates from fp32 casts "
                  f"(slower, as exact)", RuntimeWarning, stacklevel=3)


def _chunking(T: int, V: int, dtype: torch.dtype, block_t: int) -> int:
    """Tokens per dx chunk: a multiple of the token block, dx [chunk, V] <= _DX_CHUNK_BYTES."""
    rows = _DX_CHUNK_BYTES // (V * dtype.itemsize) // block_t * block_t
    return min(T, max(block_t, rows))


def _backward(hidden, weight, targets, lse, ez, g_lp, g_ent, inv_temp, want_h, want_w):
    T, H = hidden.shape
    V = weight.shape[0]
    cfg = _constexprs(configs(hidden.dtype)[1], hidden)
    chunk = _chunking(T, V, hidden.dtype, cfg["BLOCK_T"])
    n_chunks = triton.cdiv(T, chunk)
    dx = empty(chunk, V, dtype=hidden.dtype, device=hidden.device)  # [C, V]
    dh = empty(T, H, dtype=hidden.dtype, device=hidden.device) if want_h else None  # [T, H]
    acc = torch.zeros(V, H, dtype=torch.float32, device=hidden.device) \
        if want_w and n_chunks > 1 else None  # [V, H] fp32
    dw, path = None, "single-chunk-native" if want_w else "none"
    with_ent = g_ent is not None
    for c0 in range(0, T, chunk):
        c1 = min(T, c0 + chunk)
        n = c1 - c0
        h_c = hidden[c0:c1]  # [n, H]
        grid = (triton.cdiv(n, cfg["BLOCK_T"]), triton.cdiv(V, cfg["BLOCK_V"]))
        _dlogits_kernel[grid](
            h_c, weight, targets[c0:c1], lse[c0:c1], ez[c0:c1] if with_ent else lse,
            g_lp[c0:c1], g_ent[c0:c1] if with_ent else g_lp, dx, n, V, H,
            hidden.stride(0), weight.stride(0), dx.stride(0), inv_temp, WITH_ENT=with_ent, **cfg)
        dx_c = dx[:n]  # [n, V]
        if want_h:
            torch.mm(dx_c, weight, out=dh[c0:c1])  # [n, H]
        if acc is not None:
            path = _accumulate_dw(acc, dx_c, h_c)
        elif want_w:
            dw = torch.mm(dx_c.t(), h_c)  # [V, H], one chunk
    if acc is not None:
        dw = acc.to(weight.dtype)
    _record_backward(path, n_chunks, chunk, str(dx.dtype).removeprefix("torch."))
    return dh, dw


def _variant(hidden: torch.Tensor, with_ent: bool) -> tuple:
    return (str(hidden.dtype).removeprefix("torch."), f"entropy={bool(with_ent)}")


class LinearLogprobFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, return_entropy, fallback):
        inv_temp = 1.0 / temperature
        logp, ent, lse, ez = _forward(hidden, weight, targets, inv_temp, return_entropy)
        ctx.save_for_backward(hidden, weight, targets, lse, ez)
        ctx.temperature, ctx.fallback, ctx.with_ent = temperature, fallback, return_entropy
        # an output the loss does not use arrives as None, not zeros: the learner reads the
        # entropy as a metric only, and the backward then skips the entropy-gradient terms
        ctx.set_materialize_grads(False)
        return logp, ent

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        hidden, weight, targets, lse, ez = ctx.saved_tensors
        want_h, want_w = ctx.needs_input_grad[:2]
        if not (want_h or want_w):
            return None, None, None, None, None, None
        g_lp = torch.zeros_like(lse) if g_lp is None else g_lp.float().contiguous()
        if g_ent is not None:
            g_ent = g_ent.float().contiguous()

        def ref(h, w):
            return reference.linear_logprob(h, w, targets, ctx.temperature, ctx.with_ent)

        def ref_grads():
            _record_backward("torch-reference", 0, 0, "none")
            return reference_grads(ref, (hidden, weight), (want_h, want_w), (g_lp, g_ent))

        dh, dw = run_or_fallback(
            _OP, _variant(hidden, ctx.with_ent), ctx.fallback,
            lambda: _backward(hidden, weight, targets, lse, ez, g_lp, g_ent,
                              1.0 / ctx.temperature, want_h, want_w), ref_grads)
        return dh, dw, None, None, None, None


def unsupported_reason(hidden: torch.Tensor) -> str | None:
    """None when the kernels cover hidden's dtype, else why not (one line)."""
    if hidden.dtype not in DTYPES:
        return f"hidden must be bf16, fp16 or fp32, got {hidden.dtype}"
    return None


def _check_inputs(hidden, weight, targets, temperature):
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden [T, H] and weight [V, H] expected, got {tuple(hidden.shape)} "
                         f"and {tuple(weight.shape)}")
    if targets.dim() != 1 or targets.shape[0] != hidden.shape[0]:
        raise ValueError(f"targets must be [T]={hidden.shape[0]}, got {tuple(targets.shape)}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight dtype {weight.dtype} != hidden dtype {hidden.dtype}")
    if targets.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"targets must be int32 or int64, got {targets.dtype}")
    if not (hidden.device == weight.device == targets.device):
        raise ValueError(f"hidden, weight, targets on different devices: {hidden.device}, "
                         f"{weight.device}, {targets.device}")
    check_device(_OP, hidden)
    for name, x in (("hidden", hidden), ("weight", weight)):
        if x.shape[1] > 1 and x.stride(1) != 1:
            raise ValueError(f"{name} must have unit stride along H, got strides {x.stride()}: "
                             f"call .contiguous()")
    if weight.shape[0] == 0 or hidden.shape[1] == 0:
        raise ValueError(f"empty vocab or hidden size: weight {tuple(weight.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def linear_logprob(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                   temperature: float = 1.0, return_entropy: bool = False,
                   fallback: bool = False):
    """hidden [T, H], weight [V, H] (same dtype: bf16/fp16/fp32, unit stride in H), targets [T]
    int32/int64 in [0, V) or -100 (ignored: logp 0, entropy 0, no gradient; any other
    out-of-range target gives NaN). Returns logp [T] fp32 and entropy [T] fp32 or None.
    Differentiable w.r.t. hidden and weight (grads in their dtype); deterministic.
    fallback=True (ops' backend="auto"): where a kernel cannot compile or launch, or the dtype
    is not covered, the torch reference computes it (forward or backward) after one warning
    per reason; fallback=False raises instead."""
    _check_inputs(hidden, weight, targets, temperature)
    if hidden.shape[0] == 0:  # like the reference: empty, not connected to the graph
        empty_ = hidden.new_zeros(0, dtype=torch.float32)
        return empty_, (empty_.clone() if return_entropy else None)
    targets = targets.contiguous()

    def ref():  # its backward is torch autograd's: backward_info says so from here on
        _record_backward("torch-reference", 0, 0, "none")
        return reference.linear_logprob(hidden, weight, targets, temperature, return_entropy)

    return run_or_fallback(
        _OP, _variant(hidden, return_entropy), fallback,
        lambda: LinearLogprobFunction.apply(hidden, weight, targets, float(temperature),
                                            bool(return_entropy), fallback),
        ref, unsupported=unsupported_reason(hidden))
