"""Learner step on the GPU (issue 4): tokens/s, MFU and peak memory of forward + backward +
optimizer step, tao-fast vs transformers and Liger-Kernel, on the same RL-like sequences.

    python bench/gpu_learner_step.py              # GPU: correctness check, then the table
    python bench/gpu_learner_step.py --dry-run    # CPU smoke run: tiny model, fp32, torch ops

What is measured. Random-initialised Qwen2.5-shaped decoders (tied embeddings, qkv bias,
GQA, vocab 151936; head dims are powers of two, as the Triton attention needs):
  0.5b: hidden 896, inter 4864, 24 layers, 14 heads / 2 KV heads, head_dim 64   (494M params)
  1.5b: hidden 1536, inter 8960, 28 layers, 12 heads / 2 KV heads, head_dim 128 (1.54B params)
bf16 weights; the same weights (one seeded HF init per size) for every provider. One step =
`--seqs` sequences (prompt uniform 100-500 tokens, response uniform 50-2000, random ids,
fixed seed, one random advantage per sequence), grouped by tao_fast.rl.packing.pack_sequences
into micro-batches of at most `--mb-tokens` real tokens; per micro-batch forward, loss,
backward; then clip_grad_norm_(1.0) and AdamW (fused=True on CUDA, lr 1e-6), zero_grad.
Loss = the real learner's: per-token log-prob of each response token, then the clipped
policy-gradient loss (old log-probs = current ones detached, as in Learner.step; clip 0.2;
token-sum over the whole step's response-token count, so micro-batches add up to a token mean).
Providers:
  tao-fast    the in-house packed model (no padding; varlen Triton attention), logp by
              tao_fast.ops.linear_logprob (never holds [T, V] logits), loss by tao_fast.ops.pg_loss.
  hf-sdpa     transformers' AutoModelForCausalLM (Qwen2 config, attn_implementation="sdpa")
              on the SAME micro-batches (same sequences per micro-batch), right-padded to the
              longest; no attention mask is passed (causal attention already keeps real tokens
              off the trailing pads), so SDPA takes its is_causal flash path — the peer's best
              case. Loss: full logits -> log_softmax(fp32) -> gather -> the same pg formula.
  liger       hf-sdpa after Liger-Kernel's apply_liger_kernel_to_qwen2(rope, rms_norm, swiglu)
              with the same eager loss.
  liger-grpo  the Liger-patched model's hidden states into Liger's fused linear GRPO loss
              (liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss, beta 0, token-level clip
              0.2, its normaliser rescaled to the step's token count): Liger's own fused
              linear RL loss. Liger's per-token fused linear cross entropy (reduction="none")
              is not used: before Liger PR #1298 (2026-07) its backward scaled every token by
              the FIRST token's upstream gradient, i.e. wrong gradients under a pg loss.
Liger providers are skipped with a note when liger_kernel is not importable. Liger patches
transformers' Qwen2 module globally, so providers run in the order above (all sizes of one
provider, then the next).

Out of memory: a provider that runs out of memory at `--mb-tokens` is retried with the budget
halved, down to `--min-mb-tokens`; the row says which budgets ran out of memory ("OOM" when all
did). Peers then run at the largest budget that fits them. If tao-fast's peak memory exceeds
the best peer's, tao-fast is re-run at halved budgets until it uses no more (matched memory).

Timing: the micro-batches are built on the device first; `--warmup` steps (compiles, Triton JIT,
optimizer state) then `--steps` timed steps, each between CUDA events (perf_counter on CPU);
the median step time is used. tokens/s counts real (unpadded) tokens, prompt + response.
Peak memory: torch.cuda.max_memory_allocated over the timed steps (weights, grads, AdamW state,
activations: everything), GiB. PYTORCH_CUDA_ALLOC_CONF defaults to expandable_segments:True
(for every provider alike) so that fragmentation does not decide who runs out of memory.

FLOPs per step (useful work only: real tokens, never padding):
    6 * N * sum(L_i)  +  6 * n_layers * n_heads * head_dim * sum(L_i^2)
N = matmul parameters = all parameters, minus the input embedding when it is untied (a lookup);
with tied embeddings the shared matrix is counted once, as the LM head (norms and biases are
included: < 0.1%). 6 = 2 (multiply-add) * 3 (forward + backward). The attention term is causal
QK^T and PV (2 * L^2 * head_dim per head forward, half of the full square), times 3.
The LM head is applied to every token by every provider (the loss reads response tokens only),
so it is counted on every token. MFU = FLOPs / step time / peak, for two peaks: the dense bf16
matmul rate this script measures first (torch.matmul, 8192^3, median of 20), and 989 TFLOP/s
(H100 SXM nominal dense bf16).

Correctness check before timing (a failure exits non-zero unless --force): for each size, HF
weights copied into the in-house model through tao_fast.models.weights.from_hf; per-token
log-probs of 4 sequences (lengths 1, 37, 300, 777), packed for tao-fast, one at a time for
transformers; fp32 transformers is the reference. Passes when the in-house model's bf16 error
(mean and max abs over tokens) is at most 2x transformers' own bf16 error plus 1e-3, and its
fp32 run (Triton attention on the GPU does fp32 dots in TF32) errs less than transformers' bf16.

The goal line (issue 4): tao-fast >= 1.5x the best peer's tokens/s at no more peak memory.
--dry-run: the same code on the CPU with a 2-layer hidden-64 vocab-1000 model, lengths /10,
12 sequences, 512-token micro-batches, fp32, ops backend "torch" (the parity check still runs
bf16 against fp32); no peak memory there, so the goal is printed but not judged.
Writes JSON to $OUT/gpu_learner_step.json if $OUT is set, else bench/out/.
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from importlib.metadata import version

import torch

from tao_fast import ops
from tao_fast.kernels.reference import IGNORE_INDEX
from tao_fast.models.config import ModelArgs, rope_inv_freq
from tao_fast.models.llama import Transformer
from tao_fast.models.weights import from_hf
from tao_fast.rl.packing import make_packed_batch, pack_sequences

IGN = IGNORE_INDEX
NOMINAL_TFLOPS = 989.0  # H100 SXM dense bf16
SPEEDUP_GOAL = 1.5
CLIP = 0.2
COMMON = dict(tie_word_embeddings=True, qkv_bias=True, model_type="qwen2", rope_theta=1e6,
              rms_norm_eps=1e-6, max_position_embeddings=32768)
MODELS = {
    "0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24,
                 num_heads=14, num_kv_heads=2, head_dim=64),
    "1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28,
                 num_heads=12, num_kv_heads=2, head_dim=128),
    "tiny": dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_layers=2,
                 num_heads=4, num_kv_heads=2, head_dim=16),  # --dry-run
}
PROVIDERS = ("tao-fast", "hf-sdpa", "liger", "liger-grpo")  # run in this order (Liger patches)
PEERS = PROVIDERS[1:]


# ----------------------------------------------------------------------------- workload

@dataclass
class Workload:
    seqs: list  # int64 [L_i] CPU tensors: prompt + response
    prompt_lens: list
    advantages: list  # one float per sequence

    @property
    def lengths(self):
        return [int(s.numel()) for s in self.seqs]

    @property
    def n_counted(self):  # response tokens: the tokens the loss reads
        return sum(L - p for L, p in zip(self.lengths, self.prompt_lens))


def make_workload(n, prompt_range, resp_range, vocab, seed) -> Workload:
    g = torch.Generator().manual_seed(seed)
    p = torch.randint(prompt_range[0], prompt_range[1] + 1, (n,), generator=g).tolist()
    r = torch.randint(resp_range[0], resp_range[1] + 1, (n,), generator=g).tolist()
    seqs = [torch.randint(0, vocab, (a + b,), generator=g) for a, b in zip(p, r)]
    adv = torch.randn(n, generator=g).tolist()
    return Workload(seqs, p, adv)


def targets_of(seq, prompt_len):
    """[L]: position t predicts token t + 1; only response tokens count (as Learner._per_token)."""
    t = torch.full_like(seq, IGN)
    t[prompt_len - 1:-1] = seq[prompt_len:]
    return t


def packed_microbatches(wl: Workload, bins, device):
    """tao-fast: one PackedBatch [T] per bin, with targets / advantages / mask [T]."""
    out = []
    for idx in bins:
        batch = make_packed_batch([wl.seqs[i] for i in idx], device=device)
        targets = torch.cat([targets_of(wl.seqs[i], wl.prompt_lens[i]) for i in idx])  # [T]
        adv = torch.cat([torch.full((wl.lengths[i],), wl.advantages[i]) for i in idx])  # [T]
        targets, adv = targets.to(device), adv.to(device)
        out.append(dict(batch=batch, targets=targets, adv=adv, mask=targets != IGN))
    return out


def padded_microbatches(wl: Workload, bins, device):
    """Peers: the same bins, right-padded to the longest: ids / targets / mask [B, L], adv [B]."""
    out = []
    for idx in bins:
        L = max(wl.lengths[i] for i in idx)
        ids = torch.zeros(len(idx), L, dtype=torch.long)  # pad id 0 (never read by the loss)
        targets = torch.full((len(idx), L), IGN, dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, :wl.lengths[i]] = wl.seqs[i]
            targets[r, :wl.lengths[i]] = targets_of(wl.seqs[i], wl.prompt_lens[i])
        adv = torch.tensor([wl.advantages[i] for i in idx])
        ids, targets, adv = ids.to(device), targets.to(device), adv.to(device)
        out.append(dict(ids=ids, targets=targets, adv=adv, mask=targets != IGN,
                        n_counted=sum(wl.lengths[i] - wl.prompt_lens[i] for i in idx)))
    out.sort(key=lambda m: -m["ids"].numel())  # largest first: an OOM shows up at once
    return out


# ----------------------------------------------------------------------------- FLOPs

def matmul_params(args: ModelArgs) -> int:
    n = args.param_count()
    return n if args.tie_word_embeddings else n - args.vocab_size * args.hidden_size


def step_flops(args: ModelArgs, lengths) -> float:
    dense = 6 * matmul_params(args) * sum(lengths)
    attn = 6 * args.num_layers * args.num_heads * args.head_dim * sum(L * L for L in lengths)
    return float(dense + attn)


def measure_matmul_tflops(device, dtype) -> float:
    n = 8192 if device.type == "cuda" else 256
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    times = []
    for i in range(25):
        if device.type == "cuda":
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            torch.matmul(a, b, out=c)
            e1.record()
            e1.synchronize()
            t = e0.elapsed_time(e1) / 1e3
        else:
            t0 = time.perf_counter()
            torch.matmul(a, b, out=c)
            t = time.perf_counter() - t0
        if i >= 5:
            times.append(t)
    del a, b, c
    return 2 * n ** 3 / statistics.median(times) / 1e12


# ----------------------------------------------------------------------------- models

def model_args(size) -> ModelArgs:
    return ModelArgs(**MODELS[size], **COMMON)


def hf_config(args: ModelArgs):
    from transformers import AutoConfig

    d = args.to_hf()
    for k in ("architectures", "torch_dtype"):
        d.pop(k, None)
    return AutoConfig.for_model(d.pop("model_type"), **d)


def cast_keep_fp32_buffers(model, dtype):
    """model.to(dtype), but floating buffers (rotary inv_freq) keep their fp32 values, as when
    a model is built in its dtype: bf16-rounded rotary frequencies would skew long positions."""
    saved = {n: b.detach().clone() for n, b in model.named_buffers() if b.is_floating_point()}
    model.to(dtype)
    for name, b in saved.items():
        mod, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(mod) if mod else model, leaf, b)
    return model


def build_hf(args, sd, device, dtype):
    """transformers' model from an HF state dict (whatever the transformers modules are now:
    with Liger's patches applied, the Liger model)."""
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_config(args), attn_implementation="sdpa")
    model = model.to(device)  # no-op unless this transformers ignored the device context
    model.load_state_dict(sd)  # tied: lm_head.weight and embed_tokens are one parameter
    model.config.use_cache = False
    return cast_keep_fp32_buffers(model, dtype).train()


