"""Memory accounting for the learner and the colocated rollout engine, and a GPU layout.

    python -m tao_fast.rl.memory --model llama-3-8b --gpus 8 --gpu-gb 80
    python -m tao_fast.rl.memory --config path/to/config.json --gpus 8 --gpu-gb 80

Bytes per GPU, per component (P parameters, S learner shards = FSDP degree, t = vLLM TP):
  master weights   P * 4 / S          fp32 master copy (model.dtype=float32), sharded by FSDP
  gradients        P * 4 / S          reduce-scattered into the master dtype
  AdamW moments    2 * P * 4 / S      exp_avg + exp_avg_sq
  (with cpu_offload the three above live in host memory: FSDP2 CPUOffloadPolicy)
  rollout weights  P * 2 / t          the bf16 copy vLLM serves. Colocated, vLLM's tensors *are*
                                      the learner's bf16 compute weights (docs/DESIGN.md, "Where
                                      the learner and vLLM meet"): counted once
  gather buffers   2 * layer * 2      FSDP2 all-gathers one bf16 layer ahead (prefetch): 2 layers
  activations      see activation_bytes(): per token and layer, what autograd saves, plus one
                   layer's backward transients (backward_transient_bytes)
  log-prob chunk   4 * C * V * 4      the fused linear log-prob's backward: [C, V] fp32 logits,
                                      softmax, target scatter, gradient (C = 1024 in the torch
                                      reference; the Triton kernel's tiles are negligible, so
                                      on a GPU this line is conservative)
  KV cache         tokens * L * 2 * kv_heads/t * head_dim * 2   bf16 K and V, heads split by TP
LoRA (model.lora, --lora-rank R; A adapter parameters = lora_params(): R * (in + out) per
targeted part per layer, the fused qkv_proj / gate_up_proj getting one A/B pair per part):
  frozen base      P * 2 / S          bf16 (model.lora.base_dtype), no gradients, no AdamW. One
                                      learner rank (S = 1): it *is* vLLM's bf16 copy, counted
                                      once under rollout weights; S > 1: the FSDP2 shard, and
                                      vLLM's own TP copy (P * 2 / t) besides
  adapter          A * 4              fp32, replicated on every rank (FSDP2 ignored params)
  adapter grads    A * 4              fp32
  adapter AdamW    2 * A * 4          fp32 exp_avg + exp_avg_sq: 16 bytes per adapter parameter
  gather buffers   as above when S > 1; none on one rank (nothing is sharded)
  activations      the full-weight count + lora_activation_delta() per token and layer: the
                   frozen linears and norm weights save no inputs for a weight gradient, each
                   adapted linear saves its input in fp32 (lora.py casts x to the adapters'
                   dtype) and each adapter its R fp32 values of x @ A^T; backward transients
                   + the fp32 gradient of the widest adapted input (lora_transient_bytes)
  log-prob chunk, KV cache: unchanged. No KL reference copy: it is the base, adapters off.
  cpu_offload moves only the frozen base shard (S > 1) to host memory.
Colocation: during the update the KV cache sleeps (vLLM frees it), so activations and the
log-prob chunk use that memory; during generation the gradients are freed (zero_grad
set_to_none) and the KV cache gets them back. A split layout (vLLM on some GPUs, the learner on
the others) pays for both peaks at once, on fewer GPUs each.

`tests/rl/test_memory.py` checks weights + gradients + AdamW + activations against the measured
peak of a real Learner.step on small models (RSS on the CPU, max_memory_allocated on CUDA).
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from tao_fast.config import LORA_TARGETS, LoraConfig

GiB = 1 << 30

# Built-in shapes (HF config.json fields), since nothing is downloaded at run time.
KNOWN = {
    "llama-3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       tie_word_embeddings=False, max_position_embeddings=8192),
    "llama-3-70b": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                        num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                        tie_word_embeddings=False, max_position_embeddings=8192),
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         tie_word_embeddings=True, max_position_embeddings=8192),
}


@dataclass
class Shape:
    vocab: int
    hidden: int
    inter: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    qkv_bias: bool = False

    @classmethod
    def from_hf(cls, cfg: dict) -> "Shape":
        heads = cfg["num_attention_heads"]
        return cls(cfg["vocab_size"], cfg["hidden_size"], cfg["intermediate_size"],
                   cfg["num_hidden_layers"], heads, cfg.get("num_key_value_heads") or heads,
                   cfg.get("head_dim") or cfg["hidden_size"] // heads,
                   bool(cfg.get("tie_word_embeddings", False)),
                   cfg.get("model_type") == "qwen2" or bool(cfg.get("attention_bias", False)))

    @classmethod
    def from_args(cls, a) -> "Shape":  # tao_fast.models.config.ModelArgs
        return cls(a.vocab_size, a.hidden_size, a.intermediate_size, a.num_layers, a.num_heads,
                   a.num_kv_heads, a.head_dim, a.tie_word_embeddings, a.qkv_bias)

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def layer_params(self) -> int:
        qkv = self.hidden * (self.q_dim + 2 * self.kv_dim)
        if self.qkv_bias:
            qkv += self.q_dim + 2 * self.kv_dim
        return qkv + self.q_dim * self.hidden + 3 * self.hidden * self.inter + 2 * self.hidden

    def params(self) -> int:
        emb = self.vocab * self.hidden
        return emb * (1 if self.tied else 2) + self.layers * self.layer_params() + self.hidden


# the decoder's linears as tao_fast.models.llama builds them (qkv_proj, o_proj, gate_up_proj,
# down_proj) and the PEFT targets (parts) each holds: one input, shared by its parts' adapters
LORA_LINEARS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"),
                ("down_proj",))


def lora_target_names(targets="all-linear") -> tuple[str, ...]:
    """target_modules (a list, or names joined by commas; all-linear = all seven) -> the PEFT
    names, each once, in LORA_TARGETS' order (model.lora's own rule, LoraConfig.targets). An
    unknown name is a ValueError (a ConfigError)."""
    return LoraConfig(rank=1, target_modules=targets).targets


def lora_dims(s: Shape) -> dict[str, tuple[int, int]]:
    """PEFT target -> (in_features, out_features) of that part of a decoder layer."""
    H, q, kv, inter = s.hidden, s.q_dim, s.kv_dim, s.inter
    return {"q_proj": (H, q), "k_proj": (H, kv), "v_proj": (H, kv), "o_proj": (q, H),
            "gate_proj": (H, inter), "up_proj": (H, inter), "down_proj": (inter, H)}


def lora_params(s: Shape, rank: int, targets=LORA_TARGETS) -> int:
    """The adapter's parameter count: A [rank, in] and B [out, rank] per targeted part per layer,
        layers * rank * sum over targets of (in + out)."""
    dims = lora_dims(s)
    return s.layers * rank * sum(sum(dims[t]) for t in lora_target_names(targets))


def lora_activation_delta(s: Shape, rank: int, targets=LORA_TARGETS,
                          dtype_bytes: int = 2) -> int:
    """Bytes per token per layer that LoRA adds to activation_elems_per_token_layer's count
    (in `dtype_bytes`, the frozen base's dtype); negative where it saves more than it adds:
      - dtype_bytes * (2H + H + q_dim + H + inter): with frozen weights autograd keeps neither
        the two RMSNorms' normalised inputs nor the four linears' inputs (each is only needed
        for a weight gradient)
      + 4 * in, for each linear with an adapted part: its input cast to fp32 (lora.py), kept
        for A's gradient and shared by the linear's parts (with an fp32 base, the input itself)
      + 4 * rank, for each targeted part: x @ A^T, kept for B's gradient
    Measured with saved_tensors_hooks on a bf16 base (tests/rl/test_memory.py)."""
    if not rank:
        return 0
    t = lora_target_names(targets)
    dims = lora_dims(s)
    dropped = dtype_bytes * (2 * s.hidden + sum(dims[parts[0]][0] for parts in LORA_LINEARS))
    copies = sum(4 * dims[parts[0]][0] for parts in LORA_LINEARS if set(parts) & set(t))
    return copies + 4 * rank * len(t) - dropped


def lora_transient_bytes(s: Shape, tokens: int, targets=LORA_TARGETS) -> int:
    """The largest transient LoRA adds to one layer's backward, 4 * tokens * max(in, out) over
    the targets: the fp32 gradient of an adapted linear's fp32 input copy [tokens, in] (before
    it joins the base's, in bf16), or of a part's fp32 update [tokens, out]. All-linear: inter
    (down_proj's input, gate_proj's and up_proj's outputs)."""
    return 4 * tokens * max(max(lora_dims(s)[t]) for t in lora_target_names(targets))


def activation_elems_per_token_layer(s: Shape, reference_attention: bool = False) -> int:
    """Elements autograd keeps per token per decoder layer (tao_fast.models.llama.Block):
        2 RMSNorms: input + output each               4 * hidden
        rotary on q and k: x and rotate_half(x)       2 * (q_dim + kv_dim)
        attention: q, k, v and the output (o_proj's input)   2 * q_dim + 2 * kv_dim
        SwiGLU: gate_up output (gate, up), silu(gate), silu*up (down_proj's input)   4 * inter
    = 4H + 4q + 4kv + 4I. The torch reference attention (the CPU path) also keeps K and V
    repeated to the query heads for SDPA: + 2 * q_dim. The count follows Korthikanti et al.
    2022 ("Reducing Activation Recomputation in Large Transformer Models", 34·s·b·h bytes per
    layer for GPT with flash attention) redone for this block: SwiGLU instead of a 4h GELU MLP,
    GQA, rotary, no dropout. Checked with saved_tensors_hooks on a 4-layer model: 12,579
    elements per token per layer measured (sequences of 128) vs 12,288 + the SDPA term below."""
    n = 4 * s.hidden + 4 * s.q_dim + 4 * s.kv_dim + 4 * s.inter
    return n + (2 * s.q_dim if reference_attention else 0)


def activation_bytes(s: Shape, tokens: int, dtype_bytes: int = 2,
                     checkpointing: bool = False, reference_attention: bool = False,
                     seq_len: int = 0, lora_rank: int = 0, lora_targets=LORA_TARGETS) -> int:
    """Saved activations of one micro-batch of `tokens` packed tokens. With gradient
    checkpointing only each layer's input survives the forward, and one layer's activations
    are rebuilt at a time in the backward. reference_attention with seq_len: torch's CPU SDPA
    (math path) also keeps the [heads, L, L] probabilities of every sequence. lora_rank > 0:
    a frozen base with adapters, + tokens * lora_activation_delta() per layer."""
    per_layer = activation_elems_per_token_layer(s, reference_attention) * tokens * dtype_bytes
    per_layer += tokens * lora_activation_delta(s, lora_rank, lora_targets, dtype_bytes)
    if reference_attention and seq_len:
        per_layer += s.heads * tokens * seq_len * dtype_bytes  # sum over sequences of L^2
    inputs = s.layers * tokens * s.hidden * dtype_bytes
    if checkpointing:
        return inputs + per_layer
    return s.layers * per_layer + tokens * s.hidden * dtype_bytes  # + the final norm


def backward_transient_bytes(s: Shape, tokens: int, dtype_bytes: int = 2) -> int:
    """Gradients of one layer's activations while its backward runs (SwiGLU: d(silu*up),
    d(silu), d(up), d(gate_up) = 6I, plus d(x) and the residual's = 2H per token)."""
    return tokens * (6 * s.inter + 2 * s.hidden) * dtype_bytes


def logprob_chunk_bytes(s: Shape, tokens: int, chunk: int = 1024) -> int:
    """The torch reference fused log-prob's largest transient, in its backward: the chunk's
    [C, V] fp32 logits recomputed, their softmax, the target scatter and the logits' gradient
    (4 tiles; C = 1024). The Triton kernel keeps only [BLOCK_T, BLOCK_V] tiles."""
    return 4 * min(tokens, chunk) * s.vocab * 4


def kv_cache_bytes(s: Shape, tokens: int, tp: int = 1, dtype_bytes: int = 2) -> int:
    """K and V of `tokens` cached tokens on one GPU of a TP group (KV heads split over TP;
    with tp > kv_heads each GPU keeps one replicated head, as vLLM does)."""
    kv_per_gpu = max(1, s.kv_heads // tp)
    return tokens * s.layers * 2 * kv_per_gpu * s.head_dim * dtype_bytes


def learner_bytes(s: Shape, tokens: int, shards: int = 1, master_bytes: int = 4,
                  checkpointing: bool = False, act_bytes: int | None = None,
                  reference_attention: bool = False, seq_len: int = 0,
                  micro_batches: int = 1, lora_rank: int = 0, lora_targets=LORA_TARGETS,
                  base_bytes: int = 2) -> dict:
    """One learner rank's memory in a steady-state Learner.step (AdamW moments exist, the
    gradients were freed by the last step's zero_grad): every component, `sum` (all at once,
    an upper bound) and `peak`, the larger of the two phases:
      forward/backward: weights + AdamW + activations + the layer's backward transients +
          the log-prob chunk + the gradients alive by then (all of them from the second
          micro-batch on; on the first, the output layer's, computed first)
      optimizer step: weights + gradients + AdamW (+ one parameter-sized temporary)
    Weights, gradients and AdamW are / shards (FSDP); activations are per rank.
    lora_rank > 0: lora_learner_bytes (the frozen base in base_bytes, fp32 adapters)."""
    if lora_rank:
        return lora_learner_bytes(s, tokens, lora_rank, lora_targets, shards, base_bytes,
                                  checkpointing, act_bytes, reference_attention, seq_len)
    p = s.params()
    act_bytes = master_bytes if act_bytes is None else act_bytes
    out = {"weights": p * master_bytes / shards, "grads": p * master_bytes / shards,
           "adamw": 2 * p * 4 / shards,
           "activations": activation_bytes(s, tokens, act_bytes, checkpointing,
                                            reference_attention, seq_len),
           "backward_transients": backward_transient_bytes(s, tokens, act_bytes),
           "logprob_chunk": logprob_chunk_bytes(s, tokens)}
    out["sum"] = sum(out.values())
    grads_alive = out["grads"] if micro_batches > 1 else s.vocab * s.hidden * master_bytes
    fwd_bwd = (out["weights"] + out["adamw"] + out["activations"] + out["backward_transients"]
               + out["logprob_chunk"] + grads_alive)
    largest = max(s.vocab * s.hidden, s.hidden * 2 * s.inter) * master_bytes
    opt = out["weights"] + out["grads"] + out["adamw"] + largest
    out["peak"] = max(fwd_bwd, opt)
    return out


def lora_learner_bytes(s: Shape, tokens: int, rank: int, targets=LORA_TARGETS,
                       shards: int = 1, base_bytes: int = 2, checkpointing: bool = False,
                       act_bytes: int | None = None, reference_attention: bool = False,
                       seq_len: int = 0) -> dict:
    """learner_bytes for a LoRA learner (A = lora_params adapter parameters), the same keys
    plus `adapter`:
      weights  P * base_bytes / shards   the frozen base (FSDP2 shards it; no grads, no AdamW)
      adapter  A * 4, grads A * 4, adamw 2 * A * 4   fp32, replicated on every rank
      activations   activation_bytes(lora_rank=rank) in act_bytes (default base_bytes)
      backward_transients   + lora_transient_bytes
      peak = max(forward/backward: weights + adapter + adamw + activations + transients +
                 log-prob chunk + all the adapter's gradients,
                 optimizer step: weights + adapter + grads + adamw + the largest A or B)."""
    a = lora_params(s, rank, targets)
    act_bytes = base_bytes if act_bytes is None else act_bytes
    out = {"weights": s.params() * base_bytes / shards, "adapter": a * 4, "grads": a * 4,
           "adamw": 2 * a * 4,
           "activations": activation_bytes(s, tokens, act_bytes, checkpointing,
                                            reference_attention, seq_len, rank, targets),
           "backward_transients": (backward_transient_bytes(s, tokens, act_bytes)
                                   + lora_transient_bytes(s, tokens, targets)),
           "logprob_chunk": logprob_chunk_bytes(s, tokens)}
    out["sum"] = sum(out.values())
    state = out["weights"] + out["adapter"] + out["adamw"]
    fwd_bwd = (state + out["activations"] + out["backward_transients"] + out["logprob_chunk"]
               + out["grads"])
    largest = 4 * rank * max(max(lora_dims(s)[t]) for t in lora_target_names(targets))
    out["peak"] = max(fwd_bwd, state + out["grads"] + largest)
    return out


def _tp_ok(s: Shape, tp: int) -> bool:  # vLLM: heads divide over TP; KV heads divide or replicate
    return s.heads % tp == 0 and (s.kv_heads % tp == 0 or tp % s.kv_heads == 0)


def _state(s: Shape, S: int, lora_rank: int, targets) -> list[tuple[str, float, bool, bool]]:
    """The learner's resident state per GPU: (label, bytes, kept through generation,
    offloadable to host memory). Full-weight: fp32 master, gradients, AdamW, / S. LoRA: the
    frozen bf16 base shard (only when S > 1: on one rank it is vLLM's copy) and the fp32
    adapter, its gradients and AdamW, replicated (FSDP2 ignores them: they stay on the GPU)."""
    P = s.params()
    if not lora_rank:
        return [("master weights (fp32)", P * 4 / S, True, True),
                ("gradients (fp32)", P * 4 / S, False, True),
                ("AdamW moments (fp32)", 2 * P * 4 / S, True, True)]
    a = lora_params(s, lora_rank, targets)
    base = [("frozen base shard (bf16, FSDP2)", P * 2 / S, True, True)] if S > 1 else []
    return base + [("LoRA adapter (fp32)", a * 4, True, False),
                   ("adapter gradients (fp32)", a * 4, False, False),
                   ("adapter AdamW moments (fp32)", 2 * a * 4, True, False)]


def _on_gpu(state, off: bool, generation: bool = False) -> float:
    return sum(b for _, b, gen, o in state if not (off and o) and (gen or not generation))


def _pick(s: Shape, budget: float, state, gather: float, act: float, chunk: float,
          kv_min: float, choices: list[int], offload_opts: list[bool]) -> tuple[bool, bool, int]:
    """(fits, cpu_offload, t): the first offload option, then the smallest t, whose bf16
    weights (P * 2 / t) + the state kept through generation leave kv_min / t of KV cache and
    whose update (weights + all the state + gather buffers + activations + the log-prob
    chunk) fits the budget; else (False, the last option, the largest t)."""
    for off in offload_opts:
        for t in choices:
            w = s.params() * 2 / t
            kv_room = budget - w - _on_gpu(state, off, generation=True)
            if (kv_room >= kv_min / t
                    and w + _on_gpu(state, off) + gather + act + chunk <= budget):
                return True, off, t
    return False, offload_opts[-1], choices[-1]


def layout(s: Shape, gpus: int, gpu_gib: float, micro_batch_tokens: int = 8192,
           seq_len: int = 4096, checkpointing: bool = True, util: float = 0.92,
           min_kv_seqs: int = 64, tp: int | None = None, cpu_offload: bool | None = None,
           name: str = "model", lora_rank: int = 0, lora_targets=LORA_TARGETS) -> dict:
    """Lay a model out on `gpus` GPUs of `gpu_gib` GiB, learner sharded over all of them
    (FSDP2, S = gpus) and colocated with data-parallel vLLM engines of TP degree t.

    t: the smallest degree (dividing gpus, valid for the heads) whose bf16 weights plus the
    learner's resident state leave room for at least `min_kv_seqs` sequences of `seq_len`
    tokens of KV cache. cpu_offload (None = when needed): FSDP2 CPUOffloadPolicy keeps master
    weights, gradients and AdamW moments (LoRA: the frozen base shard) in host memory when
    they do not fit next to vLLM. lora_rank > 0: a LoRA plan (see the module docstring).
    Returns a dict with per-GPU bytes by phase and what colocation saves."""
    S, mbt = gpus, micro_batch_tokens
    budget = gpu_gib * GiB * util
    targets = lora_target_names(lora_targets) if lora_rank else LORA_TARGETS
    state = _state(s, S, lora_rank, targets)
    gather = 2 * s.layer_params() * 2 if not lora_rank or S > 1 else 0
    act = (activation_bytes(s, mbt, 2, checkpointing, lora_rank=lora_rank, lora_targets=targets)
           + backward_transient_bytes(s, mbt, 2)
           + (lora_transient_bytes(s, mbt, targets) if lora_rank else 0))
    chunk = logprob_chunk_bytes(s, mbt)
    choices = [t for t in (1, 2, 4, 8, 16) if t <= gpus and gpus % t == 0 and _tp_ok(s, t)]
    if tp is not None:
        choices = [tp]
    offload_opts = [cpu_offload] if cpu_offload is not None else [False, True]
    if cpu_offload is None and not any(o for *_, o in state):
        offload_opts = [False]  # nothing to offload (LoRA on one GPU)
    fits, off, t = _pick(s, budget, state, gather, act, chunk,
                         kv_cache_bytes(s, min_kv_seqs * seq_len, 1), choices, offload_opts)
    return _plan(s, name, gpus, gpu_gib, util, budget, state, gather, act, chunk, fits, off, t,
                 mbt, seq_len, checkpointing, lora_rank, targets)


def _plan(s, name, gpus, gpu_gib, util, budget, state, gather, act, chunk, fits, off, t, mbt,
          seq_len, checkpointing, lora_rank, targets) -> dict:
    """layout()'s result for the picked (fits, cpu_offload, t)."""
    P = s.params()
    w = P * 2 / t
    kv = max(0.0, budget - w - _on_gpu(state, off, generation=True))
    kv_tokens = int(kv // max(1, kv_cache_bytes(s, 1, t)))
    shared = not lora_rank or gpus == 1  # vLLM serves the learner's bf16 tensors
    wkey = ("rollout weights (bf16, shared)" if not lora_rank else
            "frozen base = rollout weights (bf16, shared)" if shared else
            "rollout weights (bf16, vLLM's TP copy)")
    train = {wkey: w, **{k: 0 if off and o else b for k, b, _, o in state},
             **({"FSDP gather buffers": gather} if gather or not lora_rank else {}),
             "activations (+ backward transients)": act, "log-prob chunk": chunk}
    gen = {wkey: w, **{k: 0 if off and o else b for k, b, g, o in state if g}, "KV cache": kv}
    # what colocation saves: no second bf16 copy of the weights (LoRA with S > 1: vLLM's copy
    # is its own), and the KV cache and the activations take turns in one pool
    saves = {"second bf16 weight copy": w if shared else 0.0,
             "KV cache / activations overlap": min(kv, act + chunk)}
    lora = None if not lora_rank else {
        "rank": lora_rank, "targets": list(targets),
        "adapter_params": lora_params(s, lora_rank, targets),
        "adapter_bytes": lora_params(s, lora_rank, targets) * 4,
        "adapter_state_bytes": lora_params(s, lora_rank, targets) * 16}
    return {
        "name": name, "params": P, "gpus": gpus, "gpu_gib": gpu_gib, "util": util,
        "fsdp_shards": gpus, "vllm_tp": t, "vllm_engines": gpus // t, "cpu_offload": off,
        "host_bytes_per_gpu": sum(b for _, b, _, o in state if o) if off else 0, "fits": fits,
        "micro_batch_tokens": mbt, "checkpointing": checkpointing, "lora": lora,
        "offloaded": [k for k, _, _, o in state if o] if off else [],
        "train": train, "train_total": sum(train.values()),
        "generate": gen, "generate_total": sum(gen.values()),
        "kv_tokens_per_engine": kv_tokens, "kv_seqs_per_engine": kv_tokens // seq_len,
        "seq_len": seq_len, "colocation_saves": saves,
        "colocation_saves_total": sum(saves.values()),
    }


def _lora_lines(r: dict) -> list[str]:
    """format_layout's LoRA line: the adapter, where the base lives."""
    lo, g = r["lora"], lambda b: f"{b / GiB:.2f}"  # noqa: E731
    targets = "all-linear" if tuple(lo["targets"]) == LORA_TARGETS else ",".join(lo["targets"])
    base = ("the frozen bf16 base is vLLM's weights (one copy, no FSDP)" if r["fsdp_shards"] == 1
            else f"the frozen bf16 base sharded by FSDP2 over {r['fsdp_shards']} GPUs"
            + (" (in host memory)" if r["cpu_offload"] else "") + ", vLLM's TP copy besides")
    return [f"- **LoRA plan**: rank {lo['rank']} on {targets}: {lo['adapter_params'] / 1e6:.1f}M "
            f"adapter params, {g(lo['adapter_bytes'])} GiB fp32 "
            f"({g(lo['adapter_state_bytes'])} GiB with gradients and AdamW), replicated on "
            f"every GPU; {base}; no KL reference copy (the base, adapters off)"]


def format_layout(r: dict) -> str:
    """layout()'s result as markdown: the plan's lines, then GiB per GPU per component in
    each phase, then what colocation saves."""
    g = lambda b: f"{b / GiB:6.1f}"  # noqa: E731
    lora = r.get("lora")
    what = "master/grads/AdamW" if not lora else "the frozen base shard"
    learner = ("one GPU (no FSDP)" if lora and r["fsdp_shards"] == 1
               else f"FSDP2 over {r['fsdp_shards']} GPUs")
    off = (f", {what} offloaded to host memory ({g(r['host_bytes_per_gpu']).strip()} GiB per "
           f"GPU)" if r["cpu_offload"] else "")
    lines = [f"### {r['name']}: {r['params'] / 1e9:.2f}B params on {r['gpus']} x "
             f"{r['gpu_gib']:g} GiB (planning to {100 * r['util']:.0f}%)", "",
             *(_lora_lines(r) if lora else []),
             f"- learner: {learner}{off}; micro-batch {r['micro_batch_tokens']} tokens, "
             f"gradient checkpointing {'on' if r['checkpointing'] else 'off'}",
             f"- vLLM: {r['vllm_engines']} engine(s) of TP={r['vllm_tp']}; KV cache "
             f"{r['kv_tokens_per_engine']:,} tokens per engine "
             f"({r['kv_seqs_per_engine']} sequences of {r['seq_len']})",
             *([] if r["fits"] and not lora else  # a LoRA plan says which, always
               [f"- {'fits' if r['fits'] else '**does not fit**'} with these settings"]), "",
             "| GiB per GPU | update (KV cache asleep) | generation |", "|---|---:|---:|"]
    keys = list(dict.fromkeys([*r["train"], *r["generate"]]))
    host = set(r.get("offloaded", ()))
    cell = lambda d, k: ("  host" if k in host and k in d  # noqa: E731
                         else g(d[k]) if k in d else "     -")
    for k in keys:
        lines.append(f"| {k} | {cell(r['train'], k)} | {cell(r['generate'], k)} |")
    lines.append(f"| **total** | **{g(r['train_total']).strip()}** | "
                 f"**{g(r['generate_total']).strip()}** |")
    return "\n".join(lines + ["", _saves_line(r), ""])


def _saves_line(r: dict) -> str:
    g = lambda b: f"{b / GiB:.1f}"  # noqa: E731
    s = r["colocation_saves"]
    overlap = (f"{g(s['KV cache / activations overlap'])} GiB because activations and the "
               f"log-prob chunk reuse the sleeping KV cache.")
    if not s["second bf16 weight copy"]:  # LoRA under FSDP2: vLLM keeps its own base copy
        return (f"Colocation saves {g(r['colocation_saves_total'])} GiB per GPU: {overlap} "
                f"(vLLM keeps its own bf16 copy of the frozen base: an FSDP2 shard cannot "
                f"serve it.)")
    return (f"Colocation saves {g(r['colocation_saves_total'])} GiB per GPU: "
            f"{g(s['second bf16 weight copy'])} GiB of a second bf16 weight copy "
            f"(vLLM serves the learner's tensors) and {overlap}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tao_fast.rl.memory",
                                 description="Per-GPU memory budget of a colocated TAO run.")
    ap.add_argument("--model", choices=sorted(KNOWN), help="built-in shape")
    ap.add_argument("--config", help="an HF config.json instead")
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--gpu-gb", type=float, default=80.0, help="GiB per GPU")
    ap.add_argument("--micro-batch-tokens", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--tp", type=int, help="vLLM TP degree (default: the smallest that fits)")
    ap.add_argument("--no-checkpointing", action="store_true")
    ap.add_argument("--lora-rank", type=int, default=0,
                    help="LoRA adapter rank (model.lora.rank); 0 = full-weight training")
    ap.add_argument("--lora-targets", default="all-linear",
                    help="LoRA target modules, joined by commas (default all-linear: "
                         + ",".join(LORA_TARGETS) + ")")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if bool(a.model) == bool(a.config):
        ap.error("give --model or --config")
    if a.lora_rank < 0:
        ap.error("--lora-rank must be >= 0")
    if not a.lora_rank and a.lora_targets != "all-linear":
        ap.error("--lora-targets needs --lora-rank > 0")
    try:
        targets = lora_target_names(a.lora_targets)
    except ValueError as e:
        ap.error(str(e))
    cfg = KNOWN[a.model] if a.model else json.loads(Path(a.config).read_text())
    r = layout(Shape.from_hf(cfg), a.gpus, a.gpu_gb, a.micro_batch_tokens, a.seq_len,
               not a.no_checkpointing, tp=a.tp, name=a.model or a.config,
               lora_rank=a.lora_rank, lora_targets=targets)
    print(json.dumps(r, indent=1) if a.json else format_layout(r))
    return 0 if r["fits"] else 1


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["Shape", "KNOWN", "LORA_TARGETS", "activation_bytes", "backward_transient_bytes",
           "kv_cache_bytes", "learner_bytes", "layout", "logprob_chunk_bytes", "format_layout",
           "lora_activation_delta", "lora_dims", "lora_learner_bytes", "lora_params",
           "lora_target_names", "lora_transient_bytes"]
