"""Varlen causal attention on the GPU: the Triton kernel vs padded SDPA, FlexAttention, flash-attn.

    python bench/gpu_attention.py              # GPU: correctness check, then the table
    python bench/gpu_attention.py --dry-run    # CPU smoke run of the same code at tiny shapes

First checks every provider against the torch reference on a small bf16 shape (and the
Triton backward for run-to-run bitwise equality); a failure exits non-zero before timing.
Then, for document-length mixes from 128 to 8k tokens packed into one batch of fixed total
length, reports forward and backward time and TFLOP/s with
    FLOPs_fwd = 4 * sum(len^2) * Hq * D / 2   (causal: half the square),  FLOPs_bwd = 2.5 x fwd
(so padded SDPA is charged only for the real tokens: its padding shows up as lower TFLOP/s).
SDPA times exclude the pad/unpad copies; FlexAttention times exclude create_block_mask.
Writes JSON to $OUT/gpu_attention.json if $OUT is set, else bench/out/.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

from tao_fast.kernels import reference


def make_lens(mix: str, total: int, seed: int = 0) -> list[int]:
    """Sequence lengths summing to `total`: 'fixed:N' or 'mixed:LO-HI' (log-uniform)."""
    kind, arg = mix.split(":")
    if kind == "fixed":
        n = int(arg)
        return [n] * (total // n) + ([total % n] if total % n else [])
    lo, hi = map(int, arg.split("-"))
    g = torch.Generator().manual_seed(seed)
    lens = []
    while sum(lens) < total:
        u = torch.rand(1, generator=g).item()
        lens.append(min(int(lo * (hi / lo) ** u), total - sum(lens)))
    return lens


def attn_flops(lens, Hq, D) -> tuple[float, float]:
    fwd = 4 * sum(n * n for n in lens) * Hq * D / 2
    return fwd, 2.5 * fwd


def _cu(lens, device):
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens).cumsum(0)
    return cu.to(device)


# Each provider: setup(q, k, v, lens) -> (fn, inputs, unpack); fn(*inputs) -> out, inputs are the
# leaves to differentiate, unpack(out) -> [T, Hq, D] for the correctness check.

def _setup_triton(q, k, v, lens):
    from tao_fast.kernels.attention import varlen_attention
    cu, L = _cu(lens, q.device), max(lens)
    return (lambda q, k, v: varlen_attention(q, k, v, cu, L, causal=True)), (q, k, v), (lambda o: o)


def _setup_torch_ref(q, k, v, lens):
    cu, L = _cu(lens, q.device), max(lens)
    return ((lambda q, k, v: reference.varlen_attention(q, k, v, cu, L, causal=True)), (q, k, v),
            (lambda o: o))


def _pad(x, lens):
    """[T, H, D] -> [B, H, Lmax, D] zero-padded on the right."""
    out = x.new_zeros(len(lens), x.shape[1], max(lens), x.shape[2])
    s = 0
    for b, n in enumerate(lens):
        out[b, :, :n] = x[s:s + n].transpose(0, 1)
        s += n
    return out


def _setup_sdpa_padded(q, k, v, lens):
    # Right padding + is_causal is exact for the real rows (they never see a padded key).
    qp, kp, vp = (_pad(x, lens).requires_grad_(x.requires_grad) for x in (q, k, v))
    rep = q.shape[1] // k.shape[1]

    def fn(q, k, v):
        try:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=rep > 1)
        except TypeError:  # torch without enable_gqa
            return F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1),
                                                  v.repeat_interleave(rep, 1), is_causal=True)

    def unpack(o):
        return torch.cat([o[b, :, :n].transpose(0, 1) for b, n in enumerate(lens)])
    return fn, (qp, kp, vp), unpack


def _setup_flex(q, k, v, lens, compiled=True):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    T = q.shape[0]
    doc = torch.repeat_interleave(torch.arange(len(lens), device=q.device),
                                  torch.tensor(lens, device=q.device))  # [T]

    def document_causal(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)
    mask = create_block_mask(document_causal, None, None, T, T, device=q.device)
    flex = torch.compile(flex_attention, dynamic=False) if compiled else flex_attention
    xs = tuple(x.detach().transpose(0, 1)[None].contiguous().requires_grad_(x.requires_grad)
               for x in (q, k, v))  # [1, H, T, D]
    gqa = q.shape[1] != k.shape[1]
    return ((lambda q, k, v: flex(q, k, v, block_mask=mask, enable_gqa=gqa)), xs,
            (lambda o: o[0].transpose(0, 1)))


def _setup_flash_attn(q, k, v, lens):
    from flash_attn import flash_attn_varlen_func
    cu, L = _cu(lens, q.device), max(lens)
    return ((lambda q, k, v: flash_attn_varlen_func(q, k, v, cu, cu, L, L, causal=True)),
            (q, k, v), (lambda o: o))


def providers(dry_run: bool):
    out = {}
    if not dry_run or os.environ.get("TRITON_INTERPRET") == "1":
        out["triton"] = _setup_triton
    out["sdpa_padded"] = _setup_sdpa_padded
    out["flex"] = (lambda *a: _setup_flex(*a, compiled=False)) if dry_run else _setup_flex
    out["flash_attn"] = _setup_flash_attn
    if dry_run:
        out["torch_ref"] = _setup_torch_ref
    return out


def _timer(device):
    if device == "cuda":
        from triton.testing import do_bench
        return lambda fn: do_bench(fn, warmup=25, rep=100)  # ms

    def cpu_ms(fn, reps=1 if os.environ.get("TRITON_INTERPRET") == "1" else 3):
        fn()  # warm-up
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t) * 1e3)
        return sorted(ts)[len(ts) // 2]
    return cpu_ms


def _inputs(lens, Hq, Hkv, D, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    T = sum(lens)
    xs = [torch.randn(T, h, D, generator=g).to(device, dtype).requires_grad_()
          for h in (Hq, Hkv, Hkv)]
    return xs, torch.randn(T, Hq, D, generator=g).to(device, dtype)


def check(device, dtype, dry_run) -> list[str]:
    """Every provider vs the fp32 torch reference on a small shape; returns failures."""
    fails = []
    lens, Hq, Hkv = [1, 100, 257, 64, 33], 8, 2
    for D in (64, 128):
        (q, k, v), dout = _inputs(lens, Hq, Hkv, D, dtype, device, seed=D)
        ref_in = [x.detach().float().requires_grad_() for x in (q, k, v)]
        ref = reference.varlen_attention(*ref_in, _cu(lens, device), max(lens))
        ref_g = torch.autograd.grad(ref, ref_in, dout.float())
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        for name, setup in providers(dry_run).items():
            try:
                fn, xs, unpack = setup(q, k, v, lens)
            except ImportError as e:
                print(f"check {name:12s} D={D:<4} skipped: {e}")
                continue
            try:
                out = fn(*xs)
                grads = torch.autograd.grad(out, xs, _repack(dout, name, lens))
            except NotImplementedError as e:  # FlexAttention has no CPU backward: forward only
                with torch.no_grad():
                    out = unpack(fn(*[x.detach() for x in xs]))
                err = ((out.float() - ref).norm() / ref.norm()).item()
                print(f"check {name:12s} D={D:<4} rel err out {err:.1e} (forward only: "
                      f"{str(e).splitlines()[0][:40]})" + ("  ok" if err < tol else "  FAIL"))
                if not err < tol:
                    fails.append(f"{name} D={D} out: rel err {err:.2e}")
                continue
            got = [unpack(out)] + [unpack(gr) for gr in grads]
            errs = [((a.float() - b).norm() / b.norm()).item() for a, b in zip(got, [ref, *ref_g])]
            bad = [f"{name} D={D} {what}: rel err {e:.2e} (tol {tol})"
                   for what, e in zip(("out", "dq", "dk", "dv"), errs) if not e < tol]
            if name == "triton":  # no atomics: backward is bitwise reproducible
                again = torch.autograd.grad(fn(*xs), xs, dout)
                if not all(torch.equal(a, b) for a, b in zip(grads, again)):
                    bad.append(f"triton D={D}: backward not bitwise reproducible")
            print(f"check {name:12s} D={D:<4} rel err out/dq/dk/dv "
                  + " ".join(f"{e:.1e}" for e in errs) + ("  FAIL" if bad else "  ok"))
            fails += bad
    return fails


def _repack(dout, name, lens):
    """The upstream gradient in the provider's layout."""
    if name == "sdpa_padded":
        return _pad(dout, lens)
    if name == "flex":
        return dout.transpose(0, 1)[None]
    return dout