def build_tao(args, sd, device, dtype, backend):
    """The in-house model from the same HF state dict, via the loader's fused-layout mapping."""
    with torch.device("meta"):
        model = Transformer(args)
    model = model.to_empty(device=device)
    missing, unexpected = model.load_state_dict(from_hf(dict(sd), args), strict=False)
    if [m for m in missing if m != "inv_freq"] or unexpected:
        raise RuntimeError(f"weight mapping: missing {missing}, unexpected {unexpected}")
    model.inv_freq = rope_inv_freq(args).to(device)  # fp32
    model = cast_keep_fp32_buffers(model, dtype)
    model.ops_backend = backend
    return model.train()


def make_weights(args, device, seed):
    """(fp32 HF state dict on the CPU, transformers' parameter count) from a seeded HF init."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(hf_config(args), attn_implementation="sdpa")
    with torch.no_grad():  # HF zero-inits biases: random ones make the check cover their mapping
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.02)
    n_hf = sum(p.numel() for p in hf.parameters())
    sd32 = {k: v.detach().to("cpu", torch.float32) for k, v in hf.state_dict().items()}
    del hf
    free(device)
    return sd32, n_hf


def apply_liger(args):
    from liger_kernel import transformers as lt

    fn = getattr(lt, f"apply_liger_kernel_to_{args.model_type}")
    fn(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
       fused_linear_cross_entropy=False)


def liger_grpo_loss():
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    try:
        return LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, epsilon_low=CLIP,
                                        epsilon_high=CLIP, temperature=1.0)
    except TypeError:  # older Liger: no epsilon_low/high (clip 0.2 is its default)
        return LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False)


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- losses

def torch_pg_loss(logp, adv, mask, n_counted):
    """The pg formula of ops.pg_loss (old = logp.detach(), clip 0.2), token-sum / n_counted."""
    ratio = torch.exp(logp - logp.detach())
    pg = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - CLIP, 1 + CLIP))
    return (pg * mask).sum() / n_counted


def tao_loss(model, mb, n_counted):
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
    grpo = liger_grpo_loss()

    def loss_fn(model, mb, n_counted):
        hidden = model.model(input_ids=mb["ids"], use_cache=False).last_hidden_state  # [B, L, H]
        out = grpo(hidden, model.lm_head.weight, mb["targets"].clamp(min=0),
                   mb["mask"].float(), mb["adv"])
        loss = out[0] if isinstance(out, tuple) else out  # mean over this micro-batch's tokens
        return loss * (mb["n_counted"] / n_counted)
    return loss_fn


# ----------------------------------------------------------------------------- timing

def train_step(model, opt, mbs, loss_fn, n_counted):
    for mb in mbs:
        loss = loss_fn(model, mb, n_counted)
        loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def time_steps(model, mbs, loss_fn, n_counted, device, warmup, steps):
    """(median step seconds, peak bytes or None, last loss)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, betas=(0.9, 0.99), eps=1e-8,
                            weight_decay=0.0, fused=device.type == "cuda")
    for _ in range(warmup):
        train_step(model, opt, mbs, loss_fn, n_counted)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        if cuda:
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            loss = train_step(model, opt, mbs, loss_fn, n_counted)
            e1.record()
            e1.synchronize()
            times.append(e0.elapsed_time(e1) / 1e3)
        else:
            t0 = time.perf_counter()
            loss = train_step(model, opt, mbs, loss_fn, n_counted)
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) if cuda else None
    del opt
    return statistics.median(times), peak, float(loss)


