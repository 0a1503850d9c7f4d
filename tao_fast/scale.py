"""`tao-fast scale`: TAO's central claim, measured. The same tune at N candidates per prompt
for N in {2, 4, 8, 16}; held-out quality against N and against tuning FLOPs, with two
reference lines: the random-scorer control (tuning compute without information) and
"no tuning, best-of-N at inference" (the base model spends N samples per answer instead).

    OUT/n{N}/            one ordinary run directory per N (report-able on its own)
    OUT/random-n{N}/     the control, at one N
    OUT/best_of_n.json   the base model's best-of-k for every k, from one set of N_max samples
    OUT/scale.json, OUT/scale.md, OUT/scaling.png

A run that already finished (summary.json) is reused and one that was killed is resumed, so a
killed `scale` picks up where it stopped. Tuning FLOPs are estimated as 2 * params * generated
tokens + 6 * params * trained tokens (prompt prefill and attention left out), from metrics.jsonl.
"""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

from tao_fast.config import ConfigError, TaoConfig
from tao_fast.fileio import atomic_write_text


def _acc(e: dict | None) -> dict | None:
    return None if e is None else {k: e[k] for k in ("accuracy", "ci_low", "ci_high", "n",
                                                     "mean_response_tokens")}


def _run(cfg: TaoConfig, run_dir: Path) -> Path:
    from tao_fast.tuning import holds_run, tune

    if (run_dir / "summary.json").exists():
        return run_dir
    if holds_run(run_dir):  # killed: from its last state, or from the start without one
        tune(resume=run_dir)
    else:
        cfg = copy.deepcopy(cfg)
        cfg.run.output_dir = str(run_dir)
        tune(cfg)
    return run_dir


def tuning_flops(run_dir: Path, n_params: int) -> float:
    ms = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    gen = sum(m.get("gen_tokens", 0) for m in ms)
    train = sum(m.get("train_tokens", 0) for m in ms)
    return 2.0 * n_params * gen + 6.0 * n_params * train


def best_of_n(cfg: TaoConfig, ns: list[int], out: Path) -> dict:
    """Base model, no tuning: N_max samples per held-out prompt, best-of-k by the training
    scorer for each k (the first k samples), judged by the held-out scorer."""
    path = out / "best_of_n.json"
    if path.exists():
        return json.loads(path.read_text())
    from tao_fast.data.prompts import encode_prompt, read_fewshot
    from tao_fast.data.sources import load_prompts
    from tao_fast.eval import wilson_interval
    from tao_fast.models import load_model
    from tao_fast.rollout import SamplingParams, build_engine
    from tao_fast.scoring import build_scorer

    _, held = load_prompts(cfg.data, cfg.run.seed)
    select = build_scorer(cfg.scoring.scorer, seed=cfg.run.seed)
    judge = build_scorer(cfg.eval.scorer or cfg.scoring.scorer, seed=cfg.run.seed)
    model, tok, model_dir = load_model(cfg.model)
    engine = build_engine(cfg.rollout, model.requires_grad_(False), tok, model_dir=model_dir,
                          seed=cfg.run.seed)
    # the prompt the tuned models are evaluated on (plain with rollout.train_prompt=plain)
    fewshot = read_fewshot(cfg.rollout.fewshot_file)
    ids = [encode_prompt(r, tok, cfg.rollout.prompt_strategy, cfg.data.system_prompt, fewshot)
           for r in held]
    ro = engine.generate(ids, SamplingParams(n=max(ns), temperature=cfg.rollout.temperature,
                                             top_p=cfg.rollout.top_p,
                                             max_tokens=cfg.eval.max_tokens, seed=cfg.run.seed),
                         progress=cfg.run.progress)
    sel = select.score(held, ro.texts).rewards  # [P][N_max]
    truth = judge.score(held, ro.texts).rewards
    res = {}
    for k in ns:
        picks = [max(range(k), key=lambda c, s=s: s[c]) for s in sel]
        correct = sum(t[c] >= 1.0 for t, c in zip(truth, picks))
        lo, hi = wilson_interval(correct, len(held))
        res[str(k)] = {"accuracy": correct / len(held), "ci_low": lo, "ci_high": hi,
                       "n": len(held), "samples": k,
                       "mean_response_tokens": sum(len(g[c]) for g, c in
                                                   zip(ro.token_ids, picks)) / len(held)}
    atomic_write_text(path, json.dumps(res, indent=1))
    return res


