"""`tao_fast.tune(config)`: the TAO recipe, read top to bottom.

    recipe = TaoRecipe(cfg, run_dir, resuming)
    recipe.setup()    run directory -> scorers -> (data.follow: the first round's traffic) ->
                      prompts -> learner -> restore a saved state -> rollout engine -> held-out
                      evaluation (before)
    recipe.train()    for each round: (data.follow: await_round, the round's traffic)
                      start_round, then for each step: step -> log -> maybe_save ->
                      stop_if_asked; finish_round (checkpoint, evaluation, state)
    recipe.finish()   held-out evaluation (after), summary, the engine released

    SIGTERM / SIGINT (tao_fast/stop.py) stop the run after the step in progress with a training
    state saved, or at once while it waits for traffic (RunStopped -> recipe.stopped());
    data.follow's rounds: tao_fast/data/follow.py.

    step() = next batch of prompts -> N candidates each (rollouts, under rollout.strategy's
             prompts) -> scores -> group advantages -> update on rollout.train_prompt's prompt
             (engine asleep, learner step, weights synced into the engine)

The run directory holds config.yaml, metrics.jsonl, manifest.jsonl, eval_*.json,
summary.json/.md, checkpoint-round*/ and state/ (tao_fast/rl/state.py); run.report_to's trackers
write tensorboard/, wandb/, trackio/ (tao_fast/tracking.py). The config is read,
never changed, while the run goes.
"""
from __future__ import annotations

import bisect
import dataclasses
import itertools
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from signal import SIGKILL, SIGTERM

import torch
from tqdm.auto import tqdm

from tao_fast.checkpoint import save_checkpoint
from tao_fast.config import ConfigError, ResumeError, TaoConfig, load_config, save_config
from tao_fast.data.prompts import encode_prompt, read_fewshot
from tao_fast.data.mix import mix_order, plan_mix, pool_of_mix
from tao_fast.data.follow import FollowTimeout, Follower, follow_config
from tao_fast.data.follow import held_out as follow_held_out
from tao_fast.data.rounds import prompt_id, read_manifest
from tao_fast.data.sources import held_out, load_sources
from tao_fast.dtypes import dtype_name, sampler_dtype, torch_dtype
from tao_fast.eval import EvalResult, evaluate
from tao_fast.fileio import atomic_write_lines
from tao_fast.profiling.memory import PeakMemory
from tao_fast.profiling.trace import phase
from tao_fast.rl import distributed as dist_
from tao_fast.rl.batch import build_samples, fill_groups, reward_signal, take_groups
from tao_fast.rl.metrics import rollout_metrics
from tao_fast.rl.rollout_shards import concat_rollouts
from tao_fast.rl.state import ResumeState, latest_state, load_state, save_state
from tao_fast.rl.trainer import Learner
from tao_fast.rollout import SamplingParams, build_engine, check_records_fit
from tao_fast.rollout.strategies import PromptVariants, generate_candidates
from tao_fast.run_dir import check_space, check_writable, kill_at, writing
from tao_fast.scoring import ScorerContext, build_scorer
from tao_fast.scoring.base import ScoreResult
from tao_fast.scoring.check import (check_scorer, probe_accuracy, separate_label_scorer,
                                    write_check)
from tao_fast.stop import RunStopped, StopRequest, sigterm_at
from tao_fast.summary import write_summary
from tao_fast.tracking import Trackers, check_installed, open_trackers