def run_once(provider, args, sd, wl, budget, device, dtype, cfg):
    """One provider at one micro-batch budget -> row fields (raises on OOM)."""
    bins = pack_sequences(wl.lengths, budget)
    if provider == "tao-fast":
        model = build_tao(args, sd, device, dtype, cfg.ops_backend)
        mbs = packed_microbatches(wl, bins, device)
        loss_fn, batch_tokens = tao_loss, sum(wl.lengths)
    else:
        model = build_hf(args, sd, device, dtype)
        mbs = padded_microbatches(wl, bins, device)
        loss_fn = eager_loss if provider in ("hf-sdpa", "liger") else make_grpo_loss()
        batch_tokens = sum(m["ids"].numel() for m in mbs)
    try:
        secs, peak, loss = time_steps(model, mbs, loss_fn, wl.n_counted, device, cfg.warmup,
                                      cfg.steps)
    finally:
        del model, mbs
    if loss != loss or abs(loss) == float("inf"):
        raise RuntimeError(f"non-finite loss {loss}")
    return dict(mb_tokens=budget, micro_batches=len(bins), step_s=secs, peak_bytes=peak,
                loss=loss, computed_tokens=batch_tokens)


def run_provider(provider, args, sd, wl, budgets, device, dtype, cfg, flops, peak_tflops):
    """Try each budget (largest first) until one fits; returns the table row."""
    row = {"provider": provider, "oom_at": []}
    for budget in budgets:
        try:
            row.update(run_once(provider, args, sd, wl, budget, device, dtype, cfg))
            break
        except torch.cuda.OutOfMemoryError:
            row["oom_at"].append(budget)
        except Exception as e:  # noqa: BLE001 (one provider failing must not stop the table)
            row["status"] = f"error: {type(e).__name__}: {str(e)[:160]}"
            break
        finally:
            free(device)
    if "step_s" not in row:
        row.setdefault("status", "OOM")
        return row
    row["status"] = "ok"
    tokens = sum(wl.lengths)
    row["tokens_per_s"] = tokens / row["step_s"]
    row["tflops"] = flops / row["step_s"] / 1e12
    row["mfu_measured"] = row["tflops"] / peak_tflops
    row["mfu_nominal"] = row["tflops"] / NOMINAL_TFLOPS
    row["padding_overhead"] = row["computed_tokens"] / tokens - 1.0
    if row["peak_bytes"] is not None:
        row["peak_gib"] = row["peak_bytes"] / 2 ** 30
    return row


