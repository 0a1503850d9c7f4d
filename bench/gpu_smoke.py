"""Smoke check of every Triton op on the GPU, one line each: PASS or FAIL.

    python bench/gpu_smoke.py              # CUDA: ~65 s (estimate), mostly Triton compiling
    python bench/gpu_smoke.py --dry-run    # CPU: the same checks in the Triton interpreter

Each op runs once through tao_fast.ops with backend="triton", in bf16 and in fp32, on fresh
random inputs (the seed is in the row) of odd shapes, forward and backward:
  linear_logprob        logp; grads of hidden and weight
  linear_logprob+ent    logp and entropy; both grads (upstream gradients on both outputs)
  pg_loss               loss and its 4 statistics (every option on, per-sequence mean); grad
                        (plain torch here: tao_fast's torch reference, which computes in fp32)
  varlen_attention D=64 / D=128   out; dq, dk, dv (GQA 8/2, sequences of 1..257 tokens)
against a float64 oracle on the same (rounded) inputs. Pass: each output's relative error
||x - ref|| / ||ref|| is at most 2x that of plain torch in the same dtype, plus a floor
(1e-6 in bf16; 1e-5 in fp32, 5e-3 for fp32 attention on a GPU, whose tl.dot runs TF32).
NaN never passes. On a GPU the caching allocator's free blocks are filled with NaN bytes
before each kernel, so an element the kernel never writes shows up as NaN.
After the linear_logprob backward the row records tao_fast.kernels.linear_logprob's
backward_info() (which dW accumulation path ran), or "backward_info unavailable".
Exit code 1 when any line FAILs. Rows: $OUT/gpu_smoke.jsonl, or --jsonl (bench/harness.py).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from harness import add_output_args, error_text, open_results

IGN = -100
COLUMNS = [("op", "op", ""), ("dtype", "dtype", ""), ("shape", "shape", ""),
           ("errors", "rel err: kernel (plain torch)", ""), ("bound", "max err / bound", ".2f"),
           ("result", "result", "")]


def rel(x, ref) -> float:
    ref = ref.double()
    return float((x.double() - ref).norm() / ref.norm().clamp(min=1e-300))


def poison_allocator(device) -> None:
    """Fill free blocks of the CUDA caching allocator with 0xFF bytes (NaN in fp32 and bf16),
    so outputs allocated next start as NaN. Small blocks (<= 1 MiB) and large ones come from
    separate pools: both are poisoned."""
    if torch.device(device).type != "cuda":
        return
    blocks = [torch.empty(n, dtype=torch.uint8, device=device).fill_(255)
              for n in [512 << 10] * 64 + [32 << 20] * 8]
    del blocks


def backward_info():
    """The dW accumulation path of the last linear_logprob backward, from the kernels module
    (lands with the kernels branch; recorded as unavailable until then)."""
    try:
        from tao_fast.kernels.linear_logprob import backward_info as info
    except ImportError:
        return "backward_info unavailable"
    return info()


# ----------------------------------------------------------------------------- the ops

def _llp_torch(h, w, t, temp, entropy):
    """Plain torch: the matmul in the inputs' dtype, the rest in float64. -> [logp, (ent)]"""
    z = (h @ w.t()).double() / temp  # [T, V]
    logq = torch.log_softmax(z, -1)
    valid = t != IGN
    lp = torch.where(valid, logq.gather(1, t.clamp(min=0)[:, None])[:, 0], 0.0)
    if not entropy:
        return [lp]
    return [lp, torch.where(valid, -(logq.exp() * logq).sum(-1), 0.0)]


def _llp_kernel(h, w, t, temp, entropy):
    from tao_fast import ops

    out = ops.linear_logprob(h, w, t, temperature=temp, return_entropy=entropy,
                             backend="triton")
    return list(out) if entropy else [out]


def check_linear_logprob(device, dtype, entropy, shape, gen):
    T, V, H = shape
    h = torch.randn(T, H, generator=gen)
    w = torch.randn(V, H, generator=gen) * 2 / H ** 0.5
    t = torch.randint(0, V, (T,), generator=gen)
    t[::7] = IGN
    g_out = torch.randn(2, T, generator=gen).to(device)  # upstream grads of logp, entropy
    h, w, t = h.to(device, dtype), w.to(device, dtype), t.to(device)

    def run(fn, dt):
        hh, ww = (x.to(dt, copy=True).requires_grad_() for x in (h, w))  # fresh leaves
        outs = fn(hh, ww, t, 0.7, entropy)
        sum((o.double() * g.double()).sum() for o, g in zip(outs, g_out)).backward()
        return [o.detach() for o in outs] + [hh.grad, ww.grad]

    ref, plain = run(_llp_torch, torch.float64), run(_llp_torch, dtype)
    poison_allocator(device)
    got = run(_llp_kernel, dtype)
    names = ["logp"] + ["ent"] * entropy + ["dh", "dW"]
    return names, got, ref, plain, {"backward_info": backward_info()}