def run(args):
    dry = args.dry_run
    device = "cpu" if dry else "cuda"
    if not dry and not torch.cuda.is_available():
        sys.exit("no CUDA device: use --dry-run for the CPU smoke path")
    dtype = torch.float32 if dry else torch.bfloat16
    if dry:
        import warnings
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    fails = check(device, dtype, dry)
    if fails:
        print("\n".join(["CORRECTNESS FAILED:"] + fails))
        sys.exit(1)
    total = 256 if dry else args.total_tokens
    mixes = (["fixed:16", "fixed:64", "mixed:16-128"] if dry else
             ["fixed:128", "fixed:512", "fixed:2048", "fixed:8192", "mixed:128-8192"])
    Hq, Hkv = args.heads
    ms = _timer(device)
    rows = []
    for D in (64, 128):
        for mix in mixes:
            lens = make_lens(mix, total)
            f_fwd, f_bwd = attn_flops(lens, Hq, D)
            (q, k, v), dout = _inputs(lens, Hq, Hkv, D, dtype, device)
            for name, setup in providers(dry).items():
                row = dict(D=D, mix=mix, n_seqs=len(lens), T=total, Hq=Hq, Hkv=Hkv, provider=name)
                try:
                    fn, xs, _ = setup(q, k, v, lens)
                    g = _repack(dout, name, lens)
                    t_f = ms(lambda: fn(*xs))
                    row.update(fwd_ms=t_f, fwd_tflops=f_fwd / t_f / 1e9)
                    out = fn(*xs)
                    t_b = ms(lambda: torch.autograd.grad(out, xs, g, retain_graph=True))
                    row.update(bwd_ms=t_b, bwd_tflops=f_bwd / t_b / 1e9)
                except ImportError as e:
                    row.update(error=f"not importable: {e.name or e}")
                except Exception as e:  # report and go on: one provider must not stop the table
                    row.update(error=f"{type(e).__name__}: {str(e).splitlines()[0][:60]}")
                rows.append(row)
            if device == "cuda":
                torch.cuda.empty_cache()
    print_table(rows)
    write_json(rows, dry, device, dtype, total)