# ----------------------------------------------------------------------------- check

def logp_packed(model, seqs):
    with torch.no_grad():
        b = make_packed_batch(seqs, device=model.inv_freq.device)
        targets = torch.cat([targets_of(s, 1) for s in seqs]).to(b.input_ids.device)
        hidden = model(b.input_ids, b.positions, b.cu_seqlens, b.max_seqlen)
        return ops.linear_logprob(hidden, model.output_weight, targets,
                                  backend=model.ops_backend), targets != IGN  # [T], [T]


def logp_hf(model, seqs):
    out = []
    with torch.no_grad():
        for s in seqs:
            ids = s.to(model.device)[None]  # [1, L]
            logits = model(input_ids=ids, use_cache=False).logits[0].float()  # [L, V]
            t = targets_of(s, 1).to(ids.device)
            lp = torch.log_softmax(logits, -1).gather(-1, t.clamp(min=0)[:, None])[:, 0]
            out.append(torch.where(t != IGN, lp, torch.zeros_like(lp)))
    return torch.cat(out)  # [T]


def check_parity(args, sd32, lengths, device, dtype, backend):
    """In-house vs transformers per-token logp, both against transformers in fp32. -> (ok, info)"""
    g = torch.Generator().manual_seed(123)
    seqs = [torch.randint(0, args.vocab_size, (n,), generator=g) for n in lengths]
    sd_lo = {k: v.to(dtype) for k, v in sd32.items()}
    res = {}
    for name, sd, dt in (("hf_fp32", sd32, torch.float32), ("hf_low", sd_lo, dtype),
                         ("tao_fp32", sd32, torch.float32), ("tao_low", sd_lo, dtype)):
        if name.startswith("hf"):  # one sequence at a time
            model = build_hf(args, sd, device, dt).eval()
            res[name] = logp_hf(model, seqs).cpu()
        else:  # packed
            model = build_tao(args, sd, device, dt, backend).eval()
            lp, mask = logp_packed(model, seqs)
            res[name], valid = lp.cpu(), mask.cpu()
        del model
        free(device)
    ref = res["hf_fp32"][valid].double()
    err = {k: {"mean": float((res[k][valid].double() - ref).abs().mean()),
               "max": float((res[k][valid].double() - ref).abs().max())}
           for k in ("hf_low", "tao_fp32", "tao_low")}
    ok = all(err["tao_low"][m] <= 2 * err["hf_low"][m] + 1e-3 for m in ("mean", "max"))
    ok &= all(err["tao_fp32"][m] <= max(err["hf_low"][m], 1e-5) for m in ("mean", "max"))
    lo = str(dtype).replace("torch.", "")
    print(f"parity (per-token logp vs transformers fp32, {int(valid.sum())} tokens, lengths "
          f"{lengths}): |err| mean/max  transformers-{lo} {err['hf_low']['mean']:.2e}/"
          f"{err['hf_low']['max']:.2e}, tao-fast-{lo} {err['tao_low']['mean']:.2e}/"
          f"{err['tao_low']['max']:.2e}, tao-fast-fp32 {err['tao_fp32']['mean']:.2e}/"
          f"{err['tao_fp32']['max']:.2e} -> {'PASS' if ok else 'FAIL'}")
    return ok, {"lengths": lengths, "errors": err, "ok": ok}


