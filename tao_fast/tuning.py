"""`tao_fast.tune(config)`: the whole TAO loop, top to bottom.

  load prompts, scorer (fails fast), model, rollout engine
  evaluate the held-out prompts (before)
  for each round, for each step:
      generate N candidates per prompt -> score them -> group advantages -> learner step
      -> sync the new weights into the engine -> one line of metrics.jsonl
  save an HF checkpoint (atomically) after each round, evaluate again (after)
The run directory holds config.yaml, metrics.jsonl, eval_*.json, summary.json/.md, checkpoints.
"""
from __future__ import annotations

import errno
import json
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from signal import SIGKILL

import torch
from tqdm.auto import tqdm

from tao_fast.checkpoint import save_checkpoint
from tao_fast.fileio import atomic_write_lines, atomic_write_text
from tao_fast.config import ConfigError, ResumeError, TaoConfig, load_config, save_config
from tao_fast.data import arithmetic_split, read_jsonl
from tao_fast.data.rounds import discover, plan_round, pool_from_manifest, read_manifest
from tao_fast.data.prompts import encode_prompt
from tao_fast.dtypes import torch_dtype
from tao_fast.eval import EvalResult, evaluate
from tao_fast.profiling.memory import PeakMemory
from tao_fast.rl import distributed as dist_
from tao_fast.rl.advantages import group_advantages
from tao_fast.rl.rollout_shards import generate_and_score
from tao_fast.rl.state import estimate_bytes, latest_state, load_state, save_state
from tao_fast.rl.trainer import Learner, samples_from_rollouts
from tao_fast.rollout import SamplingParams, build_engine
from tao_fast.scoring import ScorerContext, build_scorer

@dataclass
class TuneResult:
    run_dir: Path
    checkpoint: Path | None
    metrics: list[dict] = field(default_factory=list)
    eval_before: EvalResult | None = None
    eval_after: EvalResult | None = None
    wall_seconds: float = 0.0


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def load_prompts(cfg: TaoConfig):
    """(train, held-out) prompt records; the builtin task's two sets share no question.
    For a JSONL file or directory, train is every prompt there now (rounds take it in parts)."""
    d = cfg.data
    if d.train == "builtin:arithmetic":
        train, held = arithmetic_split(d.n_train, d.n_eval, cfg.run.seed, ops=d.ops,
                                       digits=d.digits, words=d.words)
    elif d.train.startswith("builtin:"):
        raise ConfigError(f"data.train: unknown builtin task {d.train!r} (builtin:arithmetic)")
    else:
        train, held = [r for f in discover(d.train) for r in read_jsonl(f)], []
    if d.eval:
        held = read_jsonl(d.eval)
    return train, held


def _check_writable(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"  # ranks probe side by side
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"run.output_dir: cannot write to {run_dir}: {e.strerror}") from None


def _check_space(run_dir: Path, model, states: bool,
                 ckpt_dtype: torch.dtype | None = None) -> None:
    """Before a round's work: room for a new training state (written beside the old one, which
    goes once the new one is complete) and the round's checkpoint, or a clear error now rather
    than a failed save after the round's compute is spent."""
    ckpt = sum(p.numel() * (ckpt_dtype.itemsize if ckpt_dtype else p.element_size())
               for p in model.parameters())
    need = ckpt + (estimate_bytes(model) if states else 0)
    free = shutil.disk_usage(run_dir).free
    if free < need:
        what = "a training state and a checkpoint" if states else "a checkpoint"
        hint = (" (or set run.keep_states=0: no training states, so no resume)" if states
                else "")
        raise OSError(errno.ENOSPC, f"{run_dir} has {free >> 20} MiB free; {what} need about "
                      f"{need >> 20} MiB: free some space{hint}, or resume later with "
                      f"`tao-fast tune --resume {run_dir}`")


def _kill_at() -> int | None:
    """Fault injection for the crash tests: TAO_FAST_KILL_AT=STEP[@RANK] makes this process
    (only rank RANK, when given) SIGKILL itself in the middle of global step STEP, after its
    rollouts and before its update: a fixed place to die, however fast the steps run."""
    spec = os.environ.get("TAO_FAST_KILL_AT", "")
    if not spec:
        return None
    step, _, r = spec.partition("@")
    if r and int(r) != dist_.rank():
        return None
    return int(step)


