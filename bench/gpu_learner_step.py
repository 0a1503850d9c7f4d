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
Liger providers are skipped with a note when liger_kernel is not importable (bench/fetch_wheels.sh
fetches the pinned wheel for a GPU machine). Liger patches transformers' Qwen2 module globally,
so providers run in the order above (all sizes of one provider, then the next).

Out of memory: a provider that runs out of memory at `--mb-tokens` is retried with the budget
halved, down to `--min-mb-tokens`; the row says which budgets ran out of memory ("OOM" when all
did). Peers then run at the largest budget that fits them. If tao-fast's peak memory exceeds
the best peer's, tao-fast is re-run at halved budgets until it uses no more (matched memory).

Timing: the micro-batches are built on the device first; `--warmup` steps (compiles, Triton JIT,
optimizer state) then `--steps` timed steps, each between CUDA events with L2 flushed before it
(bench/harness.py; perf_counter on CPU); the median step time is used. The in-house model's ops
run with backend "triton" on the GPU (--ops-backend), so a timing is never of the torch
fallback. tokens/s counts real (unpadded) tokens, prompt + response.
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
Rows are printed as each provider finishes and appended to $OUT/gpu_learner_step.jsonl (or
--jsonl): a run stopped at its time limit keeps the rows it finished.
Code: bench/learner/ (models, workload, losses, loop, providers, check, report); this file is the
command line and the order of work.
"""
from __future__ import annotations
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from harness import add_output_args, error_text, open_results, time_ms
from learner.check import check_parity
from learner.models import MODELS, apply_liger, make_weights, model_args
from learner.providers import (NOMINAL_TFLOPS, PROVIDERS, StepSetup, matched_memory_runs,
                               run_provider)
from learner.report import COLUMNS, judge_goal, row_note
from learner.workload import make_workload, matmul_params, step_flops
from tao_fast import ops
from tao_fast.rl.packing import pack_sequences


def measure_matmul_tflops(device, dtype) -> float:
    """Dense matmul rate: 8192^3 on a GPU (256^3 on the CPU), median (bench/harness.py)."""
    n = 8192 if device.type == "cuda" else 256
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    c = torch.empty(n, n, device=device, dtype=dtype)
    ms = time_ms(lambda: torch.matmul(a, b, out=c), device, warmup=5, budget_ms=0, min_reps=20,
                 max_reps=20)
    return 2 * n ** 3 / (ms / 1e3) / 1e12


def budgets_of(cfg) -> list[int]:
    """--mb-tokens, halved down to --min-mb-tokens (at least one)."""
    out, b = [], cfg.mb_tokens
    while b >= cfg.min_mb_tokens or not out:
        out.append(b)
        b //= 2
    return out


def prepare_size(res, size, cfg, env, peak_tflops):
    """Weights, workload and the parity check of one model size -> (StepSetup, info, ok)."""
    args = model_args(size)
    sd32, n_hf = make_weights(args, env["device"], cfg.seed)
    n = args.param_count()
    if n != n_hf:
        raise RuntimeError(f"gpu_learner_step.py: param_count {n} != transformers' {n_hf}")
    wl = make_workload(cfg.seqs, env["prompt_range"], env["resp_range"], args.vocab_size,
                       cfg.seed)
    info = {"params": n, "matmul_params": matmul_params(args), "args": MODELS[size],
            "step_tokens": sum(wl.lengths), "step_response_tokens": wl.n_counted,
            "step_seqs": len(wl.seqs), "step_flops": step_flops(args, wl.lengths),
            "micro_batches": {b: len(pack_sequences(wl.lengths, b)) for b in budgets_of(cfg)}}
    res.note(f"{size}: {n / 1e6:.1f}M params; step: {len(wl.seqs)} seqs, "
             f"{info['step_tokens']} tokens ({wl.n_counted} response), "
             f"{info['step_flops'] / 1e12:.2f} TFLOP; micro-batches per budget "
             f"{info['micro_batches']}", model=size, **info)
    ok = True
    if not cfg.skip_check:
        ok, info["check"] = check_parity(res, args, sd32, env["check_lens"], env["device"],
                                         torch.bfloat16, cfg.ops_backend)
    setup = StepSetup(args, {k: v.to(env["dtype"]) for k, v in sd32.items()}, wl, env["device"],
                      env["dtype"], cfg.ops_backend, cfg.warmup, cfg.steps, info["step_flops"],
                      peak_tflops)
    return setup, ok


def liger_status() -> str:
    """Apply Liger's patches (global): '' when applied, else why the Liger rows are skipped."""
    try:
        apply_liger(model_args("tiny").model_type)
    except Exception as e:  # noqa: BLE001 (ImportError, or a patch that fails)
        return f"skipped: {error_text(e)}"
    return ""