def _pg_oracle(logp, old_logp, advantages, mask, *, ref_logp, sampler_logp, kl_coef, clip_low,
               clip_high, dual_clip, tis_cap, cu_seqlens, **_):
    """pg_loss's definition (reference.pg_loss's docstring: k3 KL, dual clip, TIS,
    seq-mean-token-mean) in float64 (the reference itself computes in fp32)."""
    lp, old, adv, m = logp, old_logp.double(), advantages.double(), mask.double()
    ratio = (lp - old).exp()  # [N]
    pg1, pg2 = -adv * ratio, -adv * ratio.clamp(1 - clip_low, 1 + clip_high)
    pg = torch.maximum(pg1, pg2)
    pg = torch.where(adv < 0, torch.minimum(pg, -adv * dual_clip), pg)
    pg = pg * (old - sampler_logp.double()).exp().clamp(max=tis_cap)
    d = ref_logp.double() - lp
    kl = d.exp() - d - 1
    cu = cu_seqlens.long()
    sid = torch.repeat_interleave(torch.arange(cu.numel() - 1, device=cu.device), cu.diff())
    sums = torch.zeros(cu.numel() - 1, dtype=torch.float64, device=cu.device)
    sums = sums.index_add(0, sid, (pg + kl_coef * kl) * m)
    cnts = torch.zeros_like(sums).index_add(0, sid, m)  # [B]
    has = cnts > 0
    n, r = m.sum(), ratio.detach()
    stats = {"clip_frac": ((pg2 > pg1).double() * m).sum() / n, "ratio_mean": (r * m).sum() / n,
             "ratio_max": torch.where(m > 0, r, 0.0).max(), "kl": (kl.detach() * m).sum() / n}
    return (sums[has] / cnts[has]).mean(), stats


def _pg_call(impl, inp, cu, dtype):
    lp = inp["logp"].to(dtype, copy=True).requires_grad_()  # a fresh leaf
    rest = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in inp.items()
            if k != "logp"}
    loss, st = impl(lp, rest["old_logp"], rest["advantages"], rest["mask"],
                    ref_logp=rest["ref_logp"], sampler_logp=rest["sampler_logp"], kl_coef=0.01,
                    kl_estimator="k3", clip_low=0.2, clip_high=0.28, dual_clip=3.0, tis_cap=2.0,
                    agg="seq-mean-token-mean", cu_seqlens=cu)
    loss.backward()
    return [torch.stack([loss.detach().double(), *(v.double() for v in st.values())]), lp.grad]


