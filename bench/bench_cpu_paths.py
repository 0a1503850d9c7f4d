"""CPU micro-benchmarks of the paths a CPU user waits on (pytest-benchmark), small shapes.

    pytest bench/bench_cpu_paths.py --benchmark-only

  - generation: TorchEngine.generate on a tiny random decoder (prefill + decode with the KV
    cache, sampling at temperature 1); tokens/s counts generated tokens.
  - learner step: one Learner.step (packed forward, linear log-prob, pg loss, backward,
    AdamW) on the same tiny decoder, ops backend "torch"; tokens/s counts every packed token.
  - scorers: rules (regex, numeric, JSON schema), the arithmetic verifier, consensus vote and
    a gated mix on 1,000 candidates (125 prompts x 8); candidates/s.
  - packing: pack_sequences of 10,000 lengths (RL-like: 50-2,000 tokens) into 16k-token
    micro-batches.
Shapes are tiny (the file takes about a minute on 2 loaded cores): the figures catch
regressions in the host-side code (Python overhead, batching, packing), not model speed.
"""
from __future__ import annotations

import json
import random

import pytest
import torch

from tao_fast.config import RLConfig
from tao_fast.data.prompts import PromptRecord
from tao_fast.models.config import ModelArgs
from tao_fast.models.llama import Transformer
from tao_fast.rl.packing import pack_sequences
from tao_fast.rl.trainer import Learner, Sample
from tao_fast.rollout import SamplingParams
from tao_fast.rollout.torch_engine import TorchEngine
from tao_fast.scoring import build_scorer

pytest.importorskip("pytest_benchmark")

TINY = dict(vocab_size=2048, hidden_size=128, intermediate_size=384, num_layers=2, num_heads=4,
            num_kv_heads=2)


def tiny_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(**TINY)).float()
    model.ops_backend = "torch"
    return model


class _NoEosTokenizer:
    """TorchEngine reads only eos_token_id and decode(): no EOS, so every row runs to
    max_tokens and the token count per call is fixed."""
    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def _median_s(benchmark) -> float:
    """Median seconds of the benchmark's rounds (NaN under --benchmark-disable)."""
    stats = getattr(benchmark, "stats", None)
    return stats.stats.median if stats is not None else float("nan")


def _shape_info(benchmark, **kw):
    benchmark.extra_info.update({**{f"model_{k}": v for k, v in TINY.items()}, **kw})


# ----------------------------------------------------------------------------- generation

# (prompts, candidates per prompt): a few rows, and a 64-row batch like a small TAO round.
GEN_SHAPES = [(4, 2), (8, 8)]


@pytest.mark.parametrize("P,n", GEN_SHAPES, ids=[f"{p}x{n}" for p, n in GEN_SHAPES])
def test_torch_engine_generate(benchmark, P, n):
    prompt_len, max_tokens = 32, 32
    model = tiny_model()
    engine = TorchEngine(model, _NoEosTokenizer())
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, TINY["vocab_size"], (prompt_len,), generator=g).tolist()
               for _ in range(P)]
    sp = SamplingParams(n=n, temperature=1.0, max_tokens=max_tokens, seed=0)
    out = benchmark.pedantic(engine.generate, args=(prompts, sp), rounds=5, warmup_rounds=1)
    tokens = out.num_tokens
    assert tokens == P * n * max_tokens
    secs = _median_s(benchmark)
    _shape_info(benchmark, prompts=P, n=n, rows=P * n, prompt_len=prompt_len,
                max_tokens=max_tokens, generated_tokens=tokens,
                tokens_per_s=round(tokens / secs, 1),
                ms_per_decode_step=round(1e3 * secs / max_tokens, 3))


# ----------------------------------------------------------------------------- learner step