def run_all(table, setups, wanted, cfg) -> dict:
    """Every provider (provider-major: Liger's patches come after plain transformers) on every
    size, then the matched-memory re-runs; rows are printed as they finish. -> rows per size"""
    rows = {size: [] for size in setups}
    liger_note = None  # None until the first Liger provider applies the patches
    for provider in wanted:
        if provider.startswith("liger") and liger_note is None:
            liger_note = liger_status()
        for size, s in setups.items():
            t0 = time.perf_counter()
            if provider.startswith("liger") and liger_note:
                row = {"provider": provider, "model": size, "status": liger_note}
            else:
                row = run_provider(provider, size, s, budgets_of(cfg))
            row["seconds"] = time.perf_counter() - t0
            row["note"] = row_note(row)
            rows[size].append(table.add(row))
    for size, s in setups.items():
        for row in matched_memory_runs(size, s, rows[size], cfg.min_mb_tokens):
            row["note"] = row_note(row)
            rows[size].append(table.add(row))
    return rows


def environment(cfg) -> dict:
    """Device, dtype and lengths for this run (the dry run scales everything down ~10x)."""
    if cfg.dry_run:
        cfg.models, cfg.seqs, cfg.mb_tokens, cfg.min_mb_tokens = "tiny", 12, 512, 512
        cfg.warmup, cfg.steps = 1, 2
        cfg.ops_backend = cfg.ops_backend or "torch"
        return dict(device=torch.device("cpu"), dtype=torch.float32, prompt_range=(10, 50),
                    resp_range=(5, 200), check_lens=[1, 7, 30, 77])
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --dry-run for the CPU smoke path")
    cfg.ops_backend = cfg.ops_backend or "triton"
    return dict(device=torch.device("cuda"), dtype=torch.bfloat16, prompt_range=(100, 500),
                resp_range=(50, 2000), check_lens=[1, 37, 300, 777])


def parse_args(argv):
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
    ap.add_argument("--ops-backend", default=None, choices=ops.BACKENDS,
                    help="the in-house model's ops (default: triton on a GPU, torch dry)")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--force", action="store_true", help="time even if the check fails")
    add_output_args(ap, "gpu_learner_step")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    cfg = parse_args(argv)
    # the same allocator for every provider; fewer fragmentation OOMs between micro-batches
    # of different shapes (set before the first CUDA allocation; max_memory_allocated unaffected)
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    env = environment(cfg)
    device, dtype = env["device"], env["dtype"]
    wanted = [p for p in PROVIDERS if p in cfg.providers.split(",")]  # canonical order
    res = open_results(cfg, "gpu_learner_step", cfg.dry_run)
    res.meta(device, dtype=str(dtype), ops_backend=cfg.ops_backend, config=vars(cfg))
    peak = measure_matmul_tflops(device, dtype)
    shape = "8192^3" if device.type == "cuda" else "256^3"
    res.note(f"measured dense matmul: {peak:.1f} TFLOP/s ({shape}, {str(dtype)[6:]}); nominal "
             f"{NOMINAL_TFLOPS:.0f}", matmul_tflops_measured=peak)
    setups, all_ok = {}, True
    for size in [s for s in cfg.models.split(",") if s]:
        setups[size], ok = prepare_size(res, size, cfg, env, peak)
        all_ok &= ok
    if not all_ok and not cfg.force:
        sys.exit("correctness check FAILED: not timing (use --force to time anyway)")
    table = res.table("learner_step", "learner step: tokens/s = real tokens (prompt + response, "
                      "no padding) per second; MFU = useful FLOPs / step time / peak", COLUMNS)
    rows = run_all(table, setups, wanted, cfg)
    for size, size_rows in rows.items():
        line, goal = judge_goal(size, size_rows)
        res.note(line, model=size, goal=goal)
    res.close()
    if not all_ok:
        print("correctness check FAILED (timed anyway: --force)", flush=True)
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
