"""Loss kernels on the GPU: fused linear log-prob vs eager / compiled torch, Liger, CCE, cuBLAS;
fused pg_loss vs device-to-device copy bandwidth.

    python bench/gpu_loss_kernels.py              # GPU: correctness checks, then the tables
    python bench/gpu_loss_kernels.py --dry-run    # CPU smoke run: tiny shapes, torch providers

First checks the Triton linear_logprob (bf16 and fp32, logp + entropy + both grads, several
backward chunks, run-to-run bitwise equality) against a float64 oracle and pg_loss against the
torch reference; a failure exits non-zero before timing. Then for bf16, H=4096,
V in {128256, 32000}, T in {4096, 16384, 32768}: forward and forward+backward time (median of
CUDA-event timings), TFLOP/s (fwd 2*T*H*V, fwd+bwd 3x that: the recompute is not charged) and
peak extra memory (max_memory_allocated minus what was allocated before: inputs excluded,
gradients included) for: this kernel, torch eager (matmul + log_softmax + gather),
torch.compile of it, Liger-Kernel's LigerFusedLinearCrossEntropyLoss and Cut Cross-Entropy's
linear_cross_entropy (reduction='none': -logp per token; skipped with a note when not
installed; Liger computes the gradients inside its forward, so its fwd is really fwd+bwd; CCE
runs with its default gradient filtering), and the floor: cuBLAS matmuls of the same shapes.
OOM is reported as OOM. `--shapes 128256x4096,...` runs a subset (each torch.compile shape
compiles anew: the full sweep may take several minutes).
Writes JSON to $OUT/gpu_loss_kernels.json if $OUT is set, else bench/out/.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from tao_fast.kernels import reference

IGN = reference.IGNORE_INDEX


def naive_logprob(hidden, weight, targets):
    logits = (hidden @ weight.t()).float()  # [T, V]
    logp = torch.log_softmax(logits, -1).gather(1, targets.clamp(min=0)[:, None])[:, 0]
    return torch.where(targets != IGN, logp, torch.zeros_like(logp))


def _provider_fns(device):
    """name -> (fn(hidden, weight, targets) -> per-token tensor) or a str saying why skipped."""
    fns = {"torch-eager": naive_logprob, "torch-chunked-ref":
           lambda h, w, t: reference.linear_logprob(h, w, t)[0]}
    if device.type != "cuda":
        return fns
    from tao_fast.kernels.linear_logprob import linear_logprob
    fns["tao-fast"] = lambda h, w, t: linear_logprob(h, w, t)[0]
    fns["tao-fast+entropy"] = lambda h, w, t: sum(linear_logprob(h, w, t, return_entropy=True))
    fns["torch-compile"] = torch.compile(naive_logprob, dynamic=False)
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        liger = LigerFusedLinearCrossEntropyLoss(reduction="none")
        fns["liger-flce"] = lambda h, w, t: liger(w, h, t)
    except ImportError as e:
        fns["liger-flce"] = f"skipped: {e}"
    try:
        from cut_cross_entropy import linear_cross_entropy
        fns["cce"] = lambda h, w, t: linear_cross_entropy(h, w, t, reduction="none")
    except ImportError as e:
        fns["cce"] = f"skipped: {e}"
    return fns


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device, budget_s=2.0, max_reps=20):
    """Median wall time of fn() in ms: CUDA events on GPU, perf_counter on CPU."""
    fn()  # warm-up (and compile)
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    est = time.perf_counter() - t0
    reps = max(3, min(max_reps, int(budget_s / max(est, 1e-6))))
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_extra_mib(fn, device):
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20


def measure(name, fn, hidden, weight, targets, device):
    """One row: fwd / fwd+bwd time and peak extra memory, or the error (OOM) that stopped it."""
    row = {"provider": name}
    leaves = [hidden.detach().requires_grad_(), weight.detach().requires_grad_()]

    def fwd():
        with torch.no_grad():
            return fn(hidden, weight, targets)

    def fwd_bwd():
        for x in leaves:
            x.grad = None
        fn(*leaves, targets).float().sum().backward()

    for key, f in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
        try:
            row[f"{key}_ms"] = time_ms(f, device)
            row[f"{key}_mib"] = peak_extra_mib(f, device)
        except torch.cuda.OutOfMemoryError:
            row[f"{key}_ms"] = "OOM"
        except Exception as e:  # noqa: BLE001 (a provider failing must not stop the table)
            row[f"{key}_ms"] = f"error: {type(e).__name__}: {str(e)[:80]}"
        for x in leaves:
            x.grad = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def floor_row(hidden, weight, device):
    """cuBLAS: logits = h @ W.T (fwd); bwd = dX @ W and dX.T @ h (two more of the same flops)."""
    try:
        dx = torch.empty(hidden.shape[0], weight.shape[0], dtype=hidden.dtype, device=device)
        fwd = time_ms(lambda: torch.mm(hidden, weight.t(), out=dx), device)
        bwd = time_ms(lambda: (torch.mm(dx, weight), torch.mm(dx.t(), hidden)), device)
        del dx
        return {"provider": "floor: cuBLAS matmuls", "fwd_ms": fwd, "fwd_bwd_ms": fwd + bwd,
                "fwd_mib": None, "fwd_bwd_mib": None}
    except torch.cuda.OutOfMemoryError:
        return {"provider": "floor: cuBLAS matmuls", "fwd_ms": "OOM", "fwd_bwd_ms": "OOM"}


def _fmt(x, spec):
    return format(x, spec) if isinstance(x, (int, float)) else ("-" if x is None else str(x))


def print_table(title, rows, flops=None):
    print(f"\n{title}")
    print("| provider | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | fwd MiB "
          "| fwd+bwd MiB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        tf = ["-", "-"]
        if flops:
            for i, (k, fl) in enumerate((("fwd_ms", flops), ("fwd_bwd_ms", 3 * flops))):
                if isinstance(r.get(k), float):
                    tf[i] = f"{fl / r[k] / 1e9:.3g}"
        print(f"| {r['provider']} | {_fmt(r.get('fwd_ms'), '.2f')} | {tf[0]} | "
              f"{_fmt(r.get('fwd_bwd_ms'), '.2f')} | {tf[1]} | {_fmt(r.get('fwd_mib'), '.0f')} | "
              f"{_fmt(r.get('fwd_bwd_mib'), '.0f')} |")


def check_linear_logprob(device):
    """Triton kernel vs a float64 oracle; bf16 within 2x torch-bf16's own error. -> ok."""
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
        runs = []
        for _ in range(2):
            hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
            lp, ent = llp.linear_logprob(hh, ww, t, temperature=0.7, return_entropy=True)
            (lp * g_lp + ent * g_ent).sum().backward()
            runs.append((lp, ent, hh.grad, ww.grad))
        llp._DX_CHUNK_BYTES = saved
        same = all(torch.equal(a, b) for a, b in zip(*runs))
        errs = []
        for ref_dtype in (torch.float64, dtype):
            hh = h.to(ref_dtype).requires_grad_()
            ww = w.to(ref_dtype).requires_grad_()
            z = (hh @ ww.t()).double() / 0.7
            logq = torch.log_softmax(z, -1)
            lp = torch.where(t != IGN, logq.gather(1, t.clamp(min=0)[:, None])[:, 0], 0.0)
            ent = torch.where(t != IGN, -(logq.exp() * logq).sum(-1), 0.0)
            (lp * g_lp.double() + ent * g_ent.double()).sum().backward()
            errs.append((lp, ent, hh.grad, ww.grad))
        rel = lambda x, r: ((x.double() - r.double()).norm() / r.double().norm()).item()  # noqa
        ours = [rel(x, r) for x, r in zip(runs[0], errs[0])]
        plain = [rel(x, r) for x, r in zip(errs[1], errs[0])]
        bound = [1e-4] * 4 if dtype == torch.float32 else [2 * p + 1e-6 for p in plain]
        good = same and all(o <= b for o, b in zip(ours, bound))
        ok &= good
        print(f"linear_logprob {str(dtype)[6:]} T={T} V={V} H={H}: rel err (logp, ent, dh, dW) "
              f"{', '.join(f'{o:.2e}' for o in ours)} <= {', '.join(f'{b:.1e}' for b in bound)}; "
              f"bitwise deterministic: {same} -> {'PASS' if good else 'FAIL'}")
    return ok


