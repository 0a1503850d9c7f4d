"""A mix of training sources (data.train as a list): each round's pool, source by source, and
each step's prompts drawn to the sources' weights.

A round's pool is the sources' pools one after the other (each planned as a lone source is,
tao_fast/data/rounds.py: its new files plus a replayed share; a builtin task whole); the
manifest line of the round adds `mix`, one entry per source with its weight, task and how many
of the pool's prompts are its (n_prompts, n_new, n_replay): the prompt ids are in that order,
so a resumed run rebuilds every source's part.

The order a round's prompts are drawn in (`mix_order`) gives each step the sources' shares
of rl.prompts_per_step to within one prompt: every draw goes to the source furthest below its
share so far (a weighted round-robin, no randomness in the shares), and within a source the
prompts come in a shuffled order, reshuffled when used up. A lone source's order is one
shuffle of its pool, as before mixes existed.
"""
from __future__ import annotations

import random

from tao_fast.config import DataConfig, ResumeError
from tao_fast.data.prompts import PromptRecord
from tao_fast.data.rounds import RoundPlan, plan_round, pool_from_manifest
from tao_fast.data.sources import SourcePrompts, tag


def plan_mix(rnd: int, sources: list[SourcePrompts], manifest: list[dict], data: DataConfig,
             seed: int) -> tuple[RoundPlan, list[int]]:
    """Round `rnd`'s plan over every source (pools concatenated in data.train's order, the
    manifest line's `mix` filled) and each source's number of prompts in the pool."""
    plans = []
    for i, s in enumerate(sources):  # source i > 0 replays with its own seed
        plan = plan_round(rnd, s.spec.source, manifest, data.replay_frac, seed + 7 * i,
                          s.builtin)
        tag(plan.prompts, s.task, data.task_field)
        plans.append(plan)
    mix = [{"source": s.spec.source, "weight": s.spec.weight, "task": s.task,
            "n_prompts": len(p.prompts), "n_new": p.n_new, "n_replay": p.n_replay}
           for s, p in zip(sources, plans)]
    whole = RoundPlan(rnd, [r for p in plans for r in p.prompts],
                      [f for p in plans for f in p.new_files], sum(p.n_new for p in plans),
                      sum(p.n_replay for p in plans), mix)
    return whole, [len(p.prompts) for p in plans]


def pool_of_mix(line: dict, sources: list[SourcePrompts],
                data: DataConfig) -> tuple[list[PromptRecord], list[int]]:
    """A round's pool rebuilt from its manifest line (for --resume), source by source, and
    each source's number of prompts in it; a ResumeError when data.train's sources are not
    the ones the line records."""
    mix = line.get("mix") or [{"source": sources[0].spec.source,
                               "n_prompts": len(line["prompt_ids"])}]  # a line before mixes
    if [m["source"] for m in mix] != [s.spec.source for s in sources]:
        raise ResumeError(f"resume: round {line['round']} drew from "
                          f"{[m['source'] for m in mix]}, data.train now names "
                          f"{[s.spec.source for s in sources]}: start a new run")
    pool, start = [], 0
    for m, s in zip(mix, sources):
        part = {**line, "prompt_ids": line["prompt_ids"][start:start + m["n_prompts"]]}
        pool += tag(pool_from_manifest(part, s.spec.source, s.builtin), s.task,
                    data.task_field)
        start += m["n_prompts"]
    return pool, [m["n_prompts"] for m in mix]


def mix_order(sizes: list[int], weights: list[float], length: int,
              rng: random.Random) -> list[int]:
    """`length` indices into a pool made of sources of `sizes` (one after the other), drawn to
    `weights`: any first k draws hold source i within one of k * w_i / sum(w) (a source with
    no prompts gets none). A lone source: one shuffle of range(size), the order of a run
    without a mix."""
    live = [i for i, n in enumerate(sizes) if n]
    if len(live) == 1:
        (i,) = live
        fresh = list(range(sizes[i]))
        rng.shuffle(fresh)
        off = sum(sizes[:i])
        return [off + j for j in fresh]
    total = sum(weights[i] for i in live)
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    queues: dict[int, list[int]] = {i: [] for i in live}
    credit = {i: 0.0 for i in live}
    out = []
    for _ in range(length):
        for i in live:
            credit[i] += weights[i] / total
        pick = max(live, key=lambda i: credit[i])  # ties: the first source
        credit[pick] -= 1.0
        if not queues[pick]:
            queues[pick] = list(range(sizes[pick]))
            rng.shuffle(queues[pick])
        out.append(offsets[pick] + queues[pick].pop())
    return out