def spread(records: list, n: int) -> list:
    """n records evenly spaced over the list (all of them when it is shorter): a mix's
    held-out set is its sources' splits one after another, and the first n would be one task."""
    if n >= len(records):
        return list(records)
    return [records[i * len(records) // n] for i in range(n)]


@dataclass
class TuneResult:
    run_dir: Path
    checkpoint: Path | None
    metrics: list[dict] = field(default_factory=list)
    eval_before: EvalResult | None = None
    eval_after: EvalResult | None = None
    wall_seconds: float = 0.0
    stopped: str = ""  # stopped by SIGTERM / SIGINT: where, and how to continue

    @property
    def scoring_always_failed(self) -> bool:
        """Every candidate's scoring failed in every step: the run learned nothing."""
        return bool(self.metrics) and all(m.get("score_failure_frac") == 1.0
                                          for m in self.metrics)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def tune(config: TaoConfig | str | os.PathLike | None = None, overrides=(),
         resume: str | os.PathLike | None = None) -> TuneResult:
    """Run TAO. config: a TaoConfig, or a YAML/TOML path (with key=value overrides).
    resume: a run directory to continue (its config.yaml, then `overrides`, e.g. run.rounds=3
    to add rounds that pick up the prompt files that arrived since)."""
    cfg, run_dir = run_config(config, overrides, resume)
    recipe = TaoRecipe(cfg, run_dir, resuming=resume is not None)
    with recipe.stop.handling_signals():  # SIGTERM / SIGINT: stop after the step in progress
        try:
            recipe.setup()
            recipe.train()
        except RunStopped as e:
            return recipe.stopped(str(e))
        return recipe.finish()


def run_config(config, overrides, resume) -> tuple[TaoConfig, Path]:
    """The run's config and directory: a new run's (refused where a run already is), or a
    resumed run's config.yaml with its directory as run.output_dir (wherever it now lives)."""
    if resume is not None:
        run_dir = Path(resume).resolve()
        if not (run_dir / "config.yaml").exists():
            raise ResumeError(f"--resume {run_dir}: no config.yaml there (not a tao-fast run)")
        cfg = load_config(run_dir / "config.yaml", [*overrides, f"run.output_dir={run_dir}"])
        return (follow_config(cfg, run_dir) if cfg.data.follow else cfg), run_dir
    cfg = config if isinstance(config, TaoConfig) else load_config(config, overrides)
    run_dir = Path(cfg.run.output_dir).resolve()
    if holds_run(run_dir):
        raise ConfigError(f"run.output_dir: {run_dir} already holds a run; continue it with "
                          f"`tao-fast tune --resume {run_dir}` or choose another directory")
    return (follow_config(cfg, run_dir) if cfg.data.follow else cfg), run_dir


def holds_run(run_dir: Path) -> bool:
    """Whether a new run would overwrite another's results there: a training state, a round
    checkpoint or logged steps."""
    metrics = run_dir / "metrics.jsonl"
    return ((run_dir / "state" / "latest").exists() or any(run_dir.glob("checkpoint-round*"))
            or (metrics.exists() and metrics.stat().st_size > 0))


class TaoRecipe:
    """One TAO run (see the module docstring for the order of its parts)."""

    def __init__(self, cfg: TaoConfig, run_dir: Path, resuming: bool = False):
        self.cfg, self.run_dir, self.resuming = cfg, Path(run_dir), resuming
        self.t_start = time.perf_counter()
        self.result = TuneResult(run_dir=self.run_dir, checkpoint=None)
        self.engine = None
        self.progress = cfg.run.progress
        self.trackers = Trackers()  # run.report_to's, opened with the run directory's files
        self.stop = StopRequest()  # SIGTERM / SIGINT asked the run to stop (tao_fast/stop.py)
        self.follower: Follower | None = None  # data.follow's (tao_fast/data/follow.py)

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Everything that can refuse the run, then the run directory's files: a refused
        setup leaves an existing run directory as it was."""
        self.setup_run()
        self.setup_scoring()
        self.setup_learner()
        self.restore()
        self.setup_engine()
        self.write_run_files()
        if self.cfg.eval.before:
            self.result.eval_before = self.eval_before()
        self.preflight()

    def setup_run(self) -> None:
        """The run directory (writable), the process group under torchrun, the CPU threads and
        the seed."""
        check_writable(self.run_dir)
        self.fewshot = read_fewshot(self.cfg.rollout.fewshot_file)  # a bad file fails here
        dist_.init(self.cfg.run.dist_timeout_s, self.run_dir)
        strategy = self.cfg.rollout.strategy
        if dist_.active() and len(self.cfg.rollout.strategies) > 1:
            raise ConfigError(f"rollout.strategy: {strategy} mixes strategies in a group, "
                              f"which runs on one process; under torchrun use one strategy")
        self.progress = self.cfg.run.progress and dist_.is_main()  # one bar: rank 0's
        if self.cfg.run.threads:
            torch.set_num_threads(self.cfg.run.threads)
        torch.manual_seed(self.cfg.run.seed)
        check_installed(self.cfg)  # run.report_to's packages, before any model loads

    def setup_follow(self) -> None:
        """data.follow: the log directory checked and the first round's traffic waited for and
        ingested, before any model loads (a server's first requests may take a while)."""
        data = self.cfg.data
        if not data.follow:
            return
        self.follower = Follower(data, self.run_dir, self.stop, log)
        if not self.resuming and dist_.is_main():
            # config.yaml before the wait: `tao-fast serve --model RUN_DIR` serves its
            # model.path (the base) until round 1's checkpoint appears, and takes the traffic
            # this run waits for (a follow run that stops here resumes from the beginning)
            save_config(self.cfg, self.run_dir / "config.yaml")
        if not self.follower.await_round(1):
            raise FollowTimeout(f"data.follow_max_wait_s: fewer than data.min_new_prompts="
                                f"{data.min_new_prompts} new prompts arrived in {data.follow} "
                                f"in {data.follow_max_wait_s:g} s: no round ran")

    def setup_scoring(self) -> None:
        """Scorers (a bad spec fails here, before any model loads) and the prompts they score,
        checked against them (e.g. every SQL prompt's database)."""
        cfg, sc = self.cfg, self.cfg.scoring
        ctx = ScorerContext(seed=cfg.run.seed, failure_value=sc.failure_value,
                            timeout_s=sc.timeout_s, memory_mb=sc.memory_mb, base_dir=Path.cwd(),
                            policy_engine=self.policy)
        self.scorer = build_scorer(sc.scorer, ctx, where="scoring.scorer")
        self.eval_scorer = (build_scorer(cfg.eval.scorer, ctx, where="eval.scorer")
                            if cfg.eval.scorer else self.scorer)
        self.setup_follow()  # data.follow: its first round's prompts, once a spec is known good
        self.sources = load_sources(cfg.data, cfg.run.seed)
        self.train_prompts = [r for s in self.sources for r in s.train]
        self.held_out = (follow_held_out(self.run_dir) if cfg.data.follow and not cfg.data.eval
                         else held_out(cfg.data, self.sources))  # follow: a fixed set
        for s, recs in ((self.scorer, self.train_prompts), (self.eval_scorer, self.held_out)):
            if recs:
                s.check(recs)
        self.probe_scorer = self.labelled_probe()

    def policy(self):
        """(engine, tokenizer) of the policy being tuned, for a judge that asks it."""
        if self.engine is None:
            raise RuntimeError("the policy's engine is asked for before it is built")
        return self.engine, self.tokenizer

    def setup_learner(self) -> None:
        from tao_fast.models import load_model

        cfg = self.cfg
        self.model, self.tokenizer, self.model_dir = load_model(cfg.model)
        w = self.model.embed_tokens.weight  # rollout.dtype=auto: by the CPU, else the model's
        self.sampler_dtype = sampler_dtype(cfg.rollout.dtype, w.dtype, w.device)
        self.learner = Learner(self.model, cfg.rl, cfg.rollout.temperature,
                               cfg.model.ops_backend, progress=self.progress,
                               replica_dtype=self.sampler_dtype,
                               max_response_tokens=cfg.rollout.max_tokens,
                               autocast=cfg.model.autocast)

    def restore(self) -> None:
        """Where the run starts: round 1, step 1, or where its newest training state says
        (weights, optimizer, scheduler, RNGs, data position); the metrics of the steps done
        and the manifest of the rounds begun are kept."""
        cfg = self.cfg
        self.round, self.step, self.order = 1, 1, []
        self.rng = random.Random(cfg.run.seed)
        self.pool, self.encoded, self.pool_sizes = None, [], []
        self.drawn = [0] * len(self.sources)  # prompts drawn per source in the step
        self.manifest = read_manifest(self.run_dir)
        state_dir = latest_state(self.run_dir) if self.resuming else None
        if state_dir is not None:
            saved = ResumeState.from_json(
                load_state(state_dir, self.model, self.learner.opt, self.learner.sched))
            self.learner.steps_done = saved.learner_steps
            self.rng.setstate(saved.python_rng)
            self.round, self.step, self.order = saved.next_position(cfg.run.steps)
            if self.step > 1:  # inside a begun round: the same pool, the same order
                self.pool, self.pool_sizes = pool_of_mix(self.manifest[self.round - 1],
                                                         self.sources, cfg.data)
            lines = (self.run_dir / "metrics.jsonl").read_text().splitlines()
            self.result.metrics = [json.loads(x) for x in lines[:saved.metrics_lines]]
            self.result.checkpoint = Path(saved.checkpoint) if saved.checkpoint else None
            log(f"[tao-fast] resuming {self.run_dir} from {state_dir.name}: round "
                f"{self.round}, step {self.step}")
        elif self.resuming:
            why = "run.keep_states=0 writes none" if not cfg.run.keep_states else "none saved yet"
            log(f"[tao-fast] {self.run_dir} has no training state ({why}): starting it from "
                f"the beginning")
        self.manifest = self.manifest[:self.round - (self.pool is None)]

    def setup_engine(self) -> None:
        """The rollout engine, after the restored weights are in the model. Under FSDP it gets a
        whole-weight replica, except a vLLM TP engine: that loads its shards from the learner's."""
        cfg, learner = self.cfg, self.learner
        tp_engine = cfg.rollout.tensor_parallel > 1
        self.engine = build_engine(cfg.rollout,
                                   learner.model if tp_engine else learner.full_model(),
                                   self.tokenizer, model_dir=self.model_dir, seed=cfg.run.seed)
        if learner.parallel == "fsdp":
            log("[tao-fast] FSDP2: rollout weights " + (
                "gathered from the shards into vLLM's TP shards (no whole-weight replica)"
                if tp_engine else f"from a whole-weight {dtype_name(self.sampler_dtype)} replica "
                f"per rank"))
        if self.engine.lockstep:
            self._refuse_policy_judge_under_dp()
        self.train_ids: dict[str, PromptVariants] = {}  # every prompt fits, before any compute
        self.encode_training(self.train_prompts)
        if self.held_out:  # answered as the tuned model will be asked (rollout.train_prompt)
            self.encode(self.held_out, cfg.eval.max_tokens, "eval.max_tokens",
                        cfg.rollout.prompt_strategy)
        n_params = sum(p.numel() for p in self.model.parameters())
        n_train = sum(p.numel() for p in self.learner.trainable)
        lo = cfg.model.lora
        trains = (f"LoRA rank {lo.rank} on {','.join(lo.targets)}: {n_train / 1e6:.2f}M "
                  f"trained, base frozen in {dtype_name(self.model.embed_tokens.weight.dtype)}"
                  if lo.enabled else "all trained")
        log(f"[tao-fast] model {self.model_dir} ({n_params / 1e6:.1f}M params, {trains}), "
            f"{len(self.train_prompts)} training prompts, {len(self.held_out)} held-out, scorer "
            f"{self.scorer.name} (held-out scored by {self.eval_scorer.name})")

    def write_run_files(self) -> None:
        """config.yaml, and metrics.jsonl with the lines of the steps done (a resumed run
        redoes the steps after its state)."""
        if dist_.is_main():
            save_config(self.cfg, self.run_dir / "config.yaml")
        self._write_lines("metrics.jsonl", self.result.metrics)
        # run.report_to (rank 0); a resumed run relogs from the step after its kept lines
        self.trackers = open_trackers(self.cfg, self.run_dir,
                                      len(self.result.metrics) + 1 if self.resuming else None)

    def _refuse_policy_judge_under_dp(self) -> None:
        for where, s in (("scoring.scorer", self.scorer), ("eval.scorer", self.eval_scorer)):
            if s.uses_policy:
                tp = self.cfg.rollout.tensor_parallel
                raise ConfigError(
                    f"{where}: a judge on the policy model under vLLM data parallelism "
                    f"({dist_.world_size() // tp} engines): vLLM's data-parallel engines step "
                    f"together, and each rank judges a different share (a gate may leave one "
                    f"rank nothing to judge). Give the judge its own model (model: PATH), or "
                    f"make one engine of all ranks with rollout.tensor_parallel="
                    f"{dist_.world_size()}")

    def eval_before(self) -> EvalResult | None:
        saved = self.run_dir / "eval_before.json"
        if self.resuming and saved.exists():
            return EvalResult.load(saved)
        return self.evaluate("before")

    # ------------------------------------------------------------------ scorer vs labels
    def labelled_probe(self):
        """eval.probe=auto: eval.scorer, when it is the run's own label scorer and checks the
        training prompts (their records carry what it needs), scores each step's candidates
        too (probe_accuracy); else None."""
        if self.cfg.eval.probe == "off" or not separate_label_scorer(self.cfg):
            return None
        try:
            self.eval_scorer.check(self.train_prompts)
        except ConfigError as e:
            log(f"[tao-fast] no labelled probe: eval.scorer cannot score the training prompts "
                f"({e})")
            return None
        return self.eval_scorer

    def add_probe(self, records, texts, scores: ScoreResult) -> float:
        """The labelled probe of a batch's candidates into scores.stats["probe_accuracy"] (the
        training rewards unchanged); returns its seconds."""
        if self.probe_scorer is None:
            return 0.0
        t0 = time.perf_counter()
        acc = probe_accuracy(self.probe_scorer, records, texts)
        if acc is not None:
            scores.stats["probe_accuracy"] = acc
        return time.perf_counter() - t0

    def preflight(self) -> None:
        """eval.preflight held-out prompts: the training scorer measured against eval.scorer
        (tao_fast/scoring/check.py) into RUN_DIR/preflight.json, its verdict logged. A warning,
        never a refusal; a resumed run that has one keeps it."""
        cfg, path = self.cfg, self.run_dir / "preflight.json"
        if not (cfg.eval.preflight and self.held_out and separate_label_scorer(cfg)):
            return
        if self.resuming and path.exists():
            return
        try:
            res = check_scorer(self.engine, self.tokenizer, spread(self.held_out,
                                                                  cfg.eval.preflight),
                               self.scorer, self.eval_scorer, cfg, fewshot=self.fewshot,
                               progress=self.progress)
        except ConfigError as e:  # e.g. a held-out prompt too long for rollout.max_tokens
            log(f"[tao-fast] pre-flight skipped: {e}")
            return
        if dist_.is_main():
            write_check(path, res)
        log(f"[tao-fast] pre-flight, {res['prompts']} held-out prompts x {res['n']} candidates "
            f"({res['seconds']:.0f} s, {path.name}): {res['verdict']}")

    # ------------------------------------------------------------------ train
    def train(self) -> None:
        last = self.last_round
        self.bar = tqdm(total=None if last == float("inf") else last * self.cfg.run.steps,
                        initial=len(self.result.metrics), desc="tune", unit="step",
                        disable=not self.progress)
        self.kill_at, self.sigterm_at = kill_at(dist_.rank()), sigterm_at()
        while self.round <= last:
            self.stop_if_asked(at_round_start=True)
            if not self.await_round():  # data.follow: no traffic in data.follow_max_wait_s
                break
            self.start_round()
            while self.step <= self.cfg.run.steps:
                self.log_step(self.train_step())
                self.stop_if_asked(saved=self.maybe_save())
                self.step += 1
            self.finish_round()
        self.stop_if_asked(at_round_start=True)  # asked in the last step: no evaluation after
        self.bar.close()

    @property
    def last_round(self) -> float:
        """run.rounds; with data.follow, data.follow_rounds (inf: until stopped)."""
        data = self.cfg.data
        if data.follow:
            return data.follow_rounds or float("inf")
        return self.cfg.run.rounds

    @property
    def global_step(self) -> int:
        return (self.round - 1) * self.cfg.run.steps + self.step

    def await_round(self) -> bool:
        """data.follow: the round's traffic waited for and ingested, unless a round begun
        before a resume has its pool; False when data.follow_max_wait_s passed."""
        return self.follower is None or self.pool is not None or \
            self.follower.await_round(self.round)

    def stop_if_asked(self, saved: bool = False, at_round_start: bool = False) -> None:
        """After a step, or before a round: on SIGTERM / SIGINT, a training state where the run
        stands (unless one was just saved), then RunStopped. A round's last step goes on to
        the round's checkpoint and state first (finish_round), and stops before the next."""
        if not self.stop.requested or (not at_round_start and self.step == self.cfg.run.steps):
            return
        done = len(self.result.metrics)
        if not at_round_start and not saved:
            self.save_state(self.step, self.order)
        where = f"after step {done}" if done else "before the first step"
        kept = ("the training state is saved" if self.cfg.run.keep_states else
                "no training state (run.keep_states=0): a resume starts over")
        raise RunStopped(f"stopped by {self.stop.name} {where}; {kept}; `tao-fast tune --resume "
                         f"{self.run_dir}` continues")

    def start_round(self) -> None:
        """A new round's pool: the prompts that arrived since, plus a replayed share (unless
        the round was begun before a resume); room on disk for what the round will write."""
        cfg = self.cfg
        if self.pool is None:
            plan, self.pool_sizes = plan_mix(self.round, self.sources, self.manifest, cfg.data,
                                             cfg.run.seed)
            if not plan.prompts:
                raise ConfigError(f"round {self.round}: no prompts (data.train={cfg.data.train})")
            self.manifest.append(plan.manifest_line())
            self._write_lines("manifest.jsonl", self.manifest)
            self.pool, self.order = plan.prompts, []
            log(f"[tao-fast] round {self.round}: {plan.n_new} new prompts from "
                f"{len(plan.new_files)} new file(s), {plan.n_replay} replayed" + (
                    "; mix " + ", ".join(f"{m['task'] or m['source']} {m['n_prompts']} "
                                         f"(weight {m['weight']:g})" for m in plan.mix)
                    if cfg.data.mixed else ""))
        self.encode_training(self.pool)  # the prompts of files that arrived since setup
        self.encoded = [self.train_ids[prompt_id(r)] for r in self.pool]
        check_space(self.run_dir, self.model, cfg.run.keep_states, self.checkpoint_dtype,
                    merged=cfg.run.merge_lora)

    def encode(self, records, max_tokens: int, key: str, strategy: str) -> list[list[int]]:
        """Token ids of the records' prompts (chat template, `strategy`), each checked to
        leave room for max_tokens in the engine's context: an over-long prompt is an error
        naming it before any generation."""
        ids = [encode_prompt(r, self.tokenizer, strategy, self.cfg.data.system_prompt,
                             self.fewshot)
               for r in tqdm(records, desc="encode", unit="prompt", leave=False,
                             disable=not self.progress or len(records) < 2000)]
        check_records_fit(records, ids, max_tokens, self.engine.max_context, key)
        return ids

    def encode_training(self, records) -> None:
        """Encode and check the training prompts not seen yet (train_ids: by prompt id), under
        each of rollout.strategy's strategies (generation; every one must fit) and, with
        rollout.train_prompt=plain, plain (what the learner trains on)."""
        ro = self.cfg.rollout
        new = {prompt_id(r): r for r in records if prompt_id(r) not in self.train_ids}
        recs = list(new.values())
        by_strategy = {s: self.encode(recs, ro.max_tokens, "rollout.max_tokens", s)
                       for s in dict.fromkeys((*ro.strategies, ro.prompt_strategy))}
        for i, pid in enumerate(new):
            self.train_ids[pid] = PromptVariants([by_strategy[s][i] for s in ro.strategies],
                                                 by_strategy[ro.prompt_strategy][i])

    def next_batch(self) -> tuple[list, list[PromptVariants]]:
        """rl.prompts_per_step records of the pool and their prompts' token ids (encoded when
        the round began); the pool is reshuffled once per pass over it, a mix's draws go to
        its sources' weights (tao_fast/data/mix.py)."""
        n = self.cfg.rl.prompts_per_step
        if len(self.order) < n:
            self.order += mix_order(self.pool_sizes, [s.spec.weight for s in self.sources],
                                    len(self.pool), self.rng)
        idx, self.order = self.order[:n], self.order[n:]
        ends = list(itertools.accumulate(self.pool_sizes))
        for i in idx:  # the step's draws per source: the metrics line's mix/<source>/prompts
            self.drawn[bisect.bisect_right(ends, i)] += 1
        return [self.pool[i] for i in idx], [self.encoded[i] for i in idx]

    def train_step(self) -> dict:
        """One step: next batch -> rollouts -> scores (more rounds while dynamic sampling
        fills the batch) -> the algorithm's samples -> update. Returns its line of metrics."""
        t0 = time.perf_counter()
        cfg, gstep, algo = self.cfg, self.global_step, self.learner.algo
        self.drawn = [0] * len(self.sources)
        rollouts, scores, extra, gen_s, score_s = self.rollouts_for_step()
        if gstep == self.kill_at:
            os.kill(os.getpid(), SIGKILL)
        if gstep == self.sigterm_at:  # the tests' stop request in mid-step (tao_fast/stop.py)
            os.kill(os.getpid(), SIGTERM)
        max_tokens = cfg.rollout.max_tokens
        signal = reward_signal(scores.rewards)  # [P], before any shaping
        m = {"round": self.round, "step": self.step, "global_step": gstep,
             **rollout_metrics(rollouts, scores, signal, gen_s, score_s)}
        if cfg.data.mixed:  # how many of the step's prompts each source gave
            m.update({f"mix/{s.task or s.spec.source}/prompts": k
                      for s, k in zip(self.sources, self.drawn)})
        if algo.dynamic_rounds:  # DAPO: train on rl.prompts_per_step groups with signal
            keep = fill_groups(signal, cfg.rl.prompts_per_step)
            rollouts, scores = take_groups(rollouts, scores, keep)
            m.update(dynamic_rounds=extra, signal_groups=len(keep))
        batch = build_samples(algo, cfg.rl, rollouts, scores.rewards, max_tokens)
        m.update(batch.metrics)
        if batch.samples:
            m.update(self.update(batch.samples, rollouts.stats.get("peak_memory_mb", 0.0)))
        else:
            m["skipped"] = ("no candidate to train on: every group had equal rewards"
                            + (" or lost its candidates to rl.overlong=filter"
                               if algo.overlong == "filter" else ""))
        m["step_seconds"] = time.perf_counter() - t0
        return m

    def rollouts_for_step(self):
        """The step's rollouts and scores: one batch of rl.prompts_per_step prompts, then, with
        dynamic sampling, up to its bound of extra batches while fewer than prompts_per_step
        groups carry signal. -> (rollouts [P][N], scores [P][N], extra batches, generation
        seconds, scoring seconds)."""
        cfg, gstep, algo = self.cfg, self.global_step, self.learner.algo
        parts, gen_s, score_s, n_signal, extra = [], 0.0, 0.0, 0, 0
        while True:
            recs, prompts = self.next_batch()
            seed = cfg.run.seed * 1_000_003 + gstep + 104_729 * extra  # strategies add 7_919 * s
            sampling = SamplingParams.from_config(cfg.rollout, seed=seed)
            # candidate j under strategy j % k; under torchrun each rank samples and scores a
            # slice (one strategy), every rank gets the whole
            ro, sc, g, s = generate_candidates(self.engine, self.scorer, prompts, recs, sampling,
                                               cfg.rollout.strategies, progress=self.progress)
            s += self.add_probe(recs, ro.texts, sc)  # eval.probe: probe_accuracy in sc.stats
            # the responses train on rollout.train_prompt's prompt: with plain, the user's own
            # (the learner's importance weight, capped at rl.tis_cap, corrects for the change)
            parts.append((dataclasses.replace(ro, prompt_ids=[p.train for p in prompts]), sc))
            gen_s, score_s = gen_s + g, score_s + s
            n_signal += sum(reward_signal(sc.rewards))
            if n_signal >= cfg.rl.prompts_per_step or extra >= algo.dynamic_rounds:
                break
            extra += 1
        if len(parts) == 1:
            return (*parts[0], 0, gen_s, score_s)
        rollouts = concat_rollouts([p[0] for p in parts], one_after_another=True)
        scores = ScoreResult.concat([p[1] for p in parts])
        return rollouts, scores, extra, gen_s, score_s

    def update(self, samples, gen_peak_mb: float) -> dict:
        """The engine sleeps (vLLM frees its KV cache for the update), the learner steps, the
        new weights go into the engine, the engine wakes."""
        with PeakMemory(self.model.embed_tokens.weight.device) as peak:
            t1 = time.perf_counter()
            with phase("tao/sleep"):
                self.engine.sleep()
            t2 = time.perf_counter()
            try:
                with phase("tao/train"):
                    m = self.learner.step(samples)
                t3 = time.perf_counter()
                with phase("tao/sync"):
                    self.engine.load_weights(self.learner.named_sync_parameters())
                t4 = time.perf_counter()
            finally:
                with phase("tao/wake"):
                    self.engine.wake()
            t5 = time.perf_counter()
        return {**m, "sleep_seconds": t2 - t1, "sync_seconds": t4 - t3, "wake_seconds": t5 - t4,
                "sync_path": self.engine.sync_path,
                "peak_memory_mb": max(peak.peak_mb, gen_peak_mb)}

    def log_step(self, m: dict) -> None:
        """One line of metrics.jsonl (rank 0), the progress bar; a warning the first time
        every candidate's scoring failed in a step."""
        if m["score_failure_frac"] == 1.0 and not any(
                x.get("score_failure_frac") == 1.0 for x in self.result.metrics):
            failed = {k: v for k, v in m.items() if k.startswith("score_failures/")}
            log(f"[tao-fast] warning: step {m['global_step']}: every candidate's scoring failed "
                f"({failed}); their rewards are scoring.failure_value="
                f"{self.cfg.scoring.failure_value}: the errors are in metrics.jsonl and the "
                f"scorer's details")
        self.result.metrics.append(m)
        if dist_.is_main():
            with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(m) + "\n")
        self.trackers.log(m, m["global_step"])
        self.bar.update(1)
        self.bar.set_postfix(reward=f"{m['reward_mean']:.3f}", zero=m["zero_signal_groups"])

    def maybe_save(self) -> bool:
        """A training state every run.save_every steps (a round's last step: finish_round's);
        returns whether one was saved."""
        if (self.cfg.run.save_every and self.global_step % self.cfg.run.save_every == 0
                and self.step < self.cfg.run.steps):
            self.save_state(self.step, self.order)
            return True
        return False

    def finish_round(self) -> None:
        """The round's checkpoint, its held-out evaluation (but the last round's, which
        finish() takes), and a training state from which a resume starts the next round."""
        rnd = self.round
        self.result.checkpoint = self.run_dir / f"checkpoint-round{rnd}"
        whole = self.learner.checkpoint_model()  # FSDP: gathered from the shards to rank 0
        if dist_.is_main():
            with writing(f"the checkpoint {self.result.checkpoint}", self.run_dir):
                save_checkpoint(whole, self.tokenizer, self.result.checkpoint,
                                extra={"round": rnd, "steps": self.learner.steps_done,
                                       "base_model": str(self.model_dir)},
                                dtype=self.checkpoint_dtype, base_model=str(self.model_dir),
                                merge=self.cfg.run.merge_lora)
        log(f"[tao-fast] round {rnd}: checkpoint {self.result.checkpoint}")
        if self.cfg.eval.after and rnd < self.last_round and not self.stop.requested:
            self.evaluate(f"round{rnd}")
        self.save_state(self.cfg.run.steps, [])
        self.round, self.step, self.pool = rnd + 1, 1, None

    @property
    def checkpoint_dtype(self) -> torch.dtype | None:
        """run.checkpoint_dtype; None for "auto" (the learner's own)."""
        name = self.cfg.run.checkpoint_dtype
        return None if name == "auto" else torch_dtype(name)

    def save_state(self, step_done: int, order: list[int]) -> None:
        """A training state (run.keep_states of them stay); every rank takes part under FSDP,
        rank 0 writes."""
        cfg = self.cfg
        if not cfg.run.keep_states:
            return
        saved = ResumeState(round=self.round, step=step_done,
                            learner_steps=self.learner.steps_done, order=order,
                            python_rng=self.rng.getstate(),
                            metrics_lines=len(self.result.metrics),
                            checkpoint=str(self.result.checkpoint or ""))
        full = self.learner.full_state()  # FSDP: gathered to rank 0 (every rank takes part)
        if dist_.is_main():
            with writing(f"the training state to {self.run_dir / 'state'}", self.run_dir):
                save_state(self.run_dir, (self.round - 1) * cfg.run.steps + step_done,
                           self.model, self.learner.opt, self.learner.sched, saved.to_json(),
                           keep=cfg.run.keep_states, **full)

    # ------------------------------------------------------------------ evaluation, the end
    def evaluate(self, name: str) -> EvalResult | None:
        """Greedy (eval_NAME.json) and, with eval.samples, sampled pass@1 at the rollout
        temperature (eval_NAME_sampled.json) on the held-out prompts; returns the greedy."""
        if not self.held_out:
            return None
        cfg, out = self.cfg, None
        modes = [("", False)]
        if cfg.eval.samples and cfg.rollout.temperature > 0:
            modes.append(("_sampled", True))
        for suffix, sampled in modes:
            res = evaluate(self.engine.model, self.held_out, self.eval_scorer, cfg,
                           sampled=sampled, engine=self.engine, tokenizer=self.tokenizer,
                           progress=self.progress)
            if dist_.is_main():  # each engine answered a slice, every rank has all
                res.save(self.run_dir / f"eval_{name}{suffix}.json")
                self.trackers.log_eval(res, 0 if name == "before" else len(self.result.metrics))
            log(f"[eval {name}] held-out {res.summary()} ({res.seconds:.0f} s)")
            out = out or res
        return out

    def finish(self) -> TuneResult:
        if self.cfg.eval.after:
            self.result.eval_after = self.evaluate("after")
        self.result.wall_seconds = time.perf_counter() - self.t_start
        if dist_.is_main():
            log(write_summary(self.result, self.cfg))
        self.trackers.close()
        if dist_.active():
            # vLLM's TP/DP groups are made of torchrun's ranks: release them together, before
            # the process group goes (left to exit, vLLM's cleanup fails on the destroyed groups)
            dist_.barrier("end of run")
            self.engine.close()
        return self.result

    def stopped(self, why: str) -> TuneResult:
        """The end of a run stopped by SIGTERM / SIGINT (RunStopped): no evaluation or
        summary, trackers closed; `why` says where it stopped and how to continue."""
        if getattr(self, "bar", None) is not None:
            self.bar.close()
        log(f"[tao-fast] {why}")
        self.result.stopped = why
        self.result.wall_seconds = time.perf_counter() - self.t_start
        self.trackers.close()
        return self.result

    def _write_lines(self, name: str, lines: list[dict]) -> None:
        if dist_.is_main():  # under torchrun rank 0 alone writes the run directory
            atomic_write_lines(self.run_dir / name, (json.dumps(x) for x in lines))