def _write_lines(path: Path, lines: list[dict]) -> None:
    if not dist_.is_main():  # under torchrun rank 0 alone writes the run directory
        return
    atomic_write_lines(path, (json.dumps(x) for x in lines))


def _eval(cfg, engine, tokenizer, scorer, prompts, name, run_dir) -> EvalResult | None:
    """Greedy (eval_NAME.json) and, with eval.samples, sampled pass@1 at the rollout
    temperature (eval_NAME_sampled.json) on the same held-out prompts; returns the greedy."""
    if not prompts:
        return None
    out = None
    runs = [("", 0.0, 1)]
    if cfg.eval.samples and cfg.rollout.temperature > 0:
        runs.append(("_sampled", cfg.rollout.temperature, cfg.eval.samples))
    for suffix, temp, k in runs:
        res = evaluate(engine.model, prompts, scorer, tokenizer=tokenizer, engine=engine,
                       max_tokens=cfg.eval.max_tokens, temperature=temp, samples=k,
                       strategy=cfg.rollout.strategy, system_prompt=cfg.data.system_prompt,
                       progress=cfg.run.progress, seed=cfg.run.seed)
        if dist_.is_main():  # each engine answered a slice, every rank has all; rank 0 writes
            res.save(run_dir / f"eval_{name}{suffix}.json")
        log(f"[eval {name}] held-out {res.summary()} ({res.seconds:.0f} s)")
        out = out or res
    return out


