"""Varlen causal attention on the GPU: the Triton kernel vs padded SDPA, FlexAttention, flash-attn.

    python bench/gpu_attention.py                      # GPU: correctness check, then the table
    python bench/gpu_attention.py --providers flex     # FlexAttention alone (compiles; slow)
    python bench/gpu_attention.py --dry-run            # CPU smoke run at tiny shapes

First checks each selected provider against the fp32 torch reference on a small bf16 shape
(and the Triton backward for run-to-run bitwise equality); a failure exits non-zero before
timing (--force: time anyway, exit 1 at the end). FlexAttention is checked uncompiled (same
function, no compile at the check shape) and timed compiled. Then, for document-length mixes
from 128 to 8k tokens packed into one batch of fixed total length, reports forward and backward
time (bench/harness.py: CUDA-event medians, L2 flushed between reps) and TFLOP/s with
    FLOPs_fwd = 4 * sum(len^2) * Hq * D / 2   (causal: half the square),  FLOPs_bwd = 2.5 x fwd
(so padded SDPA is charged only for the real tokens: its padding shows up as lower TFLOP/s).
SDPA times exclude the pad/unpad copies; FlexAttention times exclude create_block_mask.
Providers: triton (tao_fast.ops.varlen_attention, backend="triton": the kernel, never the torch
fallback), sdpa_padded, flash_attn (flash_attn_varlen_func), flex (torch.compile of
flex_attention with a document-causal block mask; one mask function for every mix, so each
head dim compiles once). A provider that is missing or fails gets that in its row.
Rows are printed as measured and appended to $OUT/gpu_attention.jsonl (or --jsonl).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

from harness import add_output_args, isolate, open_results, time_ms
from tao_fast.kernels import reference

GPU_PROVIDERS = ("triton", "sdpa_padded", "flash_attn", "flex")
GPU_MIXES = ("fixed:128", "fixed:512", "fixed:2048", "fixed:8192", "mixed:128-8192")
DRY_MIXES = ("fixed:16", "fixed:64", "mixed:16-128")
COLUMNS = [("D", "D", "d"), ("mix", "mix", ""), ("n_seqs", "seqs", "d"), ("T", "tokens", "d"),
           ("provider", "provider", ""), ("fwd_ms", "fwd ms", ".3f"),
           ("fwd_tflops", "fwd TFLOP/s", ".3g"), ("bwd_ms", "bwd ms", ".3f"),
           ("bwd_tflops", "bwd TFLOP/s", ".3g")]


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
    return cu.to(device)  # [B+1]


# Each provider: setup(q, k, v, lens) -> (fn, inputs, unpack); fn(*inputs) -> out, inputs are the
# leaves to differentiate, unpack(out) -> [T, Hq, D] for the correctness check.

def _setup_triton(q, k, v, lens):
    from tao_fast import ops

    cu, L = _cu(lens, q.device), max(lens)
    return ((lambda q, k, v: ops.varlen_attention(q, k, v, cu, L, causal=True, backend="triton")),
            (q, k, v), (lambda o: o))


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
    gqa = q.shape[1] != k.shape[1]

    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)

    def unpack(o):
        return torch.cat([o[b, :, :n].transpose(0, 1) for b, n in enumerate(lens)])
    return fn, (qp, kp, vp), unpack


# FlexAttention: one mask function for every mix (it reads the document ids from this buffer,
# refilled in place), so torch.compile traces it once per head dim instead of once per mix.
_FLEX = {"doc": None, "compiled": None}


def _document_causal(b, h, q_idx, kv_idx):
    doc = _FLEX["doc"]
    return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)


def _setup_flex(q, k, v, lens, compiled=True):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    T = q.shape[0]
    doc = torch.repeat_interleave(torch.arange(len(lens), device=q.device),
                                  torch.tensor(lens, device=q.device))  # [T]
    if _FLEX["doc"] is None or _FLEX["doc"].shape != doc.shape or \
            _FLEX["doc"].device != doc.device:
        _FLEX["doc"] = doc
    else:
        _FLEX["doc"].copy_(doc)
    mask = create_block_mask(_document_causal, None, None, T, T, device=q.device)
    if compiled and _FLEX["compiled"] is None:
        _FLEX["compiled"] = torch.compile(flex_attention, dynamic=False)
    flex = _FLEX["compiled"] if compiled else flex_attention
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


SETUPS = {"triton": _setup_triton, "sdpa_padded": _setup_sdpa_padded,
          "flash_attn": _setup_flash_attn, "flex": _setup_flex, "torch_ref": _setup_torch_ref}


def default_providers(dry_run: bool) -> list[str]:
    """GPU: every peer. CPU: no flash-attn, and Triton only in the interpreter
    (TRITON_INTERPRET=1); torch_ref (the check's reference) only when named."""
    if not dry_run:
        return list(GPU_PROVIDERS)
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    return ["triton"] * interp + ["sdpa_padded", "flex"]


def setup_for(name: str, dry_run: bool, timing: bool):
    """The provider's setup; FlexAttention is compiled only for GPU timings."""
    if name == "flex":
        compiled = timing and not dry_run
        return lambda *a: _setup_flex(*a, compiled=compiled)
    return SETUPS[name]


def _inputs(lens, Hq, Hkv, D, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    T = sum(lens)
    xs = [torch.randn(T, h, D, generator=g).to(device, dtype).requires_grad_()
          for h in (Hq, Hkv, Hkv)]
    return xs, torch.randn(T, Hq, D, generator=g).to(device, dtype)


def _repack(dout, name, lens):
    """The upstream gradient in the provider's layout."""
    if name == "sdpa_padded":
        return _pad(dout, lens)
    if name == "flex":
        return dout.transpose(0, 1)[None]
    return dout


def _check_one(res, name, setup, D, inputs, ref, ref_g, lens, tol) -> bool:
    (q, k, v), dout = inputs
    label = f"check {name} D={D}"
    try:
        fn, xs, unpack = setup(q, k, v, lens)
    except ImportError as e:
        print(f"{label}: skipped: not importable: {e.name or e}", flush=True)
        return True
    try:
        out = fn(*xs)
        grads = torch.autograd.grad(out, xs, _repack(dout, name, lens))
    except NotImplementedError as e:  # FlexAttention has no CPU backward: forward only
        with torch.no_grad():
            out = unpack(fn(*[x.detach() for x in xs]))
        err = ((out.float() - ref).norm() / ref.norm()).item()
        return res.check(label, err < tol, f"rel err out {err:.1e} < {tol} (forward only: "
                         f"{str(e).splitlines()[0][:40]})")
    got = [unpack(out)] + [unpack(gr) for gr in grads]
    errs = [((a.float() - b).norm() / b.norm()).item() for a, b in zip(got, [ref, *ref_g])]
    good, note = all(e < tol for e in errs), ""
    if name == "triton":  # no atomics: backward is bitwise reproducible
        again = torch.autograd.grad(fn(*xs), xs, dout)
        same = all(torch.equal(a, b) for a, b in zip(grads, again))
        good, note = good and same, f"; backward bitwise reproducible: {same}"
    return res.check(label, good, "rel err out/dq/dk/dv " + " ".join(f"{e:.1e}" for e in errs)
                     + f" < {tol}{note}")


def check(res, device, dtype, dry_run, names) -> bool:
    """Each provider vs the fp32 torch reference on a small shape."""
    ok, lens, Hq, Hkv = True, [1, 100, 257, 64, 33], 8, 2
    for D in (64, 128):
        inputs = _inputs(lens, Hq, Hkv, D, dtype, device, seed=D)
        ref_in = [x.detach().float().requires_grad_() for x in inputs[0]]
        ref = reference.varlen_attention(*ref_in, _cu(lens, device), max(lens))
        ref_g = torch.autograd.grad(ref, ref_in, inputs[1].float())
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        for name in names:
            ok &= _check_one(res, name, setup_for(name, dry_run, timing=False), D, inputs, ref,
                             ref_g, lens, tol)
    return ok


def measure(name, setup, inputs, lens, device, flops, row) -> dict:
    """Forward and backward time of one provider on one batch (errors go into the row)."""
    (q, k, v), dout = inputs
    with isolate(row, device):
        fn, xs, _ = setup(q, k, v, lens)
        g = _repack(dout, name, lens)
        row["fwd_ms"] = time_ms(lambda: fn(*xs), device)
        row["fwd_tflops"] = flops[0] / row["fwd_ms"] / 1e9
        out = fn(*xs)
        row["bwd_ms"] = time_ms(lambda: torch.autograd.grad(out, xs, g, retain_graph=True),
                                device)
        row["bwd_tflops"] = flops[1] / row["bwd_ms"] / 1e9
    return row


def run(args) -> int:
    dry = args.dry_run
    device = torch.device("cpu" if dry else "cuda")
    if not dry and not torch.cuda.is_available():
        sys.exit("no CUDA device: use --dry-run for the CPU smoke path")
    dtype = torch.float32 if dry else torch.bfloat16
    if dry:
        import warnings
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    names = [p for p in args.providers.split(",") if p] or default_providers(dry)
    unknown = [p for p in names if p not in SETUPS]
    if unknown:
        sys.exit(f"gpu_attention.py: --providers: unknown {unknown} (known: {', '.join(SETUPS)})")
    total = 256 if dry else args.total_tokens
    mixes = [m for m in args.mixes.split(",") if m] or list(DRY_MIXES if dry else GPU_MIXES)
    Hq, Hkv = args.heads
    res = open_results(args, "gpu_attention", dry)
    res.meta(device, dtype=str(dtype), total_tokens=total, providers=names,
             flops="fwd = 4*sum(len^2)*Hq*D/2, bwd = 2.5*fwd")
    ok = True if args.skip_check else check(res, device, dtype, dry, names)
    if not ok and not args.force:
        sys.exit("correctness check FAILED: not timing (use --force to time anyway)")
    table = res.table("attention", f"varlen attention, {str(dtype)[6:]}, Hq/Hkv {Hq}/{Hkv}, "
                      f"{total} tokens per batch", COLUMNS)
    for D in args.head_dims:
        for mix in mixes:
            lens = make_lens(mix, total)
            flops = attn_flops(lens, Hq, D)
            inputs = _inputs(lens, Hq, Hkv, D, dtype, device)
            for name in names:
                row = dict(D=D, mix=mix, n_seqs=len(lens), T=total, Hq=Hq, Hkv=Hkv,
                           provider=name)
                table.add(measure(name, setup_for(name, dry, timing=True), inputs, lens,
                                  device, flops, row))
    res.close()
    if not ok:
        print("correctness check FAILED (timed anyway: --force)", flush=True)
    return 0 if ok else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU smoke run at tiny shapes")
    p.add_argument("--providers", default="",
                   help=f"comma list of {', '.join(SETUPS)} (default: {', '.join(GPU_PROVIDERS)}"
                        " on a GPU)")
    p.add_argument("--mixes", default="", help=f"comma list (default {','.join(GPU_MIXES)})")
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128], metavar="D")
    p.add_argument("--total-tokens", type=int, default=32768, help="tokens per packed batch")
    p.add_argument("--heads", type=int, nargs=2, default=(16, 4), metavar=("HQ", "HKV"))
    p.add_argument("--force", action="store_true", help="time even if a check fails")
    p.add_argument("--skip-check", action="store_true", help="no correctness check")
    add_output_args(p, "gpu_attention")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
