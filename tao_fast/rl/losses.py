"""The losses beside the token-level PPO clip (that one is `tao_fast.ops.pg_loss`, a kernel):
GSPO's sequence-level clip and best-of-N SFT's log-likelihood. Plain torch: their work is
elementwise over [T] plus one segment sum, small next to the forward that made `logp`.

Every tensor is packed [T] (the sequences of a micro-batch one after another, as
tao_fast.rl.packing lays them out) with cu_seqlens int [B+1]; `mask` is 1 on the response tokens
that count. Gradients flow to `logp` only. Each returns (loss [], stats of 0-dim tensors) with no
host sync.
"""
from __future__ import annotations

import torch


def segment_mean(x: torch.Tensor, mask: torch.Tensor, cu_seqlens: torch.Tensor):
    """Per-sequence masked mean of x [T] -> (means [B], has_tokens [B] bool)."""
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()  # [B]
    sid = torch.repeat_interleave(torch.arange(lens.numel(), device=x.device), lens)  # [T]
    m = mask.to(x.dtype)
    sums = torch.zeros(lens.numel(), dtype=x.dtype, device=x.device).index_add(0, sid, x * m)
    cnts = torch.zeros(lens.numel(), dtype=x.dtype, device=x.device).index_add(0, sid, m)
    return sums / cnts.clamp(min=1.0), cnts > 0


def gspo_loss(logp, old_logp, advantages, mask, cu_seqlens, *, clip_low: float,
              clip_high: float, sampler_logp=None, tis_cap: float | None = None,
              weight_norm: float | None = None):
    """GSPO (Zheng et al. 2025, eq. 5-7): one importance ratio per sequence,
        s_i = exp(mean_t (logp - old_logp))          (length-normalised)
        l_i = max(-A_i s_i, -A_i clamp(s_i, 1 - clip_low, 1 + clip_high))
    and the loss is the mean of l_i over the sequences with counted tokens, or their sum over
    `weight_norm` when given (a micro-batch of a larger batch: the batch's sequence count).
    A_i is the sequence's advantage (advantages [T] is constant along a sequence; its first
    counted token's value is used). With sampler_logp, l_i is weighted by the sequence-level
    truncated importance weight min(exp(mean_t (old_logp - sampler_logp)), tis_cap).
    Stats: clip_frac (share of sequences clipped), ratio_mean, ratio_max (of s_i), kl (0)."""
    lp = logp.float()  # [T]
    log_ratio, has = segment_mean(lp - old_logp.float().detach(), mask, cu_seqlens)  # [B]
    adv, _ = segment_mean(advantages.float().detach(), mask, cu_seqlens)  # [B]
    s = torch.exp(log_ratio)  # [B]
    l1 = -adv * s
    l2 = -adv * torch.clamp(s, 1.0 - clip_low, 1.0 + clip_high)
    per_seq = torch.maximum(l1, l2)  # [B]
    if sampler_logp is not None:
        lw, _ = segment_mean(old_logp.float() - sampler_logp.float(), mask, cu_seqlens)
        w = torch.exp(lw.detach())
        per_seq = per_seq * (w if tis_cap is None else w.clamp(max=tis_cap))
    h = has.float()
    n = h.sum().clamp(min=1.0)
    loss = (per_seq * h).sum() / (weight_norm if weight_norm else n)
    with torch.no_grad():
        sd = s.detach()
        stats = {"clip_frac": ((l2 > l1).float() * h).sum() / n,
                 "ratio_mean": (sd * h).sum() / n,
                 "ratio_max": torch.where(has, sd, torch.zeros_like(sd)).max(),
                 "kl": torch.zeros((), device=lp.device)}
    return loss, stats


def sft_loss(logp, mask, *, agg: str = "token-mean", loss_norm: float | None = None,
             cu_seqlens=None):
    """Negative log-likelihood of the counted tokens (best-of-N SFT):
        token-mean            -sum(logp * m) / sum(m)
        token-sum-norm        -sum(logp * m) / loss_norm   (a micro-batch of a larger batch)
        seq-mean-token-mean   mean over sequences of each one's -mean_t logp
    Stats: nll (token-mean, whatever agg), and clip_frac / ratio_mean / ratio_max / kl as an
    on-policy step has them (0, 1, 1, 0), so every algorithm reports the same keys."""
    lp = logp.float()  # [T]
    m = mask.float()  # [T]
    n_tok = m.sum().clamp(min=1.0)
    if agg == "token-mean":
        loss = -(lp * m).sum() / n_tok
    elif agg == "token-sum-norm":
        if not loss_norm:
            raise ValueError("agg='token-sum-norm' needs loss_norm > 0")
        loss = -(lp * m).sum() / loss_norm
    elif agg == "seq-mean-token-mean":
        means, has = segment_mean(-lp, mask, cu_seqlens)  # [B]
        loss = (means * has.float()).sum() / has.float().sum().clamp(min=1.0)
    else:
        raise ValueError(f"sft_loss: agg must be token-mean, token-sum-norm or "
                         f"seq-mean-token-mean, got {agg!r}")
    one, zero = torch.ones((), device=lp.device), torch.zeros((), device=lp.device)
    stats = {"nll": (-(lp.detach() * m).sum() / n_tok), "clip_frac": zero, "ratio_mean": one,
             "ratio_max": one, "kl": zero}
    return loss, stats
