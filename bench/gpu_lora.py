"""LoRA on the GPU: the adapted model's log-probs against a float64 oracle, and the learner's
step time and peak memory with LoRA vs full-weight, on the real Learner (Triton ops).

    python bench/gpu_lora.py              # GPU: check, then the table (~60 s)
    python bench/gpu_lora.py --dry-run    # CPU smoke run: a tiny model, torch ops

Model: a random-initialised Qwen2.5-1.5B-shaped decoder (hidden 1536, inter 8960, 28 layers,
12 heads / 2 KV heads, head_dim 128, vocab 151936, tied embeddings, qkv bias), bf16.
Check (a failure exits non-zero unless --force): LoRA rank 16 on all seven linears with random
B (so the adapters matter), bf16 base + fp32 adapters, Triton ops; the oracle is the merged
model in float64 (torch ops). Passes when its mean and max abs log-prob error over 4 packed
sequences (lengths 1, 37, 300, 777) are at most 2x the merged model's own error in bf16 with
torch ops, plus 1e-3.
Step: `--seqs` sequences (prompt 100-500 tokens, response 50-1000, random ids, seed 0, random
advantages), rl.micro_batch_tokens `--mb-tokens`, one Learner.step (PPO clip, AdamW) per
measurement: `--warmup` steps, then the median of `--steps`. Arms: "full" (every bf16 weight
trains, AdamW state bf16 like the weights) and "lora" (the base frozen in bf16, the rank-16
adapters and their AdamW state fp32). Peak memory: torch.cuda.max_memory_allocated over the
timed steps (weights, gradients, optimizer state, activations), GiB. Adapter sync payload: the
adapter's bytes in bf16 (what goes into vLLM's LoRA slots) vs the whole model's.
"""
from __future__ import annotations

import argparse
import copy
import random
import statistics
import sys
import time

import torch

from harness import add_output_args, error_text, open_results, sync

QWEN_1_5B = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28,
                 num_heads=12, num_kv_heads=2, head_dim=128, tie_word_embeddings=True,
                 qkv_bias=True)
TINY = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
            num_kv_heads=2, head_dim=16, tie_word_embeddings=True, qkv_bias=True)


def build(shape: dict, device, rank: int, backend: str, seed: int = 0):
    """(full-weight model, LoRA model) on the same random base, bf16 (fp32 adapters)."""
    from tao_fast.config import LoraConfig
    from tao_fast.models import lora
    from tao_fast.models.config import ModelArgs
    from tao_fast.models.llama import Transformer

    torch.manual_seed(seed)
    with torch.device(device):
        full = Transformer(ModelArgs(**shape))
    with torch.no_grad():
        for p in full.parameters():
            p.normal_(0.0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    full = full.to(torch.bfloat16)
    adapted = lora.apply_lora(copy.deepcopy(full), LoraConfig(rank=rank, alpha=2 * rank),
                              torch.bfloat16)
    for m in (full, adapted):
        m.ops_backend = backend
    return full, adapted


def logprobs(model, seqs, device):
    from tao_fast import ops
    from tao_fast.rl.packing import make_packed_batch

    b = make_packed_batch(seqs, device=device)
    targets = torch.cat([torch.tensor(s[1:] + [-100]) for s in seqs]).to(device)
    with torch.no_grad():
        h = model(b.input_ids, b.positions, b.cu_seqlens, b.max_seqlen)
        return ops.linear_logprob(h, model.output_weight, targets, backend=model.ops_backend)


def check(res, adapted, lens, device, backend) -> bool:
    """LoRA (bf16 base, fp32 adapters, `backend` ops) vs the float64 merged oracle, bounded by
    twice the merged model's own bf16 error (torch ops)."""
    from tao_fast.models import lora

    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in lora.adapter_parameters(adapted):
            if ".lora_B." in n:
                p.copy_(torch.randn(p.shape, generator=g).to(p.device) * 0.02)
    vocab = adapted.args.vocab_size
    seqs = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lens]
    oracle = lora.merge_adapters(copy.deepcopy(adapted)).double()
    oracle.ops_backend = "torch"
    bf16 = copy.deepcopy(oracle).to(torch.bfloat16)
    want = logprobs(oracle, seqs, device)
    err = (logprobs(adapted, seqs, device).double() - want).abs()
    base = (logprobs(bf16, seqs, device).double() - want).abs()
    ok = (err.mean() <= 2 * base.mean() + 1e-3) and (err.max() <= 2 * base.max() + 1e-3)
    with torch.no_grad():
        for n, p in lora.adapter_parameters(adapted):
            if ".lora_B." in n:
                p.zero_()
    return res.check("lora logprobs vs float64 merged", ok,
                     f"LoRA bf16 ({backend}) mean {err.mean():.2e} max {err.max():.2e}; merged "
                     f"bf16 (torch) mean {base.mean():.2e} max {base.max():.2e}")