def _samples(n_seqs, prompt_len, resp_len, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n_seqs):
        r = resp_len - (i % 4) * (resp_len // 8)  # a few different lengths, as in real groups
        ids = torch.randint(0, vocab, (prompt_len + r,), generator=g).tolist()
        lps = (-torch.rand(r, generator=g) * 3).tolist()
        out.append(Sample(ids, prompt_len, float(torch.randn(1, generator=g)), lps))
    return out


@pytest.mark.parametrize("mb_tokens", [512, 2048])
def test_learner_step(benchmark, mb_tokens):
    model = tiny_model()
    learner = Learner(model, RLConfig(lr=1e-5, micro_batch_tokens=mb_tokens), temperature=1.0,
                      ops_backend="torch")
    samples = _samples(16, 32, 64, TINY["vocab_size"])
    tokens = sum(len(s.ids) for s in samples)
    stats = benchmark.pedantic(learner.step, args=(samples,), rounds=5, warmup_rounds=1)
    assert stats["train_tokens"] == tokens and all(
        torch.isfinite(p).all() for p in model.parameters())
    secs = _median_s(benchmark)
    _shape_info(benchmark, seqs=len(samples), tokens=tokens,
                response_tokens=sum(s.num_response_tokens for s in samples),
                micro_batch_tokens=mb_tokens, micro_batches=stats["micro_batches"],
                tokens_per_s=round(tokens / secs, 1))


# ----------------------------------------------------------------------------- scorers

N_PROMPTS, N_CANDS = 125, 8
SCHEMA = {"type": "object", "required": ["answer", "steps"],
          "properties": {"answer": {"type": "integer"},
                         "steps": {"type": "array", "items": {"type": "string"}}}}
SCORERS = {
    "regex": {"type": "regex", "pattern": r"answer is (-?\d+)", "answer_field": "answer"},
    "numeric": {"type": "numeric", "answer_field": "answer"},
    "arithmetic": {"type": "arithmetic"},
    "json_schema": {"type": "json_schema", "schema": SCHEMA},
    "consensus": {"type": "consensus", "extract": "last_number"},
    "mix(gate json + consensus)": {"type": "mix", "parts": [
        {"scorer": {"type": "json", "require_type": "object"}, "gate": True},
        {"scorer": {"type": "consensus", "extract": "json:answer"}}]},
}


def _scoring_batch(json_candidates: bool, seed: int = 0):
    """125 arithmetic prompts x 8 candidates: half right, the rest off by a little, some
    without an answer; JSON candidates for the JSON scorers (a few malformed)."""
    rng = random.Random(seed)
    prompts, cands = [], []
    for _ in range(N_PROMPTS):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        prompts.append(PromptRecord([{"role": "user", "content": f"What is {a} + {b}?"}],
                                    {"answer": a + b}))
        group = []
        for j in range(N_CANDS):
            ans = a + b if rng.random() < 0.5 else a + b + rng.choice([-10, -1, 1, 2])
            if json_candidates:
                text = json.dumps({"answer": ans, "steps": [f"{a} + {b}", f"= {ans}"]})
                if j == 7:
                    text = text[:-2]  # malformed
                group.append(f"Here it is:\n```json\n{text}\n```" if j % 2 else text)
            elif j == 7:
                group.append("I am not sure how to add these numbers.")
            else:
                group.append(f"First {a} + {b}: {a} plus {b - b % 10} is {a + b - b % 10}, "
                             f"then add {b % 10}. So the answer is {ans}.")
        cands.append(group)
    return prompts, cands


@pytest.mark.parametrize("name", list(SCORERS))
def test_scorer_throughput(benchmark, name):
    scorer = build_scorer(SCORERS[name])
    prompts, cands = _scoring_batch(json_candidates=name.startswith(("json", "mix")))
    res = benchmark.pedantic(scorer.score, args=(prompts, cands), rounds=5, warmup_rounds=1)
    assert len(res.rewards) == N_PROMPTS and res.num_failures == 0
    rewards = [r for g in res.rewards for r in g]
    assert 0 < sum(rewards) < len(rewards)  # some right, some wrong: the scorer really ran
    n = N_PROMPTS * N_CANDS
    benchmark.extra_info.update(scorer=name, prompts=N_PROMPTS, candidates=n,
                                candidates_per_s=round(n / _median_s(benchmark), 1),
                                mean_reward=round(sum(rewards) / n, 4))


# ----------------------------------------------------------------------------- packing

@pytest.mark.parametrize("budget", [16384])
def test_pack_sequences(benchmark, budget):
    n = 10_000
    rng = random.Random(0)
    lengths = [rng.randint(10, 500) + rng.randint(50, 1500) for _ in range(n)]  # prompt + resp
    bins = benchmark.pedantic(pack_sequences, args=(lengths, budget), rounds=3, iterations=1)
    assert sorted(i for b in bins for i in b) == list(range(n))
    loads = [sum(lengths[i] for i in b) for b in bins]
    benchmark.extra_info.update(
        sequences=n, tokens=sum(lengths), token_budget=budget, micro_batches=len(bins),
        lower_bound=-(-sum(lengths) // budget), fill=round(sum(lengths) / (len(bins) * budget), 4),
        max_load=max(loads), min_load=min(loads),
        sequences_per_s=round(n / _median_s(benchmark), 1))
