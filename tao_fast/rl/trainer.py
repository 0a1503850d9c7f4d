"""The learner: turns scored rollouts into policy-gradient updates.

One `Learner.step` = rl.epochs passes over a batch of candidates, each pass rl.minibatches
optimizer steps (the batch reshuffled into minibatches every pass):
  samples (prompt + response ids, advantage, sampler log-probs)
  -> with more than one update: the learner's log-probs of every sample, before the first
     update (no grad): the old log-probs the ratio and the clip compare against
  -> for each update: micro-batches packed to a token budget (no padding)
     -> packed forward -> fused linear log-prob (+ entropy) of the response tokens (no [T, V]
        logits)
     -> the algorithm's loss (tao_fast/rl/algorithms.py): token-level PPO clip with truncated
        importance sampling (+ optional KL), GSPO's sequence clip, or bon-sft's log-likelihood
     -> backward per micro-batch, scaled so the sum equals the minibatch's loss
     -> clip grad norm, AdamW.
Statistics stay on the device as tensors; they are read once, at the end of the step.
"""
from __future__ import annotations

import copy
import random
import time
from dataclasses import dataclass
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from tao_fast import ops
from tao_fast.config import RLConfig
from tao_fast.dtypes import learner_autocast
from tao_fast.kernels.reference import IGNORE_INDEX
from tao_fast.models import lora
from tao_fast.models.llama import Transformer
from tao_fast.rl import distributed as dist_
from tao_fast.rl import fsdp
from tao_fast.rl.algorithms import resolve
from tao_fast.rl.losses import gspo_loss, sft_loss
from tao_fast.rl.packing import (balance_tokens, make_packed_batch, microbatch_agg,
                                 pack_per_token, pack_sequences)


@dataclass
class Sample:
    ids: list[int]  # prompt + response tokens
    prompt_len: int
    advantage: float
    sampler_logprobs: list[float]  # one per response token, from the rollout engine

    def __post_init__(self):
        if len(self.ids) - self.prompt_len != len(self.sampler_logprobs):
            raise ValueError("sampler_logprobs must have one entry per response token")

    @property
    def num_response_tokens(self) -> int:
        return len(self.ids) - self.prompt_len


def samples_from_rollouts(rollouts, advantages, has_signal, keep=None) -> list[Sample]:
    """Candidates of groups that carry signal, with at least one response token; with keep
    ([P][N] bools), only the candidates it marks (bon-sft's best, the overlong filter)."""
    out = []
    for p, (prompt, sig) in enumerate(zip(rollouts.prompt_ids, has_signal)):
        if not sig:
            continue
        for c, (resp, lps, adv) in enumerate(zip(rollouts.token_ids[p], rollouts.logprobs[p],
                                                 advantages[p])):
            if resp and (keep is None or keep[p][c]):
                out.append(Sample(list(prompt) + list(resp), len(prompt), adv, list(lps)))
    return out


class Targets(NamedTuple):
    """A packed micro-batch's next-token targets, on the device: `all` [T] (IGNORE_INDEX where
    a position predicts nothing), `keep` [K] the positions with a target, `kept` [K] their
    targets. Built on the host (make_targets), so selecting them costs no device sync."""
    all: torch.Tensor
    keep: torch.Tensor
    kept: torch.Tensor


def make_targets(per_sample: list[list[int]], batch, device) -> Targets:
    """Targets of a micro-batch from each sample's per-token targets (_per_token's first)."""
    t = pack_per_token(per_sample, batch, dtype=torch.long)  # [T], host
    keep = torch.nonzero(t != IGNORE_INDEX).squeeze(1)  # [K], host
    return Targets(t.to(device), keep.to(device), t[keep].to(device))


def _per_token(s: Sample):
    """targets / advantages / sampler log-probs, aligned so position t predicts ids[t + 1]."""
    n_prompt, n_resp = s.prompt_len, s.num_response_tokens
    targets = [IGNORE_INDEX] * (n_prompt - 1) + s.ids[n_prompt:] + [IGNORE_INDEX]
    sampler = [0.0] * (n_prompt - 1) + s.sampler_logprobs + [0.0]
    return targets, [s.advantage] * (n_prompt + n_resp), sampler


