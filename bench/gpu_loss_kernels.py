"""Loss kernels on the GPU: fused linear log-prob vs eager torch, Liger, CCE, cuBLAS; fused
pg_loss vs device-to-device copy bandwidth.

    python bench/gpu_loss_kernels.py              # GPU: correctness checks, then the tables
    python bench/gpu_loss_kernels.py --dry-run    # CPU smoke run: tiny shapes (tao-fast rows
                                                  # only under TRITON_INTERPRET=1)

First checks the Triton linear_logprob (bf16 and fp32, logp + entropy + both grads, several
backward chunks, run-to-run bitwise equality) against a float64 oracle and pg_loss against the
torch reference; a failure exits non-zero before timing (--force: time anyway, exit 1 at the
end). Then for bf16, H=4096, V in {128256, 32000}, T in {4096, 16384, 32768}: forward and
forward+backward time (bench/harness.py: median of CUDA-event timings, L2 flushed between
reps), TFLOP/s (fwd 2*T*H*V, fwd+bwd 3x that: the recompute is not charged) and peak extra
memory (max_memory_allocated minus what is allocated once the previous run's gradients are
freed: inputs excluded, this run's gradients included) for the providers:
  tao-fast, tao-fast+entropy   tao_fast.ops.linear_logprob(..., backend="triton"): the kernel,
                               never the torch fallback; the row records the kernel's
                               backward_info() (its dW accumulation path) when it exists
  torch-eager                  matmul + log_softmax + gather (holds [T, V] fp32)
  liger-flce                   Liger-Kernel's LigerFusedLinearCrossEntropyLoss (reduction
                               'none'); it computes the gradients inside its forward, so its
                               fwd is really fwd+bwd
  cce                          Cut Cross-Entropy's linear_cross_entropy (reduction 'none',
                               default gradient filtering)
  floor: cuBLAS matmuls        the same GEMMs alone
and, only when named in --providers (slow: excluded by default), torch-chunked-ref (tao-fast's
CPU fallback: recasts the weight per chunk) and torch-compile (compiles twice per shape).
A provider that is not installed, runs out of memory or fails gets that in its row; the others
still run. `--shapes 128256x4096,...` runs a subset.
Rows are printed as measured and appended to $OUT/gpu_loss_kernels.jsonl (or --jsonl).
"""
from __future__ import annotations

import argparse
import sys

import torch

from harness import (add_output_args, free_device, isolate, open_results, peak_extra_mib,
                     time_ms)
from gpu_smoke import backward_info

IGN = -100
DEFAULT_PROVIDERS = ("tao-fast", "tao-fast+entropy", "torch-eager", "liger-flce", "cce")
SLOW_PROVIDERS = ("torch-chunked-ref", "torch-compile")
LLP_COLUMNS = [("provider", "provider", ""), ("fwd_ms", "fwd ms", ".2f"),
               ("fwd_tflops", "fwd TFLOP/s", ".3g"), ("fwd_bwd_ms", "fwd+bwd ms", ".2f"),
               ("fwd_bwd_tflops", "fwd+bwd TFLOP/s", ".3g"), ("fwd_mib", "fwd MiB", ".0f"),
               ("fwd_bwd_mib", "fwd+bwd MiB", ".0f")]
PG_COLUMNS = [("provider", "provider", ""), ("tokens", "tokens", "d"),
              ("fwd_ms", "fwd ms", ".3f"), ("fwd_pct_copy_bw", "% copy BW", ".0f"),
              ("fwd_bwd_ms", "fwd+bwd ms", ".3f"), ("fwd_bwd_pct_copy_bw", "% copy BW", ".0f")]


def naive_logprob(hidden, weight, targets):
    logits = (hidden @ weight.t()).float()  # [T, V]
    logp = torch.log_softmax(logits, -1).gather(1, targets.clamp(min=0)[:, None])[:, 0]
    return torch.where(targets != IGN, logp, torch.zeros_like(logp))  # [T]


def _tao(entropy: bool):
    from tao_fast import ops

    def fn(h, w, t):
        out = ops.linear_logprob(h, w, t, return_entropy=entropy, backend="triton")
        return sum(out) if entropy else out
    return fn


def _liger():
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    liger = LigerFusedLinearCrossEntropyLoss(reduction="none")
    return lambda h, w, t: liger(w, h, t)