def tune(config: TaoConfig | str | os.PathLike | None = None, overrides=(),
         resume: str | os.PathLike | None = None) -> TuneResult:
    """Run TAO. config: a TaoConfig, or a YAML/TOML path (with key=value overrides).
    resume: a run directory to continue (its config.yaml, then `overrides`, e.g. run.rounds=3
    to add rounds that pick up the prompt files that arrived since)."""
    t_start = time.perf_counter()
    if resume is not None:
        run_dir = Path(resume).resolve()
        if not (run_dir / "config.yaml").exists():
            raise ResumeError(f"--resume {run_dir}: no config.yaml there (not a tao-fast run)")
        cfg = load_config(run_dir / "config.yaml", overrides)
        cfg.run.output_dir = str(run_dir)
    else:
        cfg = config if isinstance(config, TaoConfig) else load_config(config, overrides)
        run_dir = Path(cfg.run.output_dir).resolve()
        if (run_dir / "state" / "latest").exists():
            raise ConfigError(f"run.output_dir: {run_dir} already holds a run; continue it with "
                              f"`tao-fast tune --resume {run_dir}` or choose another directory")
    _check_writable(run_dir)
    if dist_.init(cfg.run.dist_timeout_s, run_dir) and not dist_.is_main():
        cfg.run.progress = False  # one progress bar, rank 0's
    else:
        save_config(cfg, run_dir / "config.yaml")
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    torch.manual_seed(cfg.run.seed)

    sc = cfg.scoring
    policy: dict = {}  # the judge may score with the policy's own engine, made below
    ctx = ScorerContext(seed=cfg.run.seed, failure_value=sc.failure_value, timeout_s=sc.timeout_s,
                        memory_mb=sc.memory_mb, base_dir=Path.cwd(),
                        policy_engine=lambda: (policy["engine"], policy["tokenizer"]))
    scorer = build_scorer(sc.scorer, ctx, where="scoring.scorer")
    eval_scorer = build_scorer(cfg.eval.scorer, ctx, where="eval.scorer") \
        if cfg.eval.scorer else scorer
    train, held = load_prompts(cfg)
    for s, recs in ((scorer, train), (eval_scorer, held)):  # e.g. every SQL prompt's database
        if recs:
            s.check(recs)
    builtin = train if cfg.data.train.startswith("builtin:") else None
    from tao_fast.models import load_model

    model, tok, model_dir = load_model(cfg.model)
    learner = Learner(model, cfg.rl, cfg.rollout.temperature, cfg.model.ops_backend,
                      progress=cfg.run.progress, replica_dtype=torch_dtype(cfg.rollout.dtype))
    rng = random.Random(cfg.run.seed)
    result = TuneResult(run_dir=run_dir, checkpoint=None)
    metrics_path, manifest = run_dir / "metrics.jsonl", read_manifest(run_dir)
    state_dir = latest_state(run_dir) if resume is not None else None
    rnd, step, order, pool = 1, 1, [], None  # where to start: round, step, data position
    if state_dir is not None:  # weights, optimizer, scheduler, RNG, data position
        st = load_state(state_dir, model, learner.opt, learner.sched)
        learner.steps_done = st["learner_steps"]
        v, internal, gauss = st["python_rng"]
        rng.setstate((v, tuple(internal), gauss))
        rnd, step, order = st["round"], st["step"] + 1, st["order"]
        if step > cfg.run.steps:  # the state was saved at the end of its round
            rnd, step, order = rnd + 1, 1, []
        else:
            pool = pool_from_manifest(manifest[rnd - 1], cfg.data.train, builtin)
        old = [json.loads(x) for x in metrics_path.read_text().splitlines()[:st["metrics_lines"]]]
        _write_lines(metrics_path, old)  # steps after the state are redone
        result.metrics = old
        result.checkpoint = Path(st["checkpoint"]) if st.get("checkpoint") else None
        log(f"[tao-fast] resuming {run_dir} from {state_dir.name}: round {rnd}, step {step}")
    elif resume is not None:
        why = "run.keep_states=0 writes none" if not cfg.run.keep_states else "none saved yet"
        log(f"[tao-fast] {run_dir} has no training state ({why}): starting it from the beginning")
        _write_lines(metrics_path, [])
    else:
        _write_lines(metrics_path, [])
    manifest = manifest[:rnd - 1 if pool is None else rnd]
    # after the resumed weights are in the model. Under FSDP the engine gets a whole-weight
    # replica, except a vLLM TP engine: it loads its shards straight from the learner's
    tp_engine = cfg.rollout.tensor_parallel > 1
    engine = build_engine(cfg.rollout, learner.model if tp_engine else learner.full_model(), tok,
                          model_dir=model_dir, seed=cfg.run.seed)
    if learner.parallel == "fsdp":
        log("[tao-fast] FSDP2: rollout weights " + (
            "gathered from the shards into vLLM's TP shards (no whole-weight replica)"
            if tp_engine else f"from a whole-weight {cfg.rollout.dtype} replica per rank"))
    policy.update(engine=engine, tokenizer=tok)
    if engine.lockstep:
        for where, s in (("scoring.scorer", scorer), ("eval.scorer", eval_scorer)):
            if s.uses_policy:
                raise ConfigError(
                    f"{where}: a judge on the policy model under vLLM data parallelism "
                    f"({dist_.world_size() // cfg.rollout.tensor_parallel} engines): vLLM's "
                    f"data-parallel engines step together, and each rank judges a different "
                    f"share (a gate may leave one rank nothing to judge). Give the judge its "
                    f"own model (model: PATH), or make one engine of all ranks with "
                    f"rollout.tensor_parallel={dist_.world_size()}")
    log(f"[tao-fast] model {model_dir} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
        f"params), {len(train)} training prompts, {len(held)} held-out, scorer {scorer.name}"
        f" (held-out scored by {eval_scorer.name})")

    if cfg.eval.before:
        if (run_dir / "eval_before.json").exists() and resume is not None:
            result.eval_before = EvalResult.load(run_dir / "eval_before.json")
        else:
            result.eval_before = _eval(cfg, engine, tok, eval_scorer, held, "before", run_dir)

    encoded: dict[int, list[int]] = {}
    ro = cfg.rollout
    total = cfg.run.rounds * cfg.run.steps
    bar = tqdm(total=total, initial=len(result.metrics), desc="tune", unit="step",
               disable=not cfg.run.progress)

    def save(rnd_, step_, order_) -> None:
        if not cfg.run.keep_states:
            return
        extra = {"round": rnd_, "step": step_, "learner_steps": learner.steps_done,
                 "order": order_, "python_rng": rng.getstate(),
                 "metrics_lines": len(result.metrics),
                 "checkpoint": str(result.checkpoint or "")}
        try:
            full = learner.full_state()  # FSDP: gathered to rank 0 (every rank takes part)
            if dist_.is_main():
                save_state(run_dir, (rnd_ - 1) * cfg.run.steps + step_, model, learner.opt,
                           learner.sched, extra, keep=cfg.run.keep_states, **full)
        except OSError as e:
            last = latest_state(run_dir)
            raise OSError(e.errno, f"cannot write the training state to {run_dir / 'state'}: "
                          f"{e.strerror}; the last complete state is "
                          f"{last or 'none'}") from None

    kill_at = _kill_at()
    ckpt_dtype = (None if cfg.run.checkpoint_dtype == "auto"  # the learner's own
                  else torch_dtype(cfg.run.checkpoint_dtype))
    while rnd <= cfg.run.rounds:
        if pool is None:  # a new round: the prompts that arrived since, plus a replayed share
            plan = plan_round(rnd, cfg.data.train, manifest, cfg.data.replay_frac,
                              cfg.run.seed, builtin)
            if not plan.prompts:
                raise ConfigError(f"round {rnd}: no prompts (data.train={cfg.data.train})")
            manifest.append(plan.manifest_line())
            _write_lines(run_dir / "manifest.jsonl", manifest)
            pool, order = plan.prompts, []
            log(f"[tao-fast] round {rnd}: {plan.n_new} new prompts from "
                f"{len(plan.new_files)} new file(s), {plan.n_replay} replayed")
        encoded.clear()
        _check_space(run_dir, model, cfg.run.keep_states > 0, ckpt_dtype)
        while step <= cfg.run.steps:
            t0 = time.perf_counter()
            gstep = (rnd - 1) * cfg.run.steps + step
            if len(order) < cfg.rl.prompts_per_step:  # reshuffle once per pass over data
                fresh = list(range(len(pool)))
                rng.shuffle(fresh)
                order += fresh
            idx, order = order[:cfg.rl.prompts_per_step], order[cfg.rl.prompts_per_step:]
            recs = [pool[i] for i in idx]
            for i in idx:
                if i not in encoded:
                    encoded[i] = encode_prompt(pool[i], tok, ro.strategy, cfg.data.system_prompt)
            # under torchrun each rank samples and scores a slice; every rank gets the whole
            rollouts, scores, gen_s, score_s = generate_and_score(
                engine, scorer, [encoded[i] for i in idx], recs,
                SamplingParams.from_config(ro, seed=cfg.run.seed * 1_000_003 + gstep),
                progress=cfg.run.progress)
            t_gen = t0 + gen_s
            t_score = t_gen + score_s
            if gstep == kill_at:
                os.kill(os.getpid(), SIGKILL)
            advs, signal = group_advantages(scores.rewards, cfg.rl.algorithm,
                                            cfg.rl.std_normalize)
            samples = samples_from_rollouts(rollouts, advs, signal)
            flat = [r for g in scores.rewards for r in g]
            mean = sum(flat) / len(flat)
            m = {"round": rnd, "step": step, "global_step": gstep,
                 "reward_mean": mean,
                 "reward_std": (sum((r - mean) ** 2 for r in flat) / len(flat)) ** 0.5,
                 "zero_signal_groups": signal.count(False),
                 "zero_signal_frac": signal.count(False) / len(signal),
                 "score_failures": scores.num_failures,
                 **{f"score_failures/{k}": v for k, v in scores.failures.items()},
                 **scores.stats,
                 "response_tokens_mean": rollouts.num_tokens / len(flat),
                 "gen_tokens": rollouts.stats["tokens"],
                 "gen_tokens_per_s": rollouts.stats["tokens_per_s"],
                 "gen_seconds": t_gen - t0, "score_seconds": t_score - t_gen}
            if samples:  # vLLM's KV cache sleeps through the update; the new weights go in after
                with PeakMemory(model.embed_tokens.weight.device) as peak:
                    t1 = time.perf_counter()
                    engine.sleep()
                    t2 = time.perf_counter()
                    try:
                        m.update(learner.step(samples))
                        t3 = time.perf_counter()
                        engine.load_weights(learner.named_full_parameters())
                        t4 = time.perf_counter()
                    finally:
                        engine.wake()
                    t5 = time.perf_counter()
                m.update(sleep_seconds=t2 - t1, sync_seconds=t4 - t3, wake_seconds=t5 - t4,
                         sync_path=engine.sync_path,
                         peak_memory_mb=max(peak.peak_mb,
                                            rollouts.stats.get("peak_memory_mb", 0.0)))
            else:
                m["skipped"] = "every group had equal rewards"
            m["step_seconds"] = time.perf_counter() - t0
            result.metrics.append(m)
            if dist_.is_main():
                with open(metrics_path, "a", encoding="utf-8") as mf:
                    mf.write(json.dumps(m) + "\n")
            bar.update(1)
            bar.set_postfix(reward=f"{mean:.3f}", zero=m["zero_signal_groups"])
            if cfg.run.save_every and gstep % cfg.run.save_every == 0 and step < cfg.run.steps:
                save(rnd, step, order)
            step += 1
        result.checkpoint = run_dir / f"checkpoint-round{rnd}"
        whole = learner.checkpoint_model()  # FSDP: gathered from the shards to rank 0
        if dist_.is_main():
            result.checkpoint = save_checkpoint(
                whole, tok, run_dir / f"checkpoint-round{rnd}",
                extra={"round": rnd, "steps": learner.steps_done, "base_model": str(model_dir)},
                dtype=ckpt_dtype)
        log(f"[tao-fast] round {rnd}: checkpoint {result.checkpoint}")
        if cfg.eval.after and rnd < cfg.run.rounds:
            _eval(cfg, engine, tok, eval_scorer, held, f"round{rnd}", run_dir)
        save(rnd, cfg.run.steps, [])  # the round is complete: resume starts the next one
        rnd, step, pool = rnd + 1, 1, None
    bar.close()
    if cfg.eval.after:
        result.eval_after = _eval(cfg, engine, tok, eval_scorer, held, "after", run_dir)
    result.wall_seconds = time.perf_counter() - t_start
    if dist_.is_main():
        write_summary(result, cfg)
    if dist_.active():
        # vLLM's TP/DP groups are made of torchrun's ranks: release them together, before the
        # process group goes (left to exit, vLLM's cleanup fails on the destroyed groups)
        dist_.barrier("end of run")
        engine.close()
    return result