def check_pg_loss(device, dtype, n, gen):
    from tao_fast import ops
    from tao_fast.kernels import reference

    logp = torch.randn(n, generator=gen) * 0.3 - 1
    old = logp + 0.2 * torch.randn(n, generator=gen)
    inp = dict(logp=logp, old_logp=old, advantages=torch.randn(n, generator=gen),
               mask=torch.rand(n, generator=gen) > 0.2,
               ref_logp=logp + 0.1 * torch.randn(n, generator=gen),
               sampler_logp=old + 0.1 * torch.randn(n, generator=gen))
    inp = {k: (v.to(dtype) if v.is_floating_point() else v).to(device) for k, v in inp.items()}
    cuts = sorted(torch.randperm(n - 1, generator=gen)[:max(1, n // 300)].add(1).tolist())
    cu = torch.tensor([0, *cuts, n], dtype=torch.int32, device=device)  # [B+1]
    ref = _pg_call(_pg_oracle, inp, cu, torch.float64)
    plain = _pg_call(reference.pg_loss, inp, cu, dtype)
    poison_allocator(device)
    got = _pg_call(lambda *a, **k: ops.pg_loss(*a, **k, backend="triton"), inp, cu, dtype)
    return ["loss+stats", "dlogp"], got, ref, plain, {}


def _attn_eager(q, k, v, cu, max_seqlen):
    """Plain torch: per-sequence softmax attention, every op in the inputs' dtype."""
    rep, bounds, outs = q.shape[1] // k.shape[1], cu.tolist(), []
    for s, e in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = q[s:e], k[s:e].repeat_interleave(rep, 1), v[s:e].repeat_interleave(rep, 1)
        sc = torch.einsum("qhd,khd->hqk", qs, ks) * q.shape[2] ** -0.5  # [Hq, n, n]
        causal = torch.ones(e - s, e - s, dtype=torch.bool, device=q.device).triu(1)
        p = torch.softmax(sc.masked_fill(causal, float("-inf")), -1)
        outs.append(torch.einsum("hqk,khd->qhd", p, vs))  # [n, Hq, D]
    return torch.cat(outs)


def _attn_call(fn, qkv, dout, lens, dtype):
    xs = [x.to(dtype, copy=True).requires_grad_() for x in qkv]  # fresh leaves
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens).cumsum(0)
    out = fn(*xs, cu.to(xs[0].device), max(lens))
    out.backward(dout.to(dtype))
    return [out.detach()] + [x.grad for x in xs]


def check_attention(device, dtype, D, lens, gen):
    from tao_fast import ops

    T, Hq, Hkv = sum(lens), 8, 2
    qkv = [torch.randn(T, h, D, generator=gen).to(device, dtype) for h in (Hq, Hkv, Hkv)]
    dout = torch.randn(T, Hq, D, generator=gen).to(device, dtype)
    ref = _attn_call(_attn_eager, qkv, dout, lens, torch.float64)
    plain = _attn_call(_attn_eager, qkv, dout, lens, dtype)
    poison_allocator(device)
    got = _attn_call(lambda q, k, v, cu, L: ops.varlen_attention(q, k, v, cu, L,
                                                                 backend="triton"),
                     qkv, dout, lens, dtype)
    return ["out", "dq", "dk", "dv"], got, ref, plain, {}


# ----------------------------------------------------------------------------- driver

def floor_for(op: str, dtype, device) -> float:
    if dtype != torch.float32:
        return 1e-6
    tf32 = op.startswith("varlen_attention") and torch.device(device).type == "cuda"
    return 5e-3 if tf32 else 1e-5


def judge(op, dtype, device, names, got, ref, plain) -> tuple[str, float]:
    """(per-output 'name kernel (plain)' text, max over outputs of err / bound)."""
    floor = floor_for(op, dtype, device)
    parts, worst = [], 0.0
    for name, g, r, p in zip(names, got, ref, plain):
        e, b = rel(g, r), 2 * rel(p, r) + floor
        worst = max(worst, e / b) if e == e else float("nan")
        parts.append(f"{name} {e:.1e} ({rel(p, r):.1e})")
    return ", ".join(parts), worst


def cases(dry: bool):
    """(op name, shape text, check(device, dtype, gen) -> (names, got, ref, plain, extra))."""
    llp = (70, 503, 64) if dry else (333, 5003, 256)
    lens64 = [1, 33, 20] if dry else [1, 100, 257, 64, 33]
    n_pg = 700 if dry else 5003
    return [
        ("linear_logprob", "T,V,H=%d,%d,%d" % llp,
         lambda d, dt, g: check_linear_logprob(d, dt, False, llp, g)),
        ("linear_logprob+ent", "T,V,H=%d,%d,%d" % llp,
         lambda d, dt, g: check_linear_logprob(d, dt, True, llp, g)),
        ("pg_loss", f"N={n_pg}", lambda d, dt, g: check_pg_loss(d, dt, n_pg, g)),
        *[(f"varlen_attention D={D}", f"lens={lens64} Hq/Hkv=8/2",
           lambda d, dt, g, D=D: check_attention(d, dt, D, lens64, g)) for D in (64, 128)],
    ]


def run_one(table, device, dtype, op, shape, check) -> bool:
    seed = int.from_bytes(os.urandom(4), "little")
    gen = torch.Generator().manual_seed(seed)
    row = {"op": op, "dtype": str(dtype).replace("torch.", ""), "shape": shape, "seed": seed}
    try:
        names, got, ref, plain, extra = check(device, dtype, gen)
        row["errors"], row["bound"] = judge(op, dtype, device, names, got, ref, plain)
        row.update(extra)
        row["result"] = "PASS" if row["bound"] <= 1.0 else "FAIL"
    except Exception as e:  # noqa: BLE001 (a kernel that fails is one FAIL line, not the end)
        row.update(result="FAIL", error=error_text(e))
    table.add(row)
    return row["result"] == "PASS"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU: the Triton interpreter")
    add_output_args(ap, "gpu_smoke")
    args = ap.parse_args(argv)
    if args.dry_run and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("gpu_smoke.py --dry-run: set TRITON_INTERPRET=1 (before Python starts) so "
                 "that the Triton kernels run in the interpreter")
    device = torch.device("cpu" if args.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_smoke.py: no CUDA device: run with --dry-run for the CPU smoke path")
    res = open_results(args, "gpu_smoke", args.dry_run)
    res.meta(device, dry_run=args.dry_run)
    table = res.table("smoke", "smoke: each op once vs a float64 oracle (bound: 2x plain "
                      "torch's error + floor)", COLUMNS)
    ok = True
    for dtype in (torch.bfloat16, torch.float32):
        for op, shape, check in cases(args.dry_run):
            ok &= run_one(table, device, dtype, op, shape, check)
    n_pass = sum(r["result"] == "PASS" for r in table.rows)
    res.note(f"smoke: {n_pass}/{len(table.rows)} PASS")
    res.close()
    if not ok:
        print(f"correctness check FAILED: {len(table.rows) - n_pass} of {len(table.rows)} lines",
              flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