def _cce():
    from cut_cross_entropy import linear_cross_entropy

    return lambda h, w, t: linear_cross_entropy(h, w, t, reduction="none")


def _chunked_ref():
    from tao_fast.kernels import reference

    return lambda h, w, t: reference.linear_logprob(h, w, t)[0]


PROVIDERS = {  # name -> factory of fn(hidden [T, H], weight [V, H], targets [T]) -> [T]
    "tao-fast": lambda: _tao(False), "tao-fast+entropy": lambda: _tao(True),
    "torch-eager": lambda: naive_logprob, "liger-flce": _liger, "cce": _cce,
    "torch-chunked-ref": _chunked_ref,
    "torch-compile": lambda: torch.compile(naive_logprob, dynamic=False),
}


def measure(name, make, hidden, weight, targets, device, flops) -> dict:
    """One row: fwd and fwd+bwd time, TFLOP/s and peak extra memory; an error in its row."""
    row = {"provider": name}
    with isolate(row, device):
        fn = make()
        leaves = [hidden.detach().requires_grad_(), weight.detach().requires_grad_()]

        def fwd():
            with torch.no_grad():
                return fn(hidden, weight, targets)

        def free_grads():
            for x in leaves:
                x.grad = None

        def fwd_bwd():
            free_grads()
            fn(*leaves, targets).float().sum().backward()

        for key, f, fl in (("fwd", fwd, flops), ("fwd_bwd", fwd_bwd, 3 * flops)):
            row[f"{key}_ms"] = time_ms(f, device)
            row[f"{key}_tflops"] = fl / row[f"{key}_ms"] / 1e9
            row[f"{key}_mib"] = peak_extra_mib(f, device, free_before=free_grads)
            free_grads()
        if name.startswith("tao-fast"):
            row["backward_info"] = backward_info()
    return row


def floor_row(hidden, weight, device, flops) -> dict:
    """cuBLAS: logits = h @ W.T (fwd); bwd = dX @ W and dX.T @ h (two more of the same)."""
    row = {"provider": "floor: cuBLAS matmuls"}
    with isolate(row, device):
        dx = torch.empty(hidden.shape[0], weight.shape[0], dtype=hidden.dtype, device=device)
        fwd = time_ms(lambda: torch.mm(hidden, weight.t(), out=dx), device)
        bwd = time_ms(lambda: (torch.mm(dx, weight), torch.mm(dx.t(), hidden)), device)
        row.update(fwd_ms=fwd, fwd_tflops=flops / fwd / 1e9, fwd_bwd_ms=fwd + bwd,
                   fwd_bwd_tflops=3 * flops / (fwd + bwd) / 1e9)
    return row


def check_linear_logprob(res, device) -> bool:
    """Triton kernel vs a float64 oracle; bf16 within 2x torch-bf16's own error; run-to-run
    bitwise equal; several backward chunks (the kernels' module-level chunk size, lowered)."""
    from tao_fast.kernels import linear_logprob as llp
    ok = True
    for dtype, T, V, H, chunk_bytes in ((torch.bfloat16, 700, 32000, 512, None),
                                        (torch.bfloat16, 700, 5003, 4096, 128 * 5003 * 2),
                                        (torch.float32, 333, 5003, 200, None)):
        g = torch.Generator(device="cpu").manual_seed(T)
        h = torch.randn(T, H, generator=g).to(device, dtype)
        w = (torch.randn(V, H, generator=g) * 2 / H ** 0.5).to(device, dtype)
        t = torch.randint(0, V, (T,), generator=g).to(device)
        t[::7] = IGN
        g_lp, g_ent = torch.randn(2, T, generator=g).to(device)
        saved = llp._DX_CHUNK_BYTES
        llp._DX_CHUNK_BYTES = chunk_bytes or saved
        try:
            runs = [_llp_run(llp.linear_logprob, h, w, t, g_lp, g_ent) for _ in range(2)]
        finally:
            llp._DX_CHUNK_BYTES = saved
        same = all(torch.equal(a, b) for a, b in zip(*runs))
        oracle, plain = (_llp_oracle(h, w, t, g_lp, g_ent, dt) for dt in (torch.float64, dtype))
        rel = lambda x, r: ((x.double() - r.double()).norm() / r.double().norm()).item()  # noqa
        ours = [rel(x, r) for x, r in zip(runs[0], oracle)]
        bound = [1e-4] * 4 if dtype == torch.float32 else \
            [2 * rel(p, r) + 1e-6 for p, r in zip(plain, oracle)]
        ok &= res.check(f"linear_logprob {str(dtype)[6:]} T={T} V={V} H={H}",
                        same and all(o <= b for o, b in zip(ours, bound)),
                        f"rel err (logp, ent, dh, dW) {', '.join(f'{o:.2e}' for o in ours)} <= "
                        f"{', '.join(f'{b:.1e}' for b in bound)}; bitwise deterministic: {same}")
    return ok


