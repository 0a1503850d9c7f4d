"""Per-token log-prob parity: the in-house packed model against transformers, both against
transformers in fp32, with the same weights (copied through tao_fast.models.weights.from_hf)."""
from __future__ import annotations

import torch

from harness import free_device
from learner.models import build_hf, build_tao
from learner.workload import IGN, targets_of
from tao_fast import ops
from tao_fast.rl.packing import make_packed_batch


def logp_packed(model, seqs):
    """All sequences in one packed forward -> (logp [T], counted mask [T])."""
    with torch.no_grad():
        b = make_packed_batch(seqs, device=model.inv_freq.device)
        targets = torch.cat([targets_of(s, 1) for s in seqs]).to(b.input_ids.device)  # [T]
        hidden = model(b.input_ids, b.positions, b.cu_seqlens, b.max_seqlen)  # [T, H]
        return ops.linear_logprob(hidden, model.output_weight, targets,
                                  backend=model.ops_backend), targets != IGN


def logp_hf(model, seqs):
    """One sequence at a time through transformers -> logp [T]."""
    out = []
    with torch.no_grad():
        for s in seqs:
            ids = s.to(model.device)[None]  # [1, L]
            logits = model(input_ids=ids, use_cache=False).logits[0].float()  # [L, V]
            t = targets_of(s, 1).to(ids.device)
            lp = torch.log_softmax(logits, -1).gather(-1, t.clamp(min=0)[:, None])[:, 0]
            out.append(torch.where(t != IGN, lp, torch.zeros_like(lp)))
    return torch.cat(out)  # [T]


def _all_logps(args, sd32, seqs, device, dtype, backend):
    sd_lo = {k: v.to(dtype) for k, v in sd32.items()}
    res, valid = {}, None
    for name, sd, dt in (("hf_fp32", sd32, torch.float32), ("hf_low", sd_lo, dtype),
                         ("tao_fp32", sd32, torch.float32), ("tao_low", sd_lo, dtype)):
        if name.startswith("hf"):
            model = build_hf(args, sd, device, dt).eval()
            res[name] = logp_hf(model, seqs).cpu()
        else:
            model = build_tao(args, sd, device, dt, backend).eval()
            lp, mask = logp_packed(model, seqs)
            res[name], valid = lp.cpu(), mask.cpu()
        del model
        free_device(device)
    return res, valid


def check_parity(res, args, sd32, lengths, device, dtype, backend):
    """Passes when the in-house model's low-precision error (mean and max |err| over tokens)
    is at most 2x transformers' own plus 1e-3, and its fp32 run errs less than transformers'
    low-precision one. -> (ok, info)"""
    g = torch.Generator().manual_seed(123)
    seqs = [torch.randint(0, args.vocab_size, (n,), generator=g) for n in lengths]
    lp, valid = _all_logps(args, sd32, seqs, device, dtype, backend)
    ref = lp["hf_fp32"][valid].double()
    err = {k: {"mean": float((lp[k][valid].double() - ref).abs().mean()),
               "max": float((lp[k][valid].double() - ref).abs().max())}
           for k in ("hf_low", "tao_fp32", "tao_low")}
    ok = all(err["tao_low"][m] <= 2 * err["hf_low"][m] + 1e-3 for m in ("mean", "max"))
    ok &= all(err["tao_fp32"][m] <= max(err["hf_low"][m], 1e-5) for m in ("mean", "max"))
    lo = str(dtype).replace("torch.", "")
    e = {k: f"{v['mean']:.2e}/{v['max']:.2e}" for k, v in err.items()}
    res.check(f"parity {args.hidden_size}x{args.num_layers}", ok,
              f"per-token logp vs transformers fp32, {int(valid.sum())} tokens, lengths "
              f"{lengths}: |err| mean/max transformers-{lo} {e['hf_low']}, tao-fast-{lo} "
              f"{e['tao_low']}, tao-fast-fp32 {e['tao_fp32']}")
    return ok, {"lengths": lengths, "errors": err, "ok": ok}
