"""In-house Llama-family decoder for the learner and the torch rollout engine.

Weights are kept in vLLM's fused layout (qkv_proj = [q; k; v], gate_up_proj = [gate; up]), so the
same tensors can back a colocated vLLM engine; `tao_fast.models.loader` maps HF names to it.

Two forward paths share every weight:
- `forward`: packed sequences (no padding), input_ids [T] with cu_seqlens; attention goes through
  `tao_fast.ops.varlen_attention`. The learner and parity tests use it.
- `forward_cached`: a padded batch [B, L] writing into a KV cache; the rollout engine uses it.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from tao_fast import ops
from tao_fast.models.config import ModelArgs, rope_inv_freq


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x, cos, sin):
    """x [..., heads, D]; cos/sin [..., D] broadcast over heads."""
    return x * cos.unsqueeze(-2) + rotate_half(x) * sin.unsqueeze(-2)


class KVCache:
    """Per-layer K/V buffers [B, Hkv, S_max, D] for a padded batch; `length` slots are filled."""

    def __init__(self, args: ModelArgs, batch: int, max_len: int, dtype, device):
        shape = (batch, args.num_kv_heads, max_len, args.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.num_layers)]
        self.length = 0

    def index_select(self, rows: torch.Tensor) -> None:
        """Keep only `rows` of the batch (drop finished sequences)."""
        self.k = [k.index_select(0, rows) for k in self.k]
        self.v = [v.index_select(0, rows) for v in self.v]

    def repeat_interleave(self, n: int) -> None:
        """Each row becomes n rows: one prompt prefill serves its n candidates."""
        self.k = [k.repeat_interleave(n, 0) for k in self.k]
        self.v = [v.repeat_interleave(n, 0) for v in self.v]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.nh, self.nkv, self.hd = args.num_heads, args.num_kv_heads, args.head_dim
        self.qkv_proj = nn.Linear(args.hidden_size, args.qkv_dim, bias=args.qkv_bias)
        self.o_proj = nn.Linear(self.nh * self.hd, args.hidden_size, bias=False)

    def _qkv(self, x, cos, sin):
        qkv = self.qkv_proj(x)  # [..., (nh + 2 nkv) hd]
        q, k, v = qkv.split([self.nh * self.hd, self.nkv * self.hd, self.nkv * self.hd], -1)
        q = apply_rotary(q.unflatten(-1, (self.nh, self.hd)), cos, sin)  # [..., nh, hd]
        k = apply_rotary(k.unflatten(-1, (self.nkv, self.hd)), cos, sin)  # [..., nkv, hd]
        return q, k, v.unflatten(-1, (self.nkv, self.hd))

    def forward(self, x, cos, sin, cu_seqlens, max_seqlen, backend):
        q, k, v = self._qkv(x, cos, sin)  # [T, nh|nkv, hd]
        o = ops.varlen_attention(q, k, v, cu_seqlens, max_seqlen, causal=True, backend=backend)
        return self.o_proj(o.flatten(-2))  # [T, H]

    def forward_cached(self, x, cos, sin, cache: KVCache, layer: int, mask):
        B, L, _ = x.shape
        q, k, v = self._qkv(x, cos, sin)  # [B, L, heads, hd]
        s, e = cache.length, cache.length + L
        cache.k[layer][:, :, s:e] = k.transpose(1, 2)
        cache.v[layer][:, :, s:e] = v.transpose(1, 2)
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), cache.k[layer][:, :, :e], cache.v[layer][:, :, :e],
            attn_mask=mask, enable_gqa=True)  # [B, nh, L, hd]
        return self.o_proj(o.transpose(1, 2).flatten(-2))  # [B, L, H]


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_up_proj = nn.Linear(args.hidden_size, 2 * args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MLP(args)


class Transformer(nn.Module):
    # model.lora's config once tao_fast.models.lora.apply_lora put adapters on it; None: plain
    lora_config = None

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = None if args.tie_word_embeddings else nn.Linear(
            args.hidden_size, args.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(args), persistent=False)
        self.ops_backend = "auto"  # for tao_fast.ops; the trainer sets it from the config
        self.gradient_checkpointing = False

    def _apply(self, fn, *args, **kwargs):
        """.to() / .cuda() / .bfloat16() keep the rotary frequencies in fp32, recomputed:
        rounded to bf16 they are off by up to 0.33%, 2.8 rad of angle at position 2000."""
        out = super()._apply(fn, *args, **kwargs)
        self.inv_freq = rope_inv_freq(self.args).to(self.inv_freq.device)
        return out

    @property
    def output_weight(self) -> torch.Tensor:
        """[V, H]: lm_head weight, or the embedding when tied."""
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def rotary(self, positions):
        freqs = positions.float()[..., None] * self.inv_freq  # [..., D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [..., D]
        dtype = self.embed_tokens.weight.dtype
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def _block(self, blk, x, cos, sin, cu_seqlens, max_seqlen):
        h = x + blk.self_attn(blk.input_layernorm(x), cos, sin, cu_seqlens, max_seqlen,
                              self.ops_backend)
        return h + blk.mlp(blk.post_attention_layernorm(h))

    def forward(self, input_ids, positions, cu_seqlens, max_seqlen: int):
        """Packed forward. input_ids/positions [T] (positions restart at 0 in each sequence),
        cu_seqlens int32 [B+1]. Returns the final-normed hidden states [T, H]."""
        x = self.embed_tokens(input_ids)  # [T, H]
        cos, sin = self.rotary(positions)  # [T, D]
        for blk in self.layers:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(self._block, blk, x, cos, sin, cu_seqlens,
                                                      max_seqlen, use_reentrant=False)
            else:
                x = self._block(blk, x, cos, sin, cu_seqlens, max_seqlen)
        return self.norm(x)

    def forward_cached(self, input_ids, positions, cache: KVCache, key_mask):
        """Padded forward through the KV cache. input_ids/positions [B, L]; key_mask [B, S] bool
        marks real (non-pad) cache slots 0..S-1 with S = cache.length + L. Returns hidden
        [B, L, H] and advances cache.length by L."""
        B, L = input_ids.shape
        S = cache.length + L
        causal = torch.ones(L, S, dtype=torch.bool, device=input_ids.device).tril(S - L)
        # A pad query would see no key at all (softmax of nothing is NaN, and NaN K/V in the
        # cache poison real rows through 0 * NaN): let every query see its own slot.
        diag = torch.ones(L, S, dtype=torch.bool, device=input_ids.device).tril(S - L).triu(S - L)
        mask = ((causal[None] & key_mask[:, None, :S]) | diag[None])[:, None]  # [B, 1, L, S]
        x = self.embed_tokens(input_ids)  # [B, L, H]
        cos, sin = self.rotary(positions)  # [B, L, D]
        for i, blk in enumerate(self.layers):
            x = x + blk.self_attn.forward_cached(blk.input_layernorm(x), cos, sin, cache, i, mask)
            x = x + blk.mlp(blk.post_attention_layernorm(x))
        cache.length = S
        return self.norm(x)

    def logits(self, hidden):
        """[..., H] -> [..., V]. Only for small slices (a decode step, a test)."""
        return hidden @ self.output_weight.t()