def _llp_run(impl, h, w, t, g_lp, g_ent):
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    lp, ent = impl(hh, ww, t, temperature=0.7, return_entropy=True)
    (lp * g_lp + ent * g_ent).sum().backward()
    return lp, ent, hh.grad, ww.grad


def _llp_oracle(h, w, t, g_lp, g_ent, dtype):
    """The matmul in `dtype`, the rest in float64: the oracle (float64) or plain torch."""
    hh, ww = h.to(dtype).requires_grad_(), w.to(dtype).requires_grad_()
    logq = torch.log_softmax((hh @ ww.t()).double() / 0.7, -1)  # [T, V]
    lp = torch.where(t != IGN, logq.gather(1, t.clamp(min=0)[:, None])[:, 0], 0.0)
    ent = torch.where(t != IGN, -(logq.exp() * logq).sum(-1), 0.0)
    (lp * g_lp.double() + ent * g_ent.double()).sum().backward()
    return lp, ent, hh.grad, ww.grad


PG_KW = dict(kl_coef=0.01, kl_estimator="k3", clip_low=0.2, clip_high=0.28, dual_clip=3.0,
             tis_cap=2.0, loss_norm=None, agg="token-mean", cu_seqlens=None)


def _pg_inputs(N, device):
    g = torch.Generator(device="cpu").manual_seed(N)
    logp = (torch.randn(N, generator=g) * 0.3 - 1).to(device)
    old = logp + 0.2 * torch.randn(N, generator=g).to(device)
    return dict(logp=logp, old_logp=old, advantages=torch.randn(N, generator=g).to(device),
                mask=(torch.rand(N, generator=g) > 0.2).to(device),
                ref_logp=logp + 0.1 * torch.randn(N, generator=g).to(device),
                sampler_logp=old + 0.1 * torch.randn(N, generator=g).to(device))


def pg_impls(device):
    from tao_fast import ops
    from tao_fast.kernels import reference

    impls = {"torch-reference": reference.pg_loss}
    if device.type == "cuda":
        impls["tao-fast"] = lambda *a, **k: ops.pg_loss(*a, **k, backend="triton")
    return impls


def check_pg_loss(res, device, sizes) -> bool:
    impls, ok = pg_impls(device), True
    if "tao-fast" not in impls:
        return ok
    for N in sizes:
        inp, outs = _pg_inputs(N, device), {}
        for name, f in impls.items():
            lp = inp["logp"].clone().requires_grad_()
            loss, st = f(**dict(inp, logp=lp), **PG_KW)
            loss.backward()
            outs[name] = torch.stack([loss.detach(), *st.values()]), lp.grad
        good = all(torch.allclose(a, b, rtol=1e-4, atol=1e-6)
                   for a, b in zip(outs["tao-fast"], outs["torch-reference"]))
        ok &= res.check(f"pg_loss N={N}", good, "loss, stats and grad match the reference")
    return ok


def copy_bandwidth_gbs(device) -> float:
    """Device-to-device copy, bytes read + written per second (256 MiB on a GPU), GB/s."""
    x = torch.empty(2 ** 28 if device.type == "cuda" else 2 ** 22, dtype=torch.uint8,
                    device=device)
    y = torch.empty_like(x)
    return 2 * x.numel() / time_ms(lambda: y.copy_(x), device) / 1e6


