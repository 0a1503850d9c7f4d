"""Each provider's loss on one micro-batch: the same clipped pg loss, token-summed and divided
by the step's response-token count, so micro-batches add up to a token mean."""
from __future__ import annotations

import torch

from learner.models import CLIP, liger_grpo_loss
from tao_fast import ops


def torch_pg_loss(logp, adv, mask, n_counted):
    """The pg formula of ops.pg_loss (old = logp.detach(), clip 0.2), token-sum / n_counted."""
    ratio = torch.exp(logp - logp.detach())
    pg = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - CLIP, 1 + CLIP))
    return (pg * mask).sum() / n_counted


def tao_loss(model, mb, n_counted):
    """The learner's path: packed forward, ops.linear_logprob, ops.pg_loss (model's backend)."""
    b = mb["batch"]
    hidden = model(b.input_ids, b.positions, b.cu_seqlens, b.max_seqlen)  # [T, H]
    logp = ops.linear_logprob(hidden, model.output_weight, mb["targets"],
                              backend=model.ops_backend)  # [T] fp32
    loss, _ = ops.pg_loss(logp, logp.detach(), mb["adv"], mb["mask"], clip_low=CLIP,
                          clip_high=CLIP, agg="token-sum-norm", loss_norm=float(n_counted),
                          backend=model.ops_backend)
    return loss


def eager_loss(model, mb, n_counted):
    logits = model(input_ids=mb["ids"], use_cache=False).logits  # [B, L, V]
    logp = torch.log_softmax(logits.float(), -1)  # [B, L, V] fp32
    logp = logp.gather(-1, mb["targets"].clamp(min=0)[..., None])[..., 0]  # [B, L]
    return torch_pg_loss(logp, mb["adv"][:, None], mb["mask"], n_counted)


def make_grpo_loss():
    """Liger's fused linear GRPO loss on the Liger-patched model's hidden states."""
    grpo = liger_grpo_loss()

    def loss_fn(model, mb, n_counted):
        hidden = model.model(input_ids=mb["ids"], use_cache=False).last_hidden_state  # [B, L, H]
        out = grpo(hidden, model.lm_head.weight, mb["targets"].clamp(min=0),
                   mb["mask"].float(), mb["adv"])
        loss = out[0] if isinstance(out, tuple) else out  # mean over this micro-batch's tokens
        return loss * (mb["n_counted"] / n_counted)
    return loss_fn