CONTROLS = ("random", "best-of-n")


def scale(cfg: TaoConfig, ns=(2, 4, 8, 16), out_dir="runs/scale", controls=CONTROLS) -> dict:
    """Tune at every N in `ns` (plus the controls: "random", "best-of-n") and write
    OUT/scale.{json,md,png}."""
    unknown = set(controls) - set(CONTROLS)
    if unknown:
        raise ConfigError(f"--controls: unknown {sorted(unknown)} (known: {list(CONTROLS)})")
    ns = sorted(set(int(n) for n in ns))
    if not ns or ns[0] < 2:
        raise ConfigError(f"--n: every N must be >= 2 (a group needs two candidates), got {ns}")
    k = len(cfg.rollout.strategies)
    if ns[0] < k:
        raise ConfigError(f"--n: every N must be >= {k}, the strategies of rollout.strategy="
                          f"{cfg.rollout.strategy} (one candidate each at least), got {ns}")
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, n in enumerate(ns):
        c = copy.deepcopy(cfg)
        c.rollout.n = n
        c.eval.before = i == 0  # the base model's score is the same for every N: copied
        if i:
            (out / f"n{n}").mkdir(exist_ok=True)
            for f in (out / f"n{ns[0]}").glob("eval_before*.json"):
                if not (out / f"n{n}" / f.name).exists():
                    shutil.copyfile(f, out / f"n{n}" / f.name)
        d = _run(c, out / f"n{n}")
        rows.append({"n": n, "dir": str(d)})
    before = json.loads((out / f"n{ns[0]}" / "eval_before.json").read_text()) \
        if (out / f"n{ns[0]}" / "eval_before.json").exists() else None
    from tao_fast.models.loader import resolve_model_path

    cfg_json = json.loads((resolve_model_path(cfg.model.path) / "config.json").read_text())
    n_params = _param_count(cfg_json)
    for row in rows:
        d = Path(row["dir"])
        after = d / "eval_after.json"
        row["after"] = _acc(json.loads(after.read_text())) if after.exists() else None
        row["flops"] = tuning_flops(d, n_params)
        row["wall_seconds"] = json.loads((d / "summary.json").read_text())["wall_seconds"]
    result = {"ns": ns, "before": _acc(before), "runs": rows, "n_params": n_params}
    if "random" in controls:
        mid = 8 if 8 in ns else ns[len(ns) // 2]
        c = copy.deepcopy(cfg)
        c.rollout.n, c.eval.before = mid, False
        c.eval.preflight = 0  # the control's own tuning compute only (no scorer check)
        c.eval.scorer = cfg.eval.scorer or cfg.scoring.scorer
        c.scoring.scorer = "random"
        d = _run(c, out / f"random-n{mid}")
        after = json.loads((d / "eval_after.json").read_text()) \
            if (d / "eval_after.json").exists() else None
        result["random"] = {"n": mid, "after": _acc(after),
                            "flops": tuning_flops(d, n_params)}
    if "best-of-n" in controls:
        result["best_of_n"] = best_of_n(cfg, ns, out)
    atomic_write_text(out / "scale.json", json.dumps(result, indent=1))
    plot_scaling(result, out / "scaling.png")
    atomic_write_text(out / "scale.md", render_scale(result))
    return result


def _param_count(hf: dict) -> int:
    """Parameters of a Llama/Qwen2-style model from its HF config (embeddings included)."""
    h, i, L, V = (hf["hidden_size"], hf["intermediate_size"], hf["num_hidden_layers"],
                  hf["vocab_size"])
    heads = hf["num_attention_heads"]
    kv = hf.get("num_key_value_heads", heads)
    hd = hf.get("head_dim") or h // heads
    attn = h * heads * hd * 2 + h * kv * hd * 2
    per_layer = attn + 3 * h * i + 2 * h
    emb = V * h * (1 if hf.get("tie_word_embeddings") else 2)
    return L * per_layer + emb + h


def plot_scaling(res: dict, path: Path) -> None:
    from tao_fast.report import _plt

    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    runs = [r for r in res["runs"] if r["after"]]
    ns = [r["n"] for r in runs]
    ys = [100 * r["after"]["accuracy"] for r in runs]
    err = [[100 * (r["after"]["accuracy"] - r["after"]["ci_low"]) for r in runs],
           [100 * (r["after"]["ci_high"] - r["after"]["accuracy"]) for r in runs]]
    a1.errorbar(ns, ys, yerr=err, marker="o", capsize=3, label="TAO-tuned, greedy (1 sample)")
    if res.get("best_of_n"):
        b = res["best_of_n"]
        ks = sorted(int(k) for k in b)
        a1.plot(ks, [100 * b[str(k)]["accuracy"] for k in ks], marker="s", ls="--",
                label="base, best-of-N at inference (N samples)")
    for ax in (a1, a2):
        if res.get("before"):
            ax.axhline(100 * res["before"]["accuracy"], color="gray", ls=":",
                       label="base model, greedy")
        if res.get("random") and res["random"]["after"]:
            ax.axhline(100 * res["random"]["after"]["accuracy"], color="C3", ls="-.",
                       label=f"random-scorer control (N={res['random']['n']})")
        ax.set_ylabel("held-out accuracy, % (95% CI)")
        ax.set_ylim(0, 100)
    a1.set_xscale("log", base=2)
    a1.set_xticks(ns, [str(n) for n in ns])
    a1.set_xlabel("N: candidates per prompt at tuning time (best-of-N: at inference)")
    a1.set_title("Held-out accuracy vs N")
    a1.legend(fontsize=7)
    a2.errorbar([r["flops"] for r in runs], ys, yerr=err, marker="o", capsize=3,
                label="TAO-tuned, greedy")
    for r, y in zip(runs, ys):
        a2.annotate(f"N={r['n']}", (r["flops"], y), textcoords="offset points", xytext=(4, -10),
                    fontsize=7)
    a2.set_xscale("log")
    a2.set_xlabel("tuning FLOPs (2*P*generated + 6*P*trained tokens)")
    a2.set_title("Held-out accuracy vs tuning compute")
    a2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _cell(a: dict | None) -> str:
    if not a:
        return "-"
    return f"{100 * a['accuracy']:.1f}% ({100 * a['ci_low']:.1f}-{100 * a['ci_high']:.1f})"


def render_scale(res: dict) -> str:
    lines = ["# TAO compute scaling", "",
             f"Base model, greedy: {_cell(res.get('before'))}", "",
             "| N | tuned, greedy (95% CI) | output tokens | tuning FLOPs | wall | "
             "base best-of-N (N samples) |", "| --- | --- | --- | --- | --- | --- |"]
    bon = res.get("best_of_n") or {}
    for r in res["runs"]:
        toks = f"{r['after']['mean_response_tokens']:.1f}" if r["after"] else "-"
        lines.append(f"| {r['n']} | {_cell(r['after'])} | {toks} | {r['flops']:.2e} | "
                     f"{r['wall_seconds'] / 60:.1f} min | {_cell(bon.get(str(r['n'])))} |")
    if res.get("random"):
        rc = res["random"]
        lines += ["", f"Random-scorer control at N={rc['n']}: {_cell(rc['after'])} "
                  f"({rc['flops']:.2e} FLOPs)."]
    lines += ["", "![scaling](scaling.png)", ""]
    return "\n".join(lines)