def workload(n_seqs: int, vocab: int, prompt=(100, 500), resp=(50, 1000)):
    from tao_fast.rl.trainer import Sample

    rng = random.Random(0)
    out = []
    for _ in range(n_seqs):
        p, r = rng.randint(*prompt), rng.randint(*resp)
        ids = [rng.randrange(vocab) for _ in range(p + r)]
        out.append(Sample(ids, p, rng.gauss(0, 1), [-1.0] * r))
    return out


def time_arm(model, samples, cfg, device, warmup: int, steps: int) -> dict:
    from tao_fast.rl.trainer import Learner

    learner = Learner(model, cfg, temperature=1.0, ops_backend=model.ops_backend)
    for _ in range(warmup):
        learner.step(samples)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    secs = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        learner.step(samples)
        sync(device)
        secs.append(time.perf_counter() - t0)
    tokens = sum(len(s.ids) for s in samples)
    peak = (torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None)
    return {"step_s": statistics.median(secs), "tokens_per_s": tokens / statistics.median(secs),
            "peak_gib": peak,
            "trained_m": sum(p.numel() for p in learner.trainable) / 1e6}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU smoke run: tiny model")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--seqs", type=int, default=16)
    ap.add_argument("--mb-tokens", type=int, default=16384)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--force", action="store_true", help="time even if the check fails")
    add_output_args(ap, "gpu_lora")
    a = ap.parse_args(argv)
    from tao_fast.config import RLConfig
    from tao_fast.models import lora

    dry = a.dry_run or not torch.cuda.is_available()
    device = torch.device("cpu" if dry else "cuda")
    backend = "torch" if dry else "triton"
    res = open_results(a, "gpu_lora", dry_run=dry)
    res.meta(device)
    shape = TINY if dry else QWEN_1_5B
    full, adapted = build(shape, device, a.rank, backend)
    lens = [1, 4, 30, 78] if dry else [1, 37, 300, 777]
    ok = check(res, adapted, lens, device, backend)
    if not ok and not a.force:
        print("gpu_lora: correctness check failed", file=sys.stderr)
        return 1
    samples = workload(4 if dry else a.seqs, shape["vocab_size"],
                       *(((10, 50), (5, 100)) if dry else ()))
    cfg = RLConfig(lr=1e-5, micro_batch_tokens=512 if dry else a.mb_tokens)
    tab = res.table("lora_vs_full", f"Learner step, {'tiny' if dry else 'Qwen2.5-1.5B'}-shaped "
                    f"bf16, LoRA rank {a.rank} vs full-weight ({backend} ops)",
                    [("arm", "arm", ""), ("trained_m", "trained M", ".2f"),
                     ("step_s", "step s", ".3f"), ("tokens_per_s", "tokens/s", ",.0f"),
                     ("peak_gib", "peak GiB", ".1f"), ("sync_mib", "sync MiB (bf16)", ",.1f")])
    n_adapter = sum(p.numel() for _, p in lora.adapter_parameters(adapted))
    sync_mib = {"full": sum(p.numel() for p in full.parameters()) * 2 / 2**20,
                "lora": n_adapter * 2 / 2**20}
    for arm, model in (("lora", adapted), ("full", full)):
        try:
            row = time_arm(model, samples, cfg, device, a.warmup, 1 if dry else a.steps)
            tab.add({"arm": arm, **row, "sync_mib": sync_mib[arm]})
        except Exception as e:  # noqa: BLE001 - an OOM or a kernel failure is a row
            tab.add({"arm": arm, "error": error_text(e)})
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    res.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