PG_KW = dict(kl_coef=0.01, kl_estimator="k3", clip_low=0.2, clip_high=0.28, dual_clip=3.0,
             tis_cap=2.0, loss_norm=None)


def _pg_inputs(N, device):
    g = torch.Generator(device="cpu").manual_seed(N)
    logp = (torch.randn(N, generator=g) * 0.3 - 1).to(device)
    old = logp + 0.2 * torch.randn(N, generator=g).to(device)
    return dict(logp=logp, old_logp=old, advantages=torch.randn(N, generator=g).to(device),
                mask=(torch.rand(N, generator=g) > 0.2).to(device),
                ref_logp=logp + 0.1 * torch.randn(N, generator=g).to(device),
                sampler_logp=old + 0.1 * torch.randn(N, generator=g).to(device))


def bench_pg_loss(device, sizes):
    """pg_loss fwd and fwd+bwd vs copy bandwidth; correctness vs the reference first."""
    from tao_fast.kernels.pg_loss import pg_loss as fused
    impls = {"torch-reference": reference.pg_loss}
    if device.type == "cuda":
        impls["tao-fast"] = fused
    x = torch.empty(2 ** 28 if device.type == "cuda" else 2 ** 22, dtype=torch.uint8,
                    device=device)
    y = torch.empty_like(x)
    copy_gbs = 2 * x.numel() / time_ms(lambda: y.copy_(x), device) / 1e6
    del x, y
    ok, rows = True, []
    for N in sizes:
        inp = _pg_inputs(N, device)
        outs = {}
        for name, f in impls.items():
            lp = inp["logp"].clone().requires_grad_()
            loss, st = f(**dict(inp, logp=lp), agg="token-mean", cu_seqlens=None, **PG_KW)
            loss.backward()
            outs[name] = torch.stack([loss.detach(), *st.values()]), lp.grad
        if "tao-fast" in outs:
            good = all(torch.allclose(a, b, rtol=1e-4, atol=1e-6)
                       for a, b in zip(outs["tao-fast"], outs["torch-reference"]))
            ok &= good
            print(f"pg_loss N={N}: matches reference: {'PASS' if good else 'FAIL'}")
        # bytes: 5 fp32 inputs + bool mask read, per-token grad written (fwd); + read it,
        # write grad logp (bwd)
        fwd_bytes, bwd_bytes = N * (5 * 4 + 1 + 4), N * (4 + 4)
        for name, f in impls.items():
            leaf = inp["logp"].detach().requires_grad_()

            def fwd_bwd(f=f, leaf=leaf):
                leaf.grad = None
                f(**dict(inp, logp=leaf), agg="token-mean", cu_seqlens=None,
                  **PG_KW)[0].backward()
            with torch.no_grad():
                t_f = time_ms(lambda f=f: f(**inp, agg="token-mean", cu_seqlens=None, **PG_KW),
                              device)
            t_fb = time_ms(fwd_bwd, device)
            rows.append({"provider": name, "tokens": N, "fwd_ms": t_f, "fwd_bwd_ms": t_fb,
                         "fwd_pct_copy_bw": 100 * fwd_bytes / t_f / 1e6 / copy_gbs,
                         "fwd_bwd_pct_copy_bw": 100 * (fwd_bytes + bwd_bytes) / t_fb / 1e6
                         / copy_gbs})
    print(f"\npg_loss (fp32 per-token tensors, all options on; copy bandwidth {copy_gbs:.0f} GB/s)")
    print("| provider | tokens | fwd ms | % copy BW | fwd+bwd ms | % copy BW |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['provider']} | {r['tokens']} | {r['fwd_ms']:.3f} | {r['fwd_pct_copy_bw']:.0f} "
              f"| {r['fwd_bwd_ms']:.3f} | {r['fwd_bwd_pct_copy_bw']:.0f} |")
    return ok, {"copy_gb_per_s": copy_gbs, "rows": rows}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, torch providers")
    ap.add_argument("--providers", default="", help="comma list; default all")
    ap.add_argument("--shapes", default="", help="comma list of VxT, e.g. 128256x4096")
    ap.add_argument("--force", action="store_true", help="time even if a check fails")
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
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "dtype": str(dtype), "H": H, "linear_logprob": []}
    ok = True
    if device.type == "cuda":
        import triton
        result["triton"] = triton.__version__
        ok = check_linear_logprob(device)
    pg_ok, result["pg_loss"] = bench_pg_loss(device, pg_sizes)
    if not (ok and pg_ok) and not args.force:
        sys.exit("correctness check FAILED: not timing (use --force to time anyway)")
    fns = _provider_fns(device)
    wanted = [p for p in args.providers.split(",") if p] or list(fns)
    for V, T in shapes:
        g = torch.Generator(device="cpu").manual_seed(0)
        hidden = torch.randn(T, H, generator=g).to(device, dtype)
        weight = (torch.randn(V, H, generator=g) / H ** 0.5).to(device, dtype)
        targets = torch.randint(0, V, (T,), generator=g).to(device)
        rows = []
        for name in wanted:
            fn = fns[name]
            rows.append({"provider": name, "fwd_ms": fn} if isinstance(fn, str)
                        else measure(name, fn, hidden, weight, targets, device))
        rows.append(floor_row(hidden, weight, device))
        flops = 2 * T * H * V
        print_table(f"linear_logprob {str(dtype)[6:]} T={T} H={H} V={V}", rows, flops)
        result["linear_logprob"].append({"T": T, "V": V, "flops_fwd": flops, "rows": rows})
        del hidden, weight, targets
    out_dir = os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "out")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "gpu_loss_kernels" + ("_dry" if args.dry_run else "") + ".json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
