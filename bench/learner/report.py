"""The learner-step table (one row per provider and model, printed as measured), its notes,
and the goal: tao-fast >= 1.5x the best peer's tokens/s at no more peak memory."""
from __future__ import annotations

from learner.providers import NOMINAL_TFLOPS, best_peer

SPEEDUP_GOAL = 1.5
COLUMNS = [("provider", "provider", ""), ("model", "model", ""), ("mb_tokens", "mb tokens", "d"),
           ("tokens_per_s", "tokens/s", ",.0f"), ("mfu_measured", "MFU (measured peak)", ".1%"),
           ("mfu_nominal", f"MFU ({NOMINAL_TFLOPS:.0f} TF)", ".1%"),
           ("peak_gib", "peak GiB", ".1f"), ("step_s", "step s", ".3f")]


def row_note(r: dict) -> str:
    """The row's note column: an error, the budgets that ran out of memory, padding."""
    note = [] if r.get("status") in ("ok", "OOM", None) else [r["status"]]
    if r.get("oom_at"):
        note.append(("OOM at every budget: " if r.get("status") == "OOM" else "OOM at ")
                    + ",".join(map(str, r["oom_at"])))
    if r.get("padding_overhead"):
        note.append(f"padding +{100 * r['padding_overhead']:.0f}%")
    if r.get("matched_memory"):
        note.append("matched-memory re-run")
    return "; ".join(note)


def judge_goal(size: str, rows: list[dict]) -> tuple[str, dict]:
    """(one line, record) for the goal on one model size."""
    peer = best_peer(rows)
    tao = [r for r in rows if r["provider"] == "tao-fast" and r.get("status") == "ok"]
    if peer is None or not tao:
        why = "no peer ran (OOM / skipped / error)" if peer is None else "tao-fast did not run"
        return f"goal {size}: cannot be judged: {why}", {"met": None, "why": why}
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
    line = (f"goal {size}: >= {SPEEDUP_GOAL}x best peer ({peer['provider']} "
            f"@{peer['mb_tokens']}: {peer['tokens_per_s']:,.0f} tok/s) at no more peak memory: "
            f"tao-fast @{best['mb_tokens']}: {best['tokens_per_s']:,.0f} tok/s = "
            f"{speedup:.2f}x, {mem_txt}"
            f"{'' if fits or not mem_known else ' (no tao-fast run fits)'} -> {verdict}")
    return line, {"met": met, "speedup": speedup, "memory_ok": mem_ok, "peer": peer["provider"],
                  "peer_mb_tokens": peer["mb_tokens"], "tao_mb_tokens": best["mb_tokens"]}
