"""Fused clipped policy-gradient loss (PPO/GRPO family) with KL, dual clip and TIS.

Spec: `reference.pg_loss` (same keywords, same numbers). One Triton kernel makes a single pass
over the per-token tensors and writes, per token, d(l * m)/d logp (and l * m when a per-sequence
mean is needed), plus one row of partial sums per block:
    [sum m, sum l*m, sum clipped*m, sum ratio*m, max(ratio where m > 0, else 0), sum kl*m].
The partial rows are reduced by torch in a fixed order (deterministic, no atomics, no host sync).
seq-mean-token-mean adds a small per-sequence kernel (one program per sequence, sequences are
contiguous in both layouts). Backward: grad logp = grad_out * coef * saved per-token gradient,
coef = 1/n_tok, 1/loss_norm, or 1/(count of its sequence * counted sequences).

The per-token derivative mirrors torch autograd of the reference exactly, ties included:
maximum/minimum split the gradient half-half on ties, clamp passes it on its boundary.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tao_fast.kernels import reference
from tao_fast.kernels.reference import check_pg_loss_args
from tao_fast.kernels.utils import check_device, empty, run_or_fallback

_OP = "pg_loss"
# logp dtypes the offline compile test covers (the learner passes fp32); every per-token input
# is converted to fp32 as it is loaded, so any floating dtype works
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_N_PART = 6    # partial sums per block (see the module docstring)
# Tokens per program, num_warps: a memory-bound elementwise pass and a block reduction (timing
# unmeasured on GPU). Offline sm_90a compile (Triton 3.6 and 3.9,
# tests/kernels/test_sm90_compile.py): the pass 4,096 B of shared memory (reduction scratch),
# 54-72 registers; the per-sequence sum 16 B, 40 registers; 0 spills.
CONFIG = dict(BLOCK=1024, num_warps=4)
_BLOCK = CONFIG["BLOCK"]


@triton.jit
def _pg_fwd_kernel(logp_ptr, old_ptr, adv_ptr, mask_ptr, ref_ptr, samp_ptr,
                   gtok_ptr, ltok_ptr, part_ptr, N,
                   ratio_lo, ratio_hi, dual_clip, tis_cap, kl_coef,
                   HAS_REF: tl.constexpr, K3: tl.constexpr, HAS_DUAL: tl.constexpr,
                   HAS_TIS: tl.constexpr, HAS_CAP: tl.constexpr, WRITE_LOSS: tl.constexpr,
                   BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    logp = tl.load(logp_ptr + offs, mask=ok, other=0.0).to(tl.float32)  # [BLOCK]
    old = tl.load(old_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    adv = tl.load(adv_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    m = tl.load(mask_ptr + offs, mask=ok, other=0).to(tl.float32)
    ratio = tl.exp(logp - old)
    pg1 = -adv * ratio
    pg2 = -adv * tl.minimum(tl.maximum(ratio, ratio_lo), ratio_hi)  # torch.clamp
    inside = (ratio >= ratio_lo) & (ratio <= ratio_hi)  # clamp passes the gradient here
    d1 = -adv * ratio  # d pg1 / d logp
    d2 = tl.where(inside, d1, 0.0)
    clipped = pg2 > pg1
    pg = tl.maximum(pg1, pg2)
    d = tl.where(pg1 > pg2, d1, tl.where(clipped, d2, 0.5 * (d1 + d2)))
    if HAS_DUAL:  # A < 0 only: pg = min(pg, -A * c), the bound is constant in logp
        bound = -adv * dual_clip
        d = tl.where(adv < 0, tl.where(pg < bound, d, tl.where(pg > bound, 0.0, 0.5 * d)), d)
        pg = tl.where(adv < 0, tl.minimum(pg, bound), pg)
    if HAS_TIS:  # constant weight min(exp(old - sampler), cap)
        w = tl.exp(old - tl.load(samp_ptr + offs, mask=ok, other=0.0).to(tl.float32))
        if HAS_CAP:
            w = tl.minimum(w, tis_cap)
        pg = pg * w
        d = d * w
    kl = tl.zeros([BLOCK], dtype=tl.float32)
    if HAS_REF:
        dr = tl.load(ref_ptr + offs, mask=ok, other=0.0).to(tl.float32) - logp  # ref - logp
        if K3:
            kl = tl.exp(dr) - dr - 1.0
            d += kl_coef * (1.0 - tl.exp(dr))
        else:
            kl = -dr
            d += kl_coef
    loss = pg + kl_coef * kl  # [BLOCK]
    tl.store(gtok_ptr + offs, d * m, mask=ok)
    if WRITE_LOSS:
        tl.store(ltok_ptr + offs, loss * m, mask=ok)
    row = part_ptr + pid * 6  # _N_PART
    tl.store(row, tl.sum(m, 0))
    tl.store(row + 1, tl.sum(loss * m, 0))
    tl.store(row + 2, tl.sum(tl.where(clipped, 1.0, 0.0) * m, 0))
    tl.store(row + 3, tl.sum(ratio * m, 0))
    tl.store(row + 4, tl.max(tl.where(m > 0, ratio, 0.0), 0))
    tl.store(row + 5, tl.sum(kl * m, 0))


@triton.jit
def _seq_sum_kernel(ltok_ptr, mask_ptr, cu_ptr, out_ptr, BLOCK: tl.constexpr):
    """out[b] = (sum of l*m, sum of m) over tokens cu[b]..cu[b+1]: fixed order per sequence."""
    b = tl.program_id(0)
    start = tl.load(cu_ptr + b)
    end = tl.load(cu_ptr + b + 1)
    acc_l = tl.zeros([BLOCK], dtype=tl.float32)
    acc_m = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(start, end, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        ok = offs < end
        acc_l += tl.load(ltok_ptr + offs, mask=ok, other=0.0)
        acc_m += tl.load(mask_ptr + offs, mask=ok, other=0).to(tl.float32)
    tl.store(out_ptr + 2 * b, tl.sum(acc_l, 0))
    tl.store(out_ptr + 2 * b + 1, tl.sum(acc_m, 0))


def _flat(x):
    x = x.reshape(-1)
    if x.dtype == torch.bool:
        x = x.view(torch.uint8)
    return x.contiguous()


def _forward(logp, old, adv, mask, ref, samp, cu, cfg, need_grad):
    """-> loss [], stats (4 x []), saved per-token gradient [N] fp32 (already scaled)."""
    kl_coef, k3, clip_low, clip_high, dual_clip, tis_cap, agg, loss_norm = cfg
    N = logp.numel()
    seq = agg == "seq-mean-token-mean"
    dev = logp.device
    n_blk = max(1, triton.cdiv(N, _BLOCK))
    gtok = empty(N, dtype=torch.float32, device=dev)  # [N]
    ltok = empty(N if seq else 1, dtype=torch.float32, device=dev)  # [N] (or unused [1])
    if N == 0:
        part = torch.zeros(1, _N_PART, dtype=torch.float32, device=dev)
    else:
        part = empty(n_blk, _N_PART, dtype=torch.float32, device=dev)  # [n_blk, 6]
        _pg_fwd_kernel[(n_blk,)](
            _flat(logp), _flat(old), _flat(adv), _flat(mask),
            _flat(ref) if ref is not None else logp, _flat(samp) if samp is not None else logp,
            gtok, ltok, part, N, 1.0 - clip_low, 1.0 + clip_high,
            float(dual_clip or 0.0), float(tis_cap or 0.0), float(kl_coef),
            HAS_REF=ref is not None, K3=k3, HAS_DUAL=dual_clip is not None,
            HAS_TIS=samp is not None, HAS_CAP=tis_cap is not None, WRITE_LOSS=seq, **CONFIG)
    tot = part.sum(0)  # [6]
    n_tok = tot[0].clamp(min=1.0)
    stats = (tot[2] / n_tok, tot[3] / n_tok, part[:, 4].max(), tot[5] / n_tok)
    if agg == "token-mean":
        return tot[1] / n_tok, stats, gtok / n_tok if need_grad else None
    if agg == "token-sum-norm":
        return tot[1] / loss_norm, stats, gtok / loss_norm if need_grad else None
    if logp.dim() == 2:  # rows are sequences
        B, L = logp.shape
        cu = torch.arange(0, (B + 1) * L, L, dtype=torch.int32, device=dev)
    else:
        cu = cu.to(device=dev, dtype=torch.int32).contiguous()
    B = cu.numel() - 1
    seg = torch.zeros(B, 2, dtype=torch.float32, device=dev)  # [B, (sum l*m, sum m)]
    if B > 0 and N > 0:
        _seq_sum_kernel[(B,)](ltok, _flat(mask), cu, seg, **CONFIG)
    sums, cnts = seg.unbind(1)
    has = (cnts > 0).float()
    n_seq = has.sum().clamp(min=1.0)
    loss = (sums / cnts.clamp(min=1.0) * has).sum() / n_seq
    if not need_grad:
        return loss, stats, None
    coef = has / (cnts.clamp(min=1.0) * n_seq)  # [B]
    # sequence of every token (no host sync); tokens outside cu_seqlens get coefficient 0
    sid = torch.searchsorted(cu[1:], torch.arange(N, dtype=torch.int32, device=dev), right=True)
    coef = torch.cat([coef, coef.new_zeros(1)])[sid]  # [N]
    return loss, stats, gtok * coef


class PGLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, old, adv, mask, ref, samp, cu, cfg):
        loss, stats, gtok = _forward(logp, old, adv, mask, ref, samp, cu, cfg,
                                     ctx.needs_input_grad[0])
        ctx.save_for_backward(gtok)
        ctx.shape, ctx.dtype = logp.shape, logp.dtype
        ctx.mark_non_differentiable(*stats)
        return (loss, *stats)

    @staticmethod
    def backward(ctx, g_loss, *_):
        (gtok,) = ctx.saved_tensors
        if gtok is None or g_loss is None:
            return (None,) * 8
        g = (gtok * g_loss).to(ctx.dtype).view(ctx.shape)
        return (g,) + (None,) * 7


def _check_inputs(logp, agg, cu_seqlens, named):
    for name, t in named.items():
        if t is None:
            continue
        if t.shape != logp.shape or t.device != logp.device:
            raise ValueError(f"{name} is {tuple(t.shape)} on {t.device}; expected "
                             f"{tuple(logp.shape)} on {logp.device} like logp")
        if name != "mask" and not t.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor, got {t.dtype}")
    if logp.dim() not in (1, 2):
        raise ValueError(f"per-token tensors must be [T] or [B, L], got {tuple(logp.shape)}")
    check_device(_OP, logp)
    if agg == "seq-mean-token-mean" and logp.dim() == 1:
        if cu_seqlens is None:
            raise ValueError("agg='seq-mean-token-mean' on packed [T] tensors needs cu_seqlens")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
            raise ValueError(f"cu_seqlens must be [B+1], got {tuple(cu_seqlens.shape)}")


def pg_loss(logp, old_logp, advantages, mask, *, ref_logp=None, kl_coef: float = 0.0,
            kl_estimator: str = "k3", clip_low: float = 0.2, clip_high: float = 0.2,
            dual_clip: float | None = None, sampler_logp=None, tis_cap: float | None = None,
            agg: str = "token-mean", cu_seqlens=None, loss_norm: float | None = None,
            fallback: bool = False):
    """Per-token tensors: packed [T] (cu_seqlens int [B+1] for the per-sequence mean) or [B, L],
    all one shape and device; mask bool/int/float (float = weights, like the reference).
    Returns (loss [] fp32, stats dict of 0-dim fp32: clip_frac, ratio_mean, ratio_max, kl).
    Gradient flows to logp only (in logp's dtype). See `reference.pg_loss` for every mode.
    fallback=True (ops' backend="auto"): where a kernel cannot compile or launch, the torch
    reference computes it after one warning per reason; fallback=False raises instead."""
    check_pg_loss_args(agg, kl_estimator, loss_norm, dual_clip)
    named = dict(logp=logp, old_logp=old_logp, advantages=advantages, mask=mask,
                 ref_logp=ref_logp, sampler_logp=sampler_logp)
    _check_inputs(logp, agg, cu_seqlens, named)
    kw = dict(ref_logp=ref_logp, kl_coef=kl_coef, kl_estimator=kl_estimator, clip_low=clip_low,
              clip_high=clip_high, dual_clip=dual_clip, sampler_logp=sampler_logp,
              tis_cap=tis_cap, agg=agg, cu_seqlens=cu_seqlens, loss_norm=loss_norm)
    return run_or_fallback(_OP, (str(logp.dtype).removeprefix("torch."),), fallback,
                           lambda: _apply(logp, old_logp, advantages, mask, **kw),
                           lambda: reference.pg_loss(logp, old_logp, advantages, mask, **kw))


def _apply(logp, old_logp, advantages, mask, *, ref_logp, kl_coef, kl_estimator, clip_low,
           clip_high, dual_clip, sampler_logp, tis_cap, agg, cu_seqlens, loss_norm):
    cfg = (float(kl_coef), kl_estimator == "k3", float(clip_low), float(clip_high), dual_clip,
           tis_cap, agg, loss_norm)
    loss, clip_frac, ratio_mean, ratio_max, kl = PGLossFunction.apply(
        logp, old_logp.detach(), advantages.detach(), mask.detach(),
        None if ref_logp is None else ref_logp.detach(),
        None if sampler_logp is None else sampler_logp.detach(),
        cu_seqlens if logp.dim() == 1 else None, cfg)
    return loss, {"clip_frac": clip_frac, "ratio_mean": ratio_mean, "ratio_max": ratio_max,
                  "kl": kl}
