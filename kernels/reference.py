"""Torch reference of every kernel: the spec, and the CPU fallback.

Each function here defines what the matching Triton kernel must compute. They are written for
clarity and bounded memory, not speed: `linear_logprob` walks the tokens in chunks so that no
[T, V] tensor is ever alive (autograd recomputes each chunk in the backward).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100

# Tokens per chunk in the reference linear_logprob: [1024, 49152] fp32 is 192 MiB, a tile the
# CPU handles well; smaller chunks cost more Python overhead than they save.
_LOGPROB_CHUNK = 1024


def _logprob_chunk(h, w, t, temperature: float, want_entropy: bool, entropy_grad: bool = True):
    logits = (h.float() @ w.float().t()) / temperature  # [C, V]
    lse = torch.logsumexp(logits, dim=-1)  # [C]
    valid = t != IGNORE_INDEX
    tgt = torch.where(valid, t, torch.zeros_like(t))
    logp = logits.gather(-1, tgt[:, None].long())[:, 0] - lse  # [C]
    logp = torch.where(valid, logp, torch.zeros_like(logp))
    if not want_entropy:
        return logp, None
    # entropy_grad=False (a metric): no graph through it, so the backward's recompute keeps no
    # [C, V] softmax and product alive (2 x 64 MiB at C=1024, V=16384)
    with torch.set_grad_enabled(torch.is_grad_enabled() and entropy_grad):
        p = torch.softmax(logits, dim=-1)
        ent = lse - (p * logits).sum(-1)  # H = lse - E_p[z]
        ent = torch.where(valid, ent, torch.zeros_like(ent))
    return logp, ent


def linear_logprob(hidden, weight, targets, temperature: float = 1.0, return_entropy: bool = False,
                   entropy_grad: bool = True):
    """log softmax((hidden @ weight.T) / temperature)[targets], optionally with the entropy.

    hidden [T, H], weight [V, H], targets [T] int (IGNORE_INDEX=-100 gives 0 and no gradient).
    Returns logp [T] fp32 and entropy [T] fp32 (or None; with entropy_grad=False it carries no
    gradient). Chunked over tokens with activation recomputation, so memory is O(chunk * V) in
    forward and backward.
    """
    T = hidden.shape[0]
    logps, ents = [], []
    for s in range(0, T, _LOGPROB_CHUNK):
        h, t = hidden[s:s + _LOGPROB_CHUNK], targets[s:s + _LOGPROB_CHUNK]
        if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
            lp, en = checkpoint(_logprob_chunk, h, weight, t, temperature, return_entropy,
                                entropy_grad, use_reentrant=False)
        else:
            lp, en = _logprob_chunk(h, weight, t, temperature, return_entropy, entropy_grad)
        logps.append(lp)
        ents.append(en)
    logp = torch.cat(logps) if logps else hidden.new_zeros(0, dtype=torch.float32)
    if not return_entropy:
        return logp, None
    ent = torch.cat(ents) if ents else hidden.new_zeros(0, dtype=torch.float32)
    return logp, ent


AGG_MODES = ("token-mean", "seq-mean-token-mean", "token-sum-norm")
KL_ESTIMATORS = ("k1", "k3")


def check_pg_loss_args(agg: str, kl_estimator: str, loss_norm, dual_clip) -> None:
    """The option checks every pg_loss implementation shares."""
    if agg not in AGG_MODES:
        raise ValueError(f"agg must be one of {AGG_MODES}, got {agg!r}")
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {kl_estimator!r}")
    if agg == "token-sum-norm" and not loss_norm:
        raise ValueError("agg='token-sum-norm' needs loss_norm > 0")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")


def _seq_ids(shape, cu_seqlens, device):
    """Sequence index of every token: rows for [B, L], cu_seqlens segments for packed [T]."""
    if len(shape) == 2:
        B, L = shape
        return torch.arange(B, device=device)[:, None].expand(B, L), B
    if cu_seqlens is None:
        raise ValueError("agg='seq-mean-token-mean' on packed [T] tensors needs cu_seqlens")
    lens = cu_seqlens[1:] - cu_seqlens[:-1]
    B = lens.numel()
    return torch.repeat_interleave(torch.arange(B, device=device), lens.long()), B


def pg_loss(logp, old_logp, advantages, mask, *, ref_logp=None, kl_coef: float = 0.0,
            kl_estimator: str = "k3", clip_low: float = 0.2, clip_high: float = 0.2,
            dual_clip: float | None = None, sampler_logp=None, tis_cap: float | None = None,
            agg: str = "token-mean", cu_seqlens=None, loss_norm: float | None = None):
    """Clipped policy-gradient loss with optional KL, dual clip and truncated importance sampling.

    All per-token tensors share one shape: packed [T] or padded [B, L]. `mask` is 1 for tokens
    that count. Per token:
        ratio = exp(logp - old_logp)
        pg    = max(-A * ratio, -A * clamp(ratio, 1 - clip_low, 1 + clip_high))
        dual clip (c > 1, A < 0 only): pg = min(pg, -A * c)
        TIS:  pg *= min(exp(old_logp - sampler_logp), tis_cap)      (a constant weight)
        KL:   k1 = logp - ref_logp;  k3 = exp(ref_logp - logp) - (ref_logp - logp) - 1
        l     = pg + kl_coef * kl
    Aggregation: token-mean = sum(l * m) / sum(m); seq-mean-token-mean = mean over sequences
    (with at least one counted token) of each sequence's token mean; token-sum-norm =
    sum(l * m) / loss_norm (Dr.GRPO: a constant, e.g. max response length x sequences).

    Gradient flows to `logp` only. Returns (loss [], stats): clip_frac, ratio_mean, ratio_max,
    kl (masked mean of the chosen estimator; 0 when no ref_logp), all 0-dim fp32 tensors, with
    no host sync.
    """
    check_pg_loss_args(agg, kl_estimator, loss_norm, dual_clip)
    m = mask.to(torch.float32)
    logp32 = logp.float()
    old = old_logp.float().detach()
    adv = advantages.float().detach()
    log_ratio = logp32 - old
    ratio = torch.exp(log_ratio)
    pg1 = -adv * ratio
    pg2 = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    pg = torch.maximum(pg1, pg2)
    clipped = (pg2 > pg1).float()
    if dual_clip is not None:
        pg = torch.where(adv < 0, torch.minimum(pg, -adv * dual_clip), pg)
    if sampler_logp is not None:
        w = torch.exp(old - sampler_logp.float().detach())
        if tis_cap is not None:
            w = torch.clamp(w, max=tis_cap)
        pg = pg * w
    if ref_logp is not None:
        d = ref_logp.float().detach() - logp32
        kl = -d if kl_estimator == "k1" else torch.exp(d) - d - 1.0
        per_tok = pg + kl_coef * kl
    else:
        kl = torch.zeros_like(pg)
        per_tok = pg

    n_tok = m.sum().clamp(min=1.0)
    if agg == "token-mean":
        loss = (per_tok * m).sum() / n_tok
    elif agg == "token-sum-norm":
        loss = (per_tok * m).sum() / loss_norm
    else:
        sid, B = _seq_ids(per_tok.shape, cu_seqlens, per_tok.device)
        sums = torch.zeros(B, device=per_tok.device).index_add_(0, sid.reshape(-1),
                                                               (per_tok * m).reshape(-1))
        cnts = torch.zeros(B, device=per_tok.device).index_add_(0, sid.reshape(-1), m.reshape(-1))
        has = (cnts > 0).float()
        loss = (sums / cnts.clamp(min=1.0) * has).sum() / has.sum().clamp(min=1.0)

    with torch.no_grad():
        r = ratio.detach()
        stats = {
            "clip_frac": (clipped * m).sum() / n_tok,
            "ratio_mean": (r * m).sum() / n_tok,
            "ratio_max": torch.where(m > 0, r, torch.zeros_like(r)).max() if r.numel() else r.new_zeros(()),
            "kl": (kl.detach() * m).sum() / n_tok,
        }
    return loss, stats


def varlen_attention(q, k, v, cu_seqlens, max_seqlen: int, causal: bool = True, scale=None):
    """Attention over packed sequences: nothing crosses a sequence boundary.

    q [T, Hq, D], k/v [T, Hkv, D] with Hq % Hkv == 0 (GQA), cu_seqlens int32 [B+1].
    Returns out [T, Hq, D] in q's dtype. Runs each sequence through torch SDPA.
    """
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    if Hq % Hkv:
        raise ValueError(f"Hq={Hq} must be a multiple of Hkv={Hkv}")
    rep = Hq // Hkv
    bounds = cu_seqlens.tolist()
    outs = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        if e == s:
            continue
        qs = q[s:e].transpose(0, 1)  # [Hq, L, D]
        ks = k[s:e].transpose(0, 1).repeat_interleave(rep, 0)  # [Hq, L, D]
        vs = v[s:e].transpose(0, 1).repeat_interleave(rep, 0)
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=scale)
        outs.append(o.transpose(0, 1))  # [L, Hq, D]
    return torch.cat(outs, 0) if outs else torch.zeros_like(q)
