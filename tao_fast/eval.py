"""Held-out evaluation: greedy (or sampled) answers, scored, with a 95% confidence interval."""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tao_fast.data.prompts import PromptRecord, encode_prompt
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
    n: int
    mean_score: float
    accuracy: float  # share of responses scoring >= 1 (correct, for a verifier)
    ci_low: float
    ci_high: float
    mean_response_tokens: float
    seconds: float
    records: list[dict] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{100 * self.accuracy:.1f}% correct (95% CI {100 * self.ci_low:.1f}-"
                f"{100 * self.ci_high:.1f}%, n={self.n}), mean score {self.mean_score:.3f}, "
                f"{self.mean_response_tokens:.1f} tokens/response")

    def save(self, path) -> None:
        from tao_fast.checkpoint import atomic_write_text

        atomic_write_text(path, json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path) -> "EvalResult":
        return cls(**json.loads(Path(path).read_text()))


def _as_records(prompts) -> list[PromptRecord]:
    return [p if isinstance(p, PromptRecord) else
            PromptRecord(messages=[{"role": "user", "content": p}]) for p in prompts]


def evaluate(model, prompts, scorer, *, tokenizer=None, engine=None, max_tokens: int = 64,
             temperature: float = 0.0, strategy: str = "plain", system_prompt: str = "",
             progress: bool = False, seed: int = 0) -> EvalResult:
    """Answer every prompt once and score it.

    model: a tao_fast Transformer (with `tokenizer`), or a model spec/path for `load_model`
    (embedded name, HF safetensors dir, GGUF); prompts: PromptRecords or strings; scorer: a
    Scorer or a spec such as "arithmetic". temperature 0 = greedy.
    """
    from tao_fast.rollout.torch_engine import TorchEngine
    from tao_fast.scoring import build_scorer

    t0 = time.perf_counter()
    if isinstance(model, (str, Path)):
        from tao_fast.models import load_model

        model, tokenizer, _ = load_model(str(model))
    if isinstance(scorer, str):
        scorer = build_scorer(scorer)
    if engine is None:
        if tokenizer is None:
            raise ValueError("evaluate() needs the tokenizer that goes with the model")
        engine = TorchEngine(model, tokenizer)
    tokenizer = tokenizer or engine.tokenizer
    recs = _as_records(prompts)
    if not recs:
        raise ValueError("evaluate() needs at least one prompt")
    ids = [encode_prompt(r, tokenizer, strategy, system_prompt) for r in recs]
    ro = engine.generate(ids, SamplingParams(n=1, temperature=temperature, max_tokens=max_tokens,
                                             seed=seed), progress=progress)
    texts = [[g[0]] for g in ro.texts]
    res = scorer.score(recs, texts)
    scores = [r[0] for r in res.rewards]
    correct = sum(s >= 1.0 for s in scores)
    lo, hi = wilson_interval(correct, len(scores))
    records = [{"prompt": r.text, "response": t[0], "score": s,
                **(res.details[i][0] if res.details else {})}
               for i, (r, t, s) in enumerate(zip(recs, texts, scores))]
    return EvalResult(n=len(scores), mean_score=sum(scores) / len(scores),
                      accuracy=correct / len(scores), ci_low=lo, ci_high=hi,
                      mean_response_tokens=sum(len(g[0]) for g in ro.token_ids) / len(scores),
                      seconds=time.perf_counter() - t0, records=records)
