"""Held-out evaluation: greedy (or sampled) answers, scored, with a 95% confidence interval."""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tao_fast.data.prompts import PromptRecord, encode_prompt
from tao_fast.fileio import atomic_write_text
from tao_fast.rollout import SamplingParams


def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k / n (sensible at 0% and 100%)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, mid - half), min(1.0, mid + half)


@dataclass
class EvalResult:
    n: int  # prompts
    mean_score: float
    accuracy: float  # share of responses scoring >= 1 (correct, for a verifier)
    ci_low: float
    ci_high: float
    mean_response_tokens: float  # inference cost: output tokens per response
    seconds: float
    records: list[dict] = field(default_factory=list)
    mode: str = "greedy"  # greedy | sampled (pass@1 at `temperature`) | best_of_n
    samples: int = 1  # responses per prompt
    temperature: float = 0.0

    def summary(self) -> str:
        how = {"greedy": "greedy", "sampled": f"pass@1 at T={self.temperature:g}",
               "best_of_n": f"best-of-{self.samples} at T={self.temperature:g}"}[self.mode]
        return (f"{how}: {100 * self.accuracy:.1f}% correct (95% CI {100 * self.ci_low:.1f}-"
                f"{100 * self.ci_high:.1f}%, n={self.n}), mean score {self.mean_score:.3f}, "
                f"{self.mean_response_tokens:.1f} tokens/response")

    def save(self, path) -> None:
        atomic_write_text(path, json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path) -> "EvalResult":
        return cls(**json.loads(Path(path).read_text()))


def _as_records(prompts) -> list[PromptRecord]:
    return [p if isinstance(p, PromptRecord) else
            PromptRecord(messages=[{"role": "user", "content": p}]) for p in prompts]


def evaluate(model, prompts, scorer, *, tokenizer=None, engine=None, max_tokens: int = 64,
             temperature: float = 0.0, samples: int = 1, select=None, strategy: str = "plain",
             system_prompt: str = "", progress: bool = False, seed: int = 0) -> EvalResult:
    """Answer every prompt and score the answers.

    model: a tao_fast Transformer (with `tokenizer`), or a model spec/path for `load_model`
    (embedded name, HF safetensors dir, GGUF); prompts: PromptRecords or strings; scorer: a
    Scorer or a spec such as "arithmetic". temperature 0 = greedy (one answer per prompt).
    samples > 1 at temperature > 0: pass@1 is the mean over every sample; with `select` (a
    Scorer or spec), best-of-N: the sample `select` scores highest is the one `scorer` judges
    (inference-time compute instead of tuning, TAO's reference line).
    The 95% CI is Wilson's over prompts (samples of one prompt are not independent).
    """
    from tao_fast.rl import distributed as dist_
    from tao_fast.rl.rollout_shards import generate_and_score
    from tao_fast.rollout.torch_engine import TorchEngine
    from tao_fast.scoring import build_scorer

    t0 = time.perf_counter()
    if isinstance(model, (str, Path)):
        from tao_fast.models import load_model

        model, tokenizer, _ = load_model(str(model))
    if isinstance(scorer, (str, dict)):
        scorer = build_scorer(scorer)
    if isinstance(select, (str, dict)):
        select = build_scorer(select)
    if temperature == 0 and samples > 1:
        raise ValueError("samples > 1 needs temperature > 0 (greedy answers are all equal)")
    if engine is None:
        if tokenizer is None:
            raise ValueError("evaluate() needs the tokenizer that goes with the model")
        engine = TorchEngine(model, tokenizer)
    tokenizer = tokenizer or engine.tokenizer
    recs = _as_records(prompts)
    if not recs:
        raise ValueError("evaluate() needs at least one prompt")
    ids = [encode_prompt(r, tokenizer, strategy, system_prompt) for r in recs]
    sampling = SamplingParams(n=samples, temperature=temperature, max_tokens=max_tokens,
                              seed=seed)
    if select is None and dist_.active():  # under torchrun: each engine answers and scores
        # a slice, and every rank gets the whole result (as a training step's rollouts)
        ro, res, _, _ = generate_and_score(engine, scorer, ids, recs, sampling, progress)
        texts, lens = ro.texts, [[len(t) for t in g] for g in ro.token_ids]  # [P][N]
    else:
        ro = engine.generate(ids, sampling, progress=progress)
        texts, lens = ro.texts, [[len(t) for t in g] for g in ro.token_ids]  # [P][N]
        if select is not None and samples > 1:  # best-of-N: keep the selector's favourite
            sel = select.score(recs, texts).rewards
            best = [max(range(len(g)), key=lambda c, g=g: g[c]) for g in sel]
            texts = [[g[b]] for g, b in zip(texts, best)]
            lens = [[g[b]] for g, b in zip(lens, best)]
        res = scorer.score(recs, texts)
    per_prompt = [sum(r) / len(r) for r in res.rewards]
    acc_pp = [sum(x >= 1.0 for x in r) / len(r) for r in res.rewards]
    accuracy = sum(acc_pp) / len(acc_pp)
    lo, hi = wilson_interval(round(accuracy * len(recs)), len(recs))
    records = [{"prompt": r.text, "response": t[0], "score": s[0],
                **({"samples": len(t), "accuracy": a} if len(t) > 1 else {}),
                **(res.details[i][0] if res.details else {})}
               for i, (r, t, s, a) in enumerate(zip(recs, texts, res.rewards, acc_pp))]
    n_resp = sum(map(len, lens))
    mode = "greedy" if temperature == 0 else "best_of_n" if select is not None and samples > 1 \
        else "sampled"
    return EvalResult(n=len(recs), mean_score=sum(per_prompt) / len(per_prompt),
                      accuracy=accuracy, ci_low=lo, ci_high=hi,
                      mean_response_tokens=sum(map(sum, lens)) / n_resp,
                      seconds=time.perf_counter() - t0, records=records, mode=mode,
                      samples=samples, temperature=temperature)