def print_table(rows):
    print(f"{'D':>4} {'mix':>15} {'seqs':>5} {'provider':>12} {'fwd ms':>9} {'fwd TF/s':>9} "
          f"{'bwd ms':>9} {'bwd TF/s':>9}")
    for r in rows:
        cells = [f"{r[key]:9.3f}" if key in r else f"{'-':>9}"
                 for key in ("fwd_ms", "fwd_tflops", "bwd_ms", "bwd_tflops")]
        print(f"{r['D']:>4} {r['mix']:>15} {r['n_seqs']:>5} {r['provider']:>12} " + " ".join(cells)
              + (f"  {r['error']}" if "error" in r else ""))


def write_json(rows, dry, device, dtype, total):
    import triton
    here = os.path.dirname(os.path.abspath(__file__))
    out_dir = os.environ.get("OUT") or os.path.join(here, "out")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "gpu_attention_dryrun.json" if dry else "gpu_attention.json")
    meta = dict(torch=torch.__version__, triton=triton.__version__, dtype=str(dtype),
                device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
                total_tokens=total, dry_run=dry,
                flops="fwd = 4*sum(len^2)*Hq*D/2, bwd = 2.5*fwd")
    with open(path, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print(f"wrote {path}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU smoke run at tiny shapes")
    p.add_argument("--total-tokens", type=int, default=32768, help="tokens per packed batch")
    p.add_argument("--heads", type=int, nargs=2, default=(16, 4), metavar=("HQ", "HKV"))
    run(p.parse_args(argv))


if __name__ == "__main__":
    main()
