"""Public ops: each picks the Triton kernel or the torch reference.

backend="auto" picks Triton when the tensors are on CUDA (or when TRITON_INTERPRET=1, where
the Triton interpreter runs on CPU tensors), the torch reference otherwise; where a kernel then
cannot compile or launch (out of shared memory, a compile error) or does not cover the inputs
(a head dim, a dtype), "auto" runs the torch reference after one RuntimeWarning per op and
reason. "triton" and "torch" force one: "triton" raises instead (benchmarks use it, so a
fallback never passes for a kernel timing); asking for Triton where it is not installed is an
error that says so.
Each op runs inside a named range, `tao_fast.<op>` (tao_fast.profiling.trace.phase), so
`tao-fast profile` and Nsight Systems show it by name.
"""
from __future__ import annotations

import functools
import importlib.util

import torch

from tao_fast.kernels import reference
from tao_fast.kernels.utils import interpreting
from tao_fast.profiling.trace import phase

BACKENDS = ("auto", "triton", "torch")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve_backend(backend: str, *tensors: torch.Tensor) -> str:
    """'triton' or 'torch' for these tensors."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' but triton is not installed: pip install triton")
        on_cuda = all(t.is_cuda for t in tensors)
        if not on_cuda and not interpreting():
            raise RuntimeError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 "
                               "(the Triton interpreter); use backend='torch' or move to CUDA")
        return "triton"
    on_cuda = all(t.is_cuda for t in tensors)
    if triton_available() and (on_cuda or interpreting()):
        return "triton"
    return "torch"


def _named(fn):
    """Run the op inside the range tao_fast.<name> (record_function; NVTX on CUDA)."""
    name = f"tao_fast.{fn.__name__}"

    @functools.wraps(fn)
    def op(*args, **kwargs):
        with phase(name):
            return fn(*args, **kwargs)
    return op


@_named
def linear_logprob(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                   temperature: float = 1.0, return_entropy: bool = False,
                   entropy_grad: bool = True, backend: str = "auto"):
    """Log-probability of `targets` under softmax((hidden @ weight.T) / temperature).

    hidden [T, H] (bf16/fp16/fp32), weight [V, H], targets [T] int64/int32; -100 marks an
    ignored token (logp 0, no gradient). Returns logp [T] fp32, and entropy [T] fp32 of the
    same distribution when return_entropy=True. Differentiable w.r.t. hidden and weight (the
    entropy too, unless entropy_grad=False: a metric, which then costs the backward nothing);
    never holds a [T, V] tensor beyond one tile/chunk.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden [T, H] and weight [V, H] expected, got {tuple(hidden.shape)} "
                         f"and {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must be [T]={hidden.shape[0]}, got {tuple(targets.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if resolve_backend(backend, hidden, weight) == "triton":
        from tao_fast.kernels.linear_logprob import linear_logprob as kernel
        logp, ent = kernel(hidden, weight, targets, temperature=temperature,
                           return_entropy=return_entropy, fallback=backend == "auto")
        if ent is not None and not entropy_grad:
            ent = ent.detach()  # the kernel's backward then gets no entropy gradient
    else:
        logp, ent = reference.linear_logprob(hidden, weight, targets, temperature=temperature,
                                             return_entropy=return_entropy,
                                             entropy_grad=entropy_grad)
    return (logp, ent) if return_entropy else logp


@_named
def pg_loss(logp, old_logp, advantages, mask, *, ref_logp=None, kl_coef: float = 0.0,
            kl_estimator: str = "k3", clip_low: float = 0.2, clip_high: float = 0.2,
            dual_clip: float | None = None, sampler_logp=None, tis_cap: float | None = None,
            agg: str = "token-mean", cu_seqlens=None, loss_norm: float | None = None,
            backend: str = "auto"):
    """Clipped policy-gradient loss -> (loss [], stats dict of 0-dim tensors).

    Per-token tensors: packed [T] or [B, L], all the same shape. See
    `tao_fast.kernels.reference.pg_loss` for the exact definition of every mode.
    """
    shapes = {t.shape for t in (logp, old_logp, advantages, mask) if t is not None}
    for t in (ref_logp, sampler_logp):
        if t is not None:
            shapes.add(t.shape)
    if len(shapes) != 1:
        raise ValueError(f"pg_loss tensors must share one shape, got {sorted(map(tuple, shapes))}")
    kw = dict(ref_logp=ref_logp, kl_coef=kl_coef, kl_estimator=kl_estimator, clip_low=clip_low,
              clip_high=clip_high, dual_clip=dual_clip, sampler_logp=sampler_logp,
              tis_cap=tis_cap, agg=agg, cu_seqlens=cu_seqlens, loss_norm=loss_norm)
    if resolve_backend(backend, logp) == "triton":
        from tao_fast.kernels.pg_loss import pg_loss as kernel
        return kernel(logp, old_logp, advantages, mask, **kw, fallback=backend == "auto")
    return reference.pg_loss(logp, old_logp, advantages, mask, **kw)


@_named
def varlen_attention(q, k, v, cu_seqlens, max_seqlen: int, *, causal: bool = True, scale=None,
                     backend: str = "auto"):
    """Causal attention over packed sequences with GQA.

    q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D], Hq % Hkv == 0; cu_seqlens int32 [B+1] with
    cu_seqlens[0] = 0 and cu_seqlens[-1] = T; max_seqlen the longest sequence. Returns
    out [T, Hq, D]. Differentiable w.r.t. q, k, v.
    """
    if q.dim() != 3 or k.shape != v.shape or k.shape[0] != q.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"q [T, Hq, D], k/v [T, Hkv, D] expected, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"Hq={q.shape[1]} must be a multiple of Hkv={k.shape[1]}")
    if resolve_backend(backend, q, k, v) == "triton":
        from tao_fast.kernels.attention import varlen_attention as kernel
        return kernel(q, k, v, cu_seqlens, max_seqlen, causal=causal, scale=scale,
                      fallback=backend == "auto")
    return reference.varlen_attention(q, k, v, cu_seqlens, max_seqlen, causal=causal, scale=scale)