# ----------------------------------------------------------------------------- report

def _fmt(x, spec, unit=""):
    return format(x, spec) + unit if isinstance(x, (int, float)) else "-"


def best_peer(rows):
    ok = [r for r in rows if r["provider"] in PEERS and r["status"] == "ok"]
    return max(ok, key=lambda r: r["tokens_per_s"]) if ok else None


def print_table(size, n_params, rows):
    peer = best_peer(rows)
    print(f"\n{size} ({n_params / 1e6:.0f}M params)")
    print("| provider | model | mb tokens | tokens/s | MFU (measured peak) | MFU (989 TF) "
          "| peak GiB | speedup vs best peer | note |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        sp = r["tokens_per_s"] / peer["tokens_per_s"] if peer and r["status"] == "ok" else None
        note = [] if r["status"] in ("ok", "OOM") else [r["status"]]
        if r.get("oom_at"):
            note.append(("OOM at every budget: " if r["status"] == "OOM" else "OOM at ")
                        + ",".join(map(str, r["oom_at"])))
        if r.get("padding_overhead"):
            note.append(f"padding +{100 * r['padding_overhead']:.0f}%")
        if r.get("matched_memory"):
            note.append("matched-memory re-run")
        print(f"| {r['provider']} | {size} | {r.get('mb_tokens', '-')} | "
              f"{_fmt(r.get('tokens_per_s'), ',.0f')} | {_fmt(r.get('mfu_measured'), '.1%')} | "
              f"{_fmt(r.get('mfu_nominal'), '.1%')} | {_fmt(r.get('peak_gib'), '.1f')} | "
              f"{_fmt(sp, '.2f', 'x')} | {'; '.join(note)} |")


def judge_goal(size, rows):
    """tao-fast >= 1.5x the best peer's tokens/s at no more peak memory -> dict."""
    peer = best_peer(rows)
    tao = [r for r in rows if r["provider"] == "tao-fast" and r["status"] == "ok"]
    if peer is None or not tao:
        why = "no peer ran (OOM / skipped / error)" if peer is None else "tao-fast did not run"
        print(f"goal {size}: cannot be judged: {why}")
        return {"met": None, "why": why}
    mem_known = peer.get("peak_gib") is not None
    fits = [r for r in tao if not mem_known or r["peak_gib"] <= peer["peak_gib"]]
    best = max(fits or tao, key=lambda r: r["tokens_per_s"])
    speedup = best["tokens_per_s"] / peer["tokens_per_s"]
    mem_ok = bool(fits) if mem_known else None
    met = None if mem_ok is None else bool(speedup >= SPEEDUP_GOAL and mem_ok)
    mem_txt = (f"{best.get('peak_gib', float('nan')):.1f} vs {peer['peak_gib']:.1f} GiB"
               if mem_known else "peak memory not measured on CPU")
    verdict = "MET" if met else ("NOT JUDGED (no memory numbers)" if mem_ok is None
                                 else "NOT MET")
    print(f"goal {size}: >= {SPEEDUP_GOAL}x best peer ({peer['provider']} @{peer['mb_tokens']}: "
          f"{peer['tokens_per_s']:,.0f} tok/s) at no more peak memory: tao-fast "
          f"@{best['mb_tokens']}: {best['tokens_per_s']:,.0f} tok/s = {speedup:.2f}x, "
          f"{mem_txt}{'' if fits or not mem_known else ' (no tao-fast run fits)'} -> {verdict}")
    return {"met": met, "speedup": speedup, "memory_ok": mem_ok, "peer": peer["provider"],
            "peer_mb_tokens": peer["mb_tokens"], "tao_mb_tokens": best["mb_tokens"]}


# ----------------------------------------------------------------------------- main

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny model, fp32, torch ops")
    ap.add_argument("--models", default="0.5b,1.5b", help="comma list of " + ",".join(MODELS))
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--seqs", type=int, default=48, help="sequences per step")
    ap.add_argument("--mb-tokens", type=int, default=16384, help="real tokens per micro-batch")
    ap.add_argument("--min-mb-tokens", type=int, default=2048, help="OOM fallback floor")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ops-backend", default="auto", choices=ops.BACKENDS)
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--force", action="store_true", help="time even if the check fails")
    cfg = ap.parse_args(argv)
    # the same allocator for every provider; fewer fragmentation OOMs between micro-batches
    # of different shapes (set before the first CUDA allocation; max_memory_allocated unaffected)
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    if cfg.dry_run:  # everything scaled down ~10x; the same code path
        cfg.models, cfg.seqs, cfg.mb_tokens, cfg.min_mb_tokens = "tiny", 12, 512, 512
        cfg.warmup, cfg.steps, cfg.ops_backend = 1, 2, "torch"
        device, dtype = torch.device("cpu"), torch.float32
        prompt_range, resp_range, check_lens = (10, 50), (5, 200), [1, 7, 30, 77]
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: run with --dry-run for the CPU smoke path")
        device, dtype = torch.device("cuda"), torch.bfloat16
        prompt_range, resp_range, check_lens = (100, 500), (50, 2000), [1, 37, 300, 777]
    sizes = [s for s in cfg.models.split(",") if s]
    wanted = [p for p in PROVIDERS if p in cfg.providers.split(",")]  # canonical order
    budgets = []
    b = cfg.mb_tokens
    while b >= cfg.min_mb_tokens or not budgets:
        budgets.append(b)
        b //= 2

    versions = {"torch": torch.__version__}
    for mod in ("triton", "transformers", "liger_kernel"):
        if importlib.util.find_spec(mod):
            try:
                versions[mod] = version(mod.replace("_", "-"))
            except Exception:  # noqa: BLE001 (importable but not pip-installed)
                versions[mod] = "?"
    liger_note = None if "liger_kernel" in versions else "skipped: liger_kernel not importable"
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak_tflops = measure_matmul_tflops(device, dtype)
    print(f"device {dev_name}; {versions}; dtype {dtype}; ops backend {cfg.ops_backend}")
    print(f"measured dense matmul: {peak_tflops:.1f} TFLOP/s "
          f"({'8192^3' if device.type == 'cuda' else '256^3'}, {str(dtype)[6:]})")

    result = {"device": dev_name, "versions": versions, "dtype": str(dtype),
              "matmul_tflops_measured": peak_tflops, "nominal_tflops": NOMINAL_TFLOPS,
              "config": {k: v for k, v in vars(cfg).items()}, "models": {}}
    weights, workloads, all_ok = {}, {}, True
    for size in sizes:
        args = model_args(size)
        sd32, n_hf = make_weights(args, device, cfg.seed)
        n = args.param_count()
        assert n == n_hf, f"param_count {n} != transformers' {n_hf}"
        wl = workloads[size] = make_workload(cfg.seqs, prompt_range, resp_range,
                                             args.vocab_size, cfg.seed)
        info = {"params": n, "matmul_params": matmul_params(args), "args": MODELS[size],
                "step_tokens": sum(wl.lengths), "step_response_tokens": wl.n_counted,
                "step_seqs": len(wl.seqs), "step_flops": step_flops(args, wl.lengths),
                "micro_batches": {b: len(pack_sequences(wl.lengths, b)) for b in budgets},
                "rows": []}
        print(f"\n{size}: {n / 1e6:.1f}M params; step: {len(wl.seqs)} seqs, "
              f"{info['step_tokens']} tokens ({wl.n_counted} response), "
              f"{info['step_flops'] / 1e12:.2f} TFLOP; micro-batches per budget "
              f"{info['micro_batches']}")
        if not cfg.skip_check:
            ok, info["check"] = check_parity(args, sd32, check_lens, device, torch.bfloat16,
                                             cfg.ops_backend)
            all_ok &= ok
        weights[size] = {k: v.to(dtype) for k, v in sd32.items()}
        del sd32
        result["models"][size] = info
    if not all_ok and not cfg.force:
        sys.exit("correctness check FAILED: not timing (use --force to time anyway)")

    for provider in wanted:  # provider-major: Liger's patches must come after plain transformers
        if provider.startswith("liger"):
            if liger_note:
                for size in sizes:
                    result["models"][size]["rows"].append(
                        {"provider": provider, "status": liger_note})
                print(f"{provider}: {liger_note}")
                continue
            try:
                apply_liger(model_args(sizes[0]))
            except Exception as e:  # noqa: BLE001
                liger_note = f"error applying Liger patches: {type(e).__name__}: {str(e)[:120]}"
                for size in sizes:
                    result["models"][size]["rows"].append({"provider": provider,
                                                           "status": liger_note})
                print(f"{provider}: {liger_note}")
                continue
        for size in sizes:
            args, info = model_args(size), result["models"][size]
            t0 = time.perf_counter()
            row = run_provider(provider, args, weights[size], workloads[size], budgets, device,
                               dtype, cfg, info["step_flops"], peak_tflops)
            info["rows"].append(row)
            print(f"{provider} {size}: {row['status']}"
                  + (f", {row['tokens_per_s']:,.0f} tok/s @{row['mb_tokens']}"
                     if row["status"] == "ok" else "")
                  + f" ({time.perf_counter() - t0:.0f} s)")

    for size in sizes:  # matched memory: re-run tao-fast at smaller budgets if it uses more
        args, info = model_args(size), result["models"][size]
        peer = best_peer(info["rows"])
        tao = [r for r in info["rows"] if r["provider"] == "tao-fast" and r["status"] == "ok"]
        if not (peer and tao and peer.get("peak_gib") is not None):
            continue
        cur = tao[0]
        while cur["peak_gib"] > peer["peak_gib"] and cur["mb_tokens"] // 2 >= cfg.min_mb_tokens:
            row = run_provider("tao-fast", args, weights[size], workloads[size],
                               [cur["mb_tokens"] // 2], device, dtype, cfg, info["step_flops"],
                               peak_tflops)
            row["matched_memory"] = True
            info["rows"].append(row)
            if row["status"] != "ok":
                break
            cur = row

    print("\ntokens/s: real tokens (prompt + response, no padding) per second; MFU: useful "
          "FLOPs (6*N*tokens + causal attention) / step time / peak")
    for size in sizes:
        info = result["models"][size]
        print_table(size, info["params"], info["rows"])
    print()
    for size in sizes:
        result["models"][size]["goal"] = judge_goal(size, result["models"][size]["rows"])

    out_dir = os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "out")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "gpu_learner_step" + ("_dry" if cfg.dry_run else "") + ".json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=str)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