class Learner:
    """max_response_tokens: rollout.max_tokens, Dr.GRPO's constant normaliser (token-sum-norm
    divides by max_response_tokens x the update's sequences, whatever their lengths)."""

    def __init__(self, model: Transformer, cfg: RLConfig, temperature: float,
                 ops_backend: str = "auto", progress: bool = False,
                 replica_dtype: torch.dtype | None = None, max_response_tokens: int = 0,
                 autocast: str = "none"):
        if temperature <= 0:
            raise ValueError("training needs sampled rollouts: rollout.temperature must be > 0")
        self.model, self.cfg, self.temperature = model, cfg, temperature
        self.algo = resolve(cfg, max(max_response_tokens, 1))
        if self.algo.agg == "token-sum-norm" and max_response_tokens < 1:
            raise ValueError("rl.loss_agg token-sum-norm (dr-grpo) needs max_response_tokens "
                             "(rollout.max_tokens) for its constant normaliser")
        self.max_response_tokens = max_response_tokens
        # model.autocast: the forward's matmuls in bf16 where the CPU has native bf16 GEMMs
        self.autocast = learner_autocast(autocast, model.embed_tokens.weight.device)
        self.model.ops_backend = ops_backend  # attention; the loss ops read it from here too
        self.progress = progress
        self.ref = None
        # model.lora: the adapters train, the base is frozen; the KL reference is the base
        # with the adapters off (no copy). Full-weight: a frozen copy of the starting policy
        # (a full replica on every rank)
        self.lora = lora.is_lora(model)
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        if cfg.kl_coef > 0 and not self.lora:
            self.ref = copy.deepcopy(model).eval().requires_grad_(False)
        # under torchrun: DDP (a replica per rank, gradients summed in one all-reduce) or FSDP2
        self.parallel = None
        if dist_.world_size() > 1:
            self.parallel = fsdp.choose_parallel(cfg.parallel, model, cfg.micro_batch_tokens)
            if self.parallel == "fsdp":  # LoRA: the frozen base sharded, adapters replicated
                fsdp.fully_shard_model(model, ignored=self.trainable if self.lora else ())
                # sharding replaced the Parameters (DTensors): the optimizer takes the new ones
                self.trainable = [p for p in model.parameters() if p.requires_grad]
        # FSDP: whole weights for a rollout engine that needs them, made by full_model() on
        # first use, in the rollout dtype (a colocated vLLM of that dtype takes it over as its
        # own weights: one bf16 copy per rank, as tao_fast/rl/memory.py plans); a vLLM TP
        # engine loads from the shards and never asks for one
        self._replica: Transformer | None = None
        self._replica_dtype = replica_dtype or model.embed_tokens.weight.dtype
        self.opt = torch.optim.AdamW(self.trainable, lr=cfg.lr, betas=(0.9, 0.99),
                                     weight_decay=cfg.weight_decay, eps=1e-8)
        # linear warm-up to rl.lr over rl.warmup_steps, then constant
        warm = max(cfg.warmup_steps, 1)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt,
                                                       lambda s: min(1.0, (s + 1) / warm))
        self.steps_done = 0

    def _logprobs(self, model, batch, targets: "Targets", entropy: bool = False):
        """logp [T] (and entropy [T] with entropy=True) of targets under the model, 0 where a
        position has no target. The output projection runs on the target positions alone:
        the prompt's positions predict nothing the loss uses (about half a demo batch's
        tokens, and the [V, H] projection is ~21% of the 135M model's FLOPs per token; on the
        2-core CPU the step time did not change beyond its noise, bench/RESULTS.md)."""
        dev = model.embed_tokens.weight.device
        with torch.autocast(dev.type, dtype=self.autocast, enabled=self.autocast is not None):
            hidden = model(batch.input_ids, batch.positions, batch.cu_seqlens, batch.max_seqlen)
            out = ops.linear_logprob(hidden.index_select(0, targets.keep),  # [K, H]
                                     model.output_weight, targets.kept,
                                     temperature=self.temperature, return_entropy=entropy,
                                     entropy_grad=False, backend=model.ops_backend)
        T = hidden.shape[0]

        def scatter(x):  # [K] -> [T]
            return x.new_zeros(T).index_copy(0, targets.keep, x)

        return tuple(map(scatter, out)) if entropy else scatter(out)

    @property
    def has_ref(self) -> bool:
        """Whether the loss has a KL reference (rl.kl_coef > 0)."""
        return self.cfg.kl_coef > 0

    def _ref_logprobs(self, batch, targets: "Targets") -> torch.Tensor:
        """The KL reference's log-probs [T] (no grad): the frozen copy, or with LoRA the base
        alone (the adapters off)."""
        with torch.no_grad():
            if self.ref is not None:
                return self._logprobs(self.ref, batch, targets)
            with lora.adapters_off(self.model):
                return self._logprobs(self.model, batch, targets)

    def _pad_forwards(self, n_mine: int, backward: bool = True) -> None:
        """FSDP: a rank with fewer micro-batches than the busiest one runs zero-weight
        forward (and backward) passes on a 2-token dummy, so every rank joins every
        all-gather and reduce-scatter; its gradient contribution is exactly zero."""
        if self.parallel != "fsdp":
            return
        dev = self.model.embed_tokens.weight.device
        n_max = dist_.all_reduce_(torch.tensor([n_mine], device=dev), "max", "micro-batch count")
        for _ in range(int(n_max) - n_mine):
            batch = make_packed_batch([[0, 0]], device=dev)
            targets = make_targets([[0, IGNORE_INDEX]], batch, dev)
            with torch.set_grad_enabled(backward):
                lp = self._logprobs(self.model, batch, targets)
            if self.lora and self.has_ref:  # LoRA's reference is the sharded model itself:
                self._ref_logprobs(batch, targets)  # its forward gathers too, as real ones do
            if backward:
                (lp.sum() * 0.0).backward()

    def _gather_into(self, dest: dict[str, torch.Tensor] | None) -> None:
        """Every parameter's whole value (named_full_parameters) copied into dest[name], which
        must name every parameter; dest None: this rank joins the gathers and keeps nothing.
        Under FSDP a collective (one all-gather per parameter): call it on every rank."""
        seen = set()
        with torch.no_grad():
            for name, t in self.named_full_parameters():
                if dest is not None:
                    dest[name].copy_(t)
                    seen.add(name)
        if dest is not None and seen != set(dest):
            raise RuntimeError(f"gathered weights: no value for {sorted(set(dest) - seen)[:4]}")

    def checkpoint_model(self) -> Transformer | None:
        """The model to write as a checkpoint, in the learner's own dtype: the model itself, or
        under FSDP one assembled in host memory on rank 0 from the gathered shards (None on
        the other ranks); a LoRA model itself (its adapters are whole on every rank). Under
        FSDP a collective: call it on every rank."""
        if self.parallel != "fsdp" or self.lora:
            return self.model
        whole = None  # every rank runs every gather; rank 0 keeps the tensors
        if dist_.is_main():
            whole = {n: torch.empty(p.shape, dtype=p.dtype, device="cpu")
                     for n, p in self.model.named_parameters()}
        self._gather_into(whole)
        if whole is None:
            return None
        with torch.device("meta"):
            out = Transformer(self.model.args)
        missing, unexpected = out.load_state_dict(whole, strict=False, assign=True)
        missing = [m for m in missing if m != "inv_freq"]  # a buffer, not in the shards
        if missing or unexpected:
            raise RuntimeError(f"gathered FSDP weights: missing {missing[:4]}, "
                               f"unexpected {unexpected[:4]}")
        return out

    def full_model(self) -> Transformer:
        """The model with whole weights for the rollout engine: the model itself, or under
        FSDP the replica (rollout dtype) refreshed from the shards, a collective: call it on
        every rank."""
        if self.parallel != "fsdp":
            return self.model
        if self._replica is None:
            with torch.device("meta"):
                rep = Transformer(self.model.args)
            # cast while on meta, so only the rollout-dtype tensors are ever allocated (the
            # rotary frequencies stay fp32); the values are gathered below
            rep = rep.to(self._replica_dtype).to_empty(device=dist_.device())
            if self.lora:  # the adapters' values come with the gather too
                lora.apply_lora(rep, self.model.lora_config, self._replica_dtype)
            rep.ops_backend = self.model.ops_backend
            self._replica = rep.requires_grad_(False)
        self._gather_into(dict(self._replica.named_parameters()))
        return self._replica

    def full_state(self) -> dict:
        """Under FSDP, the whole model and optimizer state gathered to rank 0 (CPU), in the
        1-rank format (optimizer state keyed by parameter index), as keyword arguments for
        rl.state.save_state; {} otherwise. Under FSDP a collective: call it on every rank."""
        if self.parallel != "fsdp" or self.lora:  # LoRA: its adapters and their AdamW state
            return {}  # are whole on every rank
        return fsdp.full_state(self.model, self.opt)

    def named_full_parameters(self):
        """(name, full tensor) of every parameter: the model's own under DDP or on one
        process; gathered from the shards under FSDP, a collective: every rank must iterate it
        to the end, in the same order (each parameter is one all-gather)."""
        if self.parallel == "fsdp":
            return fsdp.full_named_parameters(self.model)
        return self.model.named_parameters()

    def named_sync_parameters(self):
        """What a rollout engine needs after an update: with LoRA the adapters alone (the base
        never changes), else every parameter (named_full_parameters; a collective under
        FSDP)."""
        if self.lora:
            return lora.adapter_parameters(self.model)
        return self.named_full_parameters()

    def step(self, samples: list[Sample]) -> dict:
        """rl.epochs x rl.minibatches optimizer steps over `samples`; returns host-side
        statistics: the batch's (means over its updates; ratio_max the largest; the sampler
        comparison from the first update, before any moved the policy) and, with more than
        one update, "updates": one dict per optimizer step."""
        if not samples:
            raise ValueError("Learner.step needs at least one sample")
        t0 = time.perf_counter()
        self.model.train()
        plans = [self._plan(samples, idx) for idx in self._schedule(len(samples))]
        old, ref = self._old_logprobs(samples, plans) if len(plans) > 1 else (None, None)
        dev_stats = [self._update(plan, old, ref) for plan in plans]
        keys = list(dev_stats[0])
        table = torch.stack([torch.stack([st[k].double().reshape(()) for k in keys])
                             for st in dev_stats]).tolist()  # [updates, keys]: the one sync
        per_update = [dict(zip(keys, row)) for row in table]
        self.steps_done += 1
        secs = time.perf_counter() - t0
        out = _batch_stats(per_update)
        n_tokens = sum(u["train_tokens"] for u in per_update)
        out.update(train_tokens=n_tokens, train_seconds=secs, train_tokens_per_s=n_tokens / secs,
                   samples=len(samples), optimizer_steps=len(plans),
                   lr=self.opt.param_groups[0]["lr"])
        if old is not None:
            out["old_logprob_tokens"] = sum(len(samples[i].ids) for i in old)
        if len(per_update) > 1:
            out["updates"] = per_update
        return out

    def _schedule(self, n: int) -> list[list[int]]:
        """Indices of every update's minibatch: rl.epochs passes, each the batch shuffled
        (the same on every rank: seeded by the step) and cut into rl.minibatches near-equal
        parts; one update over everything when both are 1."""
        k = min(self.cfg.minibatches, n)
        if self.cfg.epochs == 1 and k == 1:
            return [list(range(n))]
        rng = random.Random(self.steps_done * 1_000_003 + 17)
        out = []
        for _ in range(self.cfg.epochs):
            order = list(range(n))
            if k > 1:
                rng.shuffle(order)
            out += [sorted(order[j::k]) for j in range(k)]
        return out

    def _old_logprobs(self, samples: list[Sample], plans):
        """The learner's log-probs [len(ids)] (position t predicts ids[t + 1]) of every sample
        this rank trains in any update, before the first: no grad, packed like training.
        -> (old {sample index: [len(ids)]}, the frozen reference's the same way or None): the
        reference never changes, so its forward runs once per batch, not once per update."""
        need = sorted({i for plan in plans for i in plan.idx})
        bins = pack_sequences([len(samples[i].ids) for i in need], self.cfg.micro_batch_tokens)
        self._pad_forwards(len(bins), backward=False)
        dev = self.model.embed_tokens.weight.device
        old, ref = {}, ({} if self.has_ref else None)
        with torch.no_grad():
            for b in bins:
                mb = [need[j] for j in b]
                batch = make_packed_batch([samples[i].ids for i in mb], device=dev)
                targets = make_targets([_per_token(samples[i])[0] for i in mb], batch, dev)
                lp = self._logprobs(self.model, batch, targets)  # [T]
                old.update(zip(mb, torch.split(lp, batch.seq_lens)))
                if ref is not None:
                    ref.update(zip(mb, torch.split(self._ref_logprobs(batch, targets),
                                                   batch.seq_lens)))
        return old, ref

    def _update(self, plan: "_StepPlan", old, ref) -> dict:
        """One optimizer step over plan's minibatch -> its statistics (device tensors)."""
        dev = self.model.embed_tokens.weight.device
        totals = {k: torch.zeros((), device=dev) for k in _TOTALS}
        totals["ratio_max"] = torch.zeros((), device=dev)
        self._pad_forwards(len(plan.bins))  # FSDP: every rank runs as many forwards
        n_tokens = 0
        for idx in tqdm(plan.bins, desc="train", unit="mb", leave=False,
                        disable=not self.progress):
            n_tokens += self._micro_batch(idx, plan, old, ref, totals)
        n_tokens, n_bins = self._reduce(totals, n_tokens, len(plan.bins))
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.cfg.max_grad_norm)
        totals["grad_norm"] = fsdp.full_tensor(grad_norm)  # FSDP: a DTensor
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        dev_t = lambda x: torch.tensor(float(x), device=dev)  # noqa: E731
        totals.update(train_tokens=dev_t(n_tokens), micro_batches=dev_t(n_bins),
                      samples=dev_t(plan.n_global), lr=dev_t(self.opt.param_groups[0]["lr"]))
        return totals

    def _plan(self, samples: list[Sample], idx: list[int]) -> "_StepPlan":
        """This rank's share of the minibatch samples[idx] (balanced by tokens over ranks),
        its micro-batches and the global counts the loss is normalised by."""
        n_counted = sum(samples[i].num_response_tokens for i in idx)
        n_global = len(idx)
        world = dist_.world_size()
        if world > 1:  # every rank holds the same global batch; each trains its token share
            share = balance_tokens([len(samples[i].ids) for i in idx], world)[dist_.rank()]
            idx = [idx[j] for j in share]
        bins = pack_sequences([len(samples[i].ids) for i in idx], self.cfg.micro_batch_tokens)
        return _StepPlan(samples, idx, [[idx[j] for j in b] for b in bins], n_counted, n_global)

    def _micro_batch(self, mb_idx: list[int], plan: "_StepPlan", old, ref,
                     totals: dict) -> int:
        """Forward, loss and backward of one packed micro-batch, weighted so the micro-batches
        add up to the whole minibatch's loss; its statistics added to `totals` (device
        tensors). old / ref: the log-probs before the first update (several updates), else
        None. Returns its token count."""
        mb = [plan.samples[i] for i in mb_idx]
        dev = self.model.embed_tokens.weight.device
        batch = make_packed_batch([s.ids for s in mb], device=dev)
        cols = [_per_token(s) for s in mb]
        targets = make_targets([c[0] for c in cols], batch, dev)
        adv = pack_per_token([c[1] for c in cols], batch).to(dev)  # [T]
        sampler_lp = pack_per_token([c[2] for c in cols], batch).to(dev)  # [T]
        mask = targets.all != IGNORE_INDEX  # [T]
        logp, entropy = self._logprobs(self.model, batch, targets, entropy=True)  # [T], [T]
        # one update per batch: the learner's old log-probs are its current ones (ratio 1)
        old_lp = logp.detach() if old is None else torch.cat([old[i] for i in mb_idx])  # [T]
        ref_lp = None
        if ref is not None:
            ref_lp = torch.cat([ref[i] for i in mb_idx])  # [T]
        elif self.has_ref:
            ref_lp = self._ref_logprobs(batch, targets)  # [T]
        loss, st, weight = self._loss(logp, old_lp, adv, mask, sampler_lp, ref_lp, batch,
                                      len(mb), plan)
        (loss * weight).backward()
        with torch.no_grad():
            n = max(plan.n_counted, 1)
            frac = sum(s.num_response_tokens for s in mb) / n  # host count
            totals["loss"] += loss.detach() * weight
            for k in ("clip_frac", "kl", "ratio_mean"):
                totals[k] += st[k] * frac
            totals["ratio_max"] = torch.maximum(totals["ratio_max"], st["ratio_max"])
            totals["entropy"] += (entropy * mask).sum() / n
            diff = (old_lp - sampler_lp).masked_fill(~mask, 0.0)  # [T]
            totals["abs_diff"] += diff.abs().sum() / n
            ratio = diff.exp()  # [T]
            outside = ((ratio < 0.8) | (ratio > 1.25)) & mask
            totals["mismatch"] += outside.float().sum() / n
        return batch.num_tokens

    def _loss(self, logp, old_lp, adv, mask, sampler_lp, ref_lp, batch, mb_n_seqs: int,
              plan: "_StepPlan"):
        """The algorithm's loss of one micro-batch -> (loss [], stats, weight): loss * weight
        summed over the micro-batches is the minibatch's loss."""
        algo, cfg = self.algo, self.cfg
        if algo.loss == "gspo":  # mean over the minibatch's sequences
            loss, st = gspo_loss(logp, old_lp, adv, mask, batch.cu_seqlens,
                                 clip_low=algo.clip_low, clip_high=algo.clip_high,
                                 sampler_logp=sampler_lp, tis_cap=cfg.tis_cap,
                                 weight_norm=float(max(plan.n_global, 1)))
            return loss, st, 1.0
        # Dr.GRPO's constant: max response tokens x sequences, whatever their lengths
        agg = microbatch_agg(algo.agg, global_n_tokens=plan.n_counted,
                             global_n_seqs=plan.n_global, mb_n_seqs=mb_n_seqs,
                             loss_norm=float(self.max_response_tokens * plan.n_global))
        if algo.loss == "sft":
            loss, st = sft_loss(logp, mask, agg=agg.agg, loss_norm=agg.loss_norm,
                                cu_seqlens=batch.cu_seqlens)
            return loss, st, agg.weight
        loss, st = ops.pg_loss(
            logp, old_lp, adv, mask, ref_logp=ref_lp, kl_coef=cfg.kl_coef,
            kl_estimator=cfg.kl_estimator, clip_low=algo.clip_low, clip_high=algo.clip_high,
            dual_clip=cfg.dual_clip or None, sampler_logp=sampler_lp, tis_cap=cfg.tis_cap,
            agg=agg.agg, loss_norm=agg.loss_norm, cu_seqlens=batch.cu_seqlens,
            backend=self.model.ops_backend)
        return loss, st, agg.weight

    def _reduce(self, totals: dict, n_tokens: int, n_bins: int) -> tuple[int, int]:
        """Under torchrun: DDP sums the ranks' gradients (one flat bucket; FSDP2
        reduce-scattered them in the backward) and the statistics are reduced over ranks (in
        place in `totals`). Returns the global (tokens, micro-batches)."""
        if dist_.world_size() == 1:
            return n_tokens, n_bins
        if self.parallel == "ddp" or self.lora:  # FSDP leaves LoRA's replicated adapters
            dist_.all_reduce_grads(self.trainable)
        dev = self.model.embed_tokens.weight.device
        red = torch.stack([*(totals[k] for k in _TOTALS),
                           torch.tensor(float(n_tokens), device=dev),
                           torch.tensor(float(n_bins), device=dev)]).double()
        dist_.all_reduce_(red, "sum", "step statistics")
        dist_.all_reduce_(totals["ratio_max"], "max", "step statistics")
        for k, v in zip(_TOTALS, red[:len(_TOTALS)]):
            totals[k] = v
        return int(red[-2]), int(red[-1])


# step statistics summed over micro-batches (and ranks); ratio_max is a max
_TOTALS = ("loss", "clip_frac", "kl", "ratio_mean", "entropy", "abs_diff", "mismatch")


def _batch_stats(per_update: list[dict]) -> dict:
    """A batch's statistics from its updates': means (ratio_max: the largest; micro_batches:
    the sum); the sampler comparison is the first update's, made before any update."""
    n = len(per_update)
    out = {k: sum(u[k] for u in per_update) / n
           for k in ("loss", "clip_frac", "kl", "ratio_mean", "entropy", "grad_norm")}
    out["ratio_max"] = max(u["ratio_max"] for u in per_update)
    out["micro_batches"] = int(sum(u["micro_batches"] for u in per_update))
    out["sampler_logprob_abs_diff"] = per_update[0]["abs_diff"]
    out["sampler_ratio_outside"] = per_update[0]["mismatch"]
    return out


@dataclass
class _StepPlan:
    samples: list[Sample]  # the whole batch
    idx: list[int]  # this rank's share of the minibatch: indices into samples
    bins: list[list[int]]  # micro-batches: indices into samples
    n_counted: int  # response tokens of the whole (global) minibatch
    n_global: int  # sequences of the whole minibatch