def sparkline(values: list[float]) -> str:
    bars = "▁▂▃▄▅▆▇█"
    if not values:
        return ""
    lo, hi = min(values), max(values)
    return "".join(bars[0 if hi == lo else int((v - lo) / (hi - lo) * 7)] for v in values)


def _eval_fields(res: EvalResult | None) -> dict | None:
    if res is None:
        return None
    return {k: getattr(res, k) for k in ("n", "accuracy", "ci_low", "ci_high", "mean_score",
                                         "mean_response_tokens")}


def write_summary(res: TuneResult, cfg: TaoConfig) -> None:
    curve = [m["reward_mean"] for m in res.metrics]
    summary = {
        "wall_seconds": res.wall_seconds, "checkpoint": str(res.checkpoint or ""),
        "scorer": cfg.scoring.scorer, "steps": len(res.metrics), "reward_curve": curve,
        "before": _eval_fields(res.eval_before),
        "after": _eval_fields(res.eval_after),
    }
    atomic_write_text(res.run_dir / "summary.json", json.dumps(summary, indent=1))
    lines = [f"# tao-fast run: {res.run_dir}", "",
             f"- scorer: `{cfg.scoring.scorer}`; {len(res.metrics)} steps x "
             f"{cfg.rl.prompts_per_step} prompts x {cfg.rollout.n} candidates; "
             f"wall time {res.wall_seconds / 60:.1f} min",
             f"- reward curve (mean reward per step): {sparkline(curve)} "
             f"({curve[0]:.3f} -> {curve[-1]:.3f})" if curve else "- no training steps"]
    if res.eval_before is not None:
        lines.append(f"- held-out before: {res.eval_before.summary()}")
    if res.eval_after is not None:
        lines.append(f"- held-out after:  {res.eval_after.summary()}")
    if res.eval_before is not None and res.eval_after is not None:
        gain = 100 * (res.eval_after.accuracy - res.eval_before.accuracy)
        lines.append(f"- change: {gain:+.1f} points")
    text = "\n".join(lines) + "\n"
    atomic_write_text(res.run_dir / "summary.md", text)
    log(text)