def bench_pg_loss(res, device, sizes) -> None:
    """pg_loss fwd and fwd+bwd time as a share of the device's copy bandwidth."""
    copy_gbs = copy_bandwidth_gbs(device)
    table = res.table("pg_loss", f"pg_loss (fp32 per-token tensors, all options on; copy "
                      f"bandwidth {copy_gbs:.0f} GB/s)", PG_COLUMNS)
    for N in sizes:
        inp = _pg_inputs(N, device)
        # bytes: 5 fp32 inputs + bool mask read, per-token grad written (fwd); + read it,
        # write grad logp (bwd)
        fwd_bytes, bwd_bytes = N * (5 * 4 + 1 + 4), N * (4 + 4)
        for name, f in pg_impls(device).items():
            row = {"provider": name, "tokens": N, "copy_gb_per_s": copy_gbs}
            with isolate(row, device):
                leaf = inp["logp"].detach().requires_grad_()

                def fwd_bwd(f=f, leaf=leaf):
                    leaf.grad = None
                    f(**dict(inp, logp=leaf), **PG_KW)[0].backward()
                with torch.no_grad():
                    row["fwd_ms"] = time_ms(lambda f=f: f(**inp, **PG_KW), device)
                row["fwd_bwd_ms"] = time_ms(fwd_bwd, device)
                row["fwd_pct_copy_bw"] = 100 * fwd_bytes / row["fwd_ms"] / 1e6 / copy_gbs
                row["fwd_bwd_pct_copy_bw"] = (100 * (fwd_bytes + bwd_bytes) / row["fwd_bwd_ms"]
                                              / 1e6 / copy_gbs)
            table.add(row)


def providers_for(arg: str, device) -> list[str]:
    names = [p for p in arg.split(",") if p] or list(DEFAULT_PROVIDERS)
    unknown = [p for p in names if p not in PROVIDERS]
    if unknown:
        sys.exit(f"gpu_loss_kernels.py: --providers: unknown {unknown} (known: "
                 f"{', '.join(PROVIDERS)})")
    return names


def bench_shape(res, V, T, H, dtype, device, names) -> None:
    g = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(T, H, generator=g).to(device, dtype)  # [T, H]
    weight = (torch.randn(V, H, generator=g) / H ** 0.5).to(device, dtype)  # [V, H]
    targets = torch.randint(0, V, (T,), generator=g).to(device)  # [T]
    flops = 2 * T * H * V
    table = res.table(f"linear_logprob V={V} T={T}",
                      f"linear_logprob {str(dtype)[6:]} T={T} H={H} V={V}", LLP_COLUMNS)
    for name in names:
        table.add(measure(name, PROVIDERS[name], hidden, weight, targets, device, flops))
    table.add(floor_row(hidden, weight, device, flops))
    for row in table.rows:
        if "backward_info" in row:  # the kernel's dW accumulation path in the last backward
            res.note(f"linear_logprob V={V} T={T} {row['provider']}: backward_info "
                     f"{row['backward_info']}")
    del hidden, weight, targets
    free_device(device)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes")
    ap.add_argument("--providers", default="",
                    help=f"comma list (default {','.join(DEFAULT_PROVIDERS)}; also "
                         f"{','.join(SLOW_PROVIDERS)})")
    ap.add_argument("--shapes", default="", help="comma list of VxT, e.g. 128256x4096")
    ap.add_argument("--force", action="store_true", help="time even if a check fails")
    add_output_args(ap, "gpu_loss_kernels")
    args = ap.parse_args(argv)
    device = torch.device("cpu" if args.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --dry-run for the CPU smoke path")
    if args.dry_run:
        H, shapes, dtype, pg_sizes = 64, [(1000, 64), (1000, 128)], torch.float32, [4096]
    else:
        H, dtype, pg_sizes = 4096, torch.bfloat16, [32768, 1 << 24]
        shapes = [(V, T) for V in (128256, 32000) for T in (4096, 16384, 32768)]
    if args.shapes:
        shapes = [tuple(int(n) for n in s.split("x")) for s in args.shapes.split(",")]
    names = providers_for(args.providers, device)
    res = open_results(args, "gpu_loss_kernels", args.dry_run)
    res.meta(device, dtype=str(dtype), H=H, providers=names)
    ok = check_linear_logprob(res, device) if device.type == "cuda" else True
    ok &= check_pg_loss(res, device, pg_sizes)
    if not ok and not args.force:
        sys.exit("correctness check FAILED: not timing (use --force to time anyway)")
    bench_pg_loss(res, device, pg_sizes)
    for V, T in shapes:
        bench_shape(res, V, T, H, dtype, device, names)
    res.close()
    if not ok:
        print("correctness check FAILED (timed anyway: --force)", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
