"""Held-out evaluation: greedy (or sampled) answers, scored, with a 95% confidence interval."""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tao_fast.config import TaoConfig
from tao_fast.data.prompts import PromptRecord, encode_prompt, read_fewshot
from tao_fast.fileio import atomic_write_text
from tao_fast.rollout import SamplingParams, check_records_fit


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
    # per task (data.task_field; records without it under NO_TASK), where any record has one:
    # {task: {n, accuracy, ci_low, ci_high, mean_score, mean_response_tokens}}
    by_task: dict = field(default_factory=dict)

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


def sampling_for(cfg: TaoConfig, sampled: bool) -> SamplingParams:
    """Greedy: one answer per prompt; sampled: eval.samples answers at rollout.temperature
    (pass@1, or best-of-N with a selector). Both answer within eval.max_tokens, seeded by
    run.seed."""
    if not sampled:
        return SamplingParams(n=1, temperature=0.0, max_tokens=cfg.eval.max_tokens,
                              seed=cfg.run.seed)
    if cfg.rollout.temperature == 0:
        raise ValueError("sampled evaluation needs rollout.temperature > 0 (greedy answers are "
                         "all equal)")
    if cfg.eval.samples < 1:
        raise ValueError("sampled evaluation needs eval.samples >= 1")
    return SamplingParams(n=cfg.eval.samples, temperature=cfg.rollout.temperature,
                          max_tokens=cfg.eval.max_tokens, seed=cfg.run.seed)


def evaluate(model, prompts, scorer, cfg: TaoConfig | None = None, *, sampled: bool = False,
             select=None, engine=None, tokenizer=None, progress: bool = False) -> EvalResult:
    """Answer every prompt and score the answers, as the run's config says.

    model: a tao_fast Transformer (with `tokenizer`), or a model spec/path for `load_model`
    (embedded name, HF safetensors dir, GGUF); prompts: PromptRecords or strings; scorer: a
    Scorer or a spec such as "arithmetic"; cfg: the run's TaoConfig (default: TaoConfig()):
    eval.max_tokens, data.system_prompt, run.seed and the prompt the tuned model is asked
    with (rollout.prompt_strategy: plain with rollout.train_prompt=plain, else
    rollout.strategy) apply, and with sampled=True eval.samples answers per prompt at
    rollout.temperature: pass@1 is the mean over every sample; with `select` (a Scorer or
    spec), best-of-N: the sample `select` scores highest is the one `scorer` judges
    (inference-time compute instead of tuning, TAO's reference line). Otherwise one greedy
    answer per prompt.
    The 95% CI is Wilson's over prompts (samples of one prompt are not independent).
    """
    from tao_fast.rollout.torch_engine import TorchEngine
    from tao_fast.scoring import build_scorer

    t0 = time.perf_counter()
    cfg = cfg or TaoConfig()
    sampling = sampling_for(cfg, sampled)
    if isinstance(model, (str, Path)):
        from tao_fast.models import load_model

        model, tokenizer, _ = load_model(str(model))
    if isinstance(scorer, (str, dict)):
        scorer = build_scorer(scorer)
    if isinstance(select, (str, dict)):
        select = build_scorer(select)
    if engine is None:
        if tokenizer is None:
            raise ValueError("evaluate() needs the tokenizer that goes with the model")
        engine = TorchEngine(model, tokenizer)
    tokenizer = tokenizer or engine.tokenizer
    recs = _as_records(prompts)
    if not recs:
        raise ValueError("evaluate() needs at least one prompt")
    fewshot = read_fewshot(cfg.rollout.fewshot_file)
    ids = [encode_prompt(r, tokenizer, cfg.rollout.prompt_strategy, cfg.data.system_prompt,
                         fewshot) for r in recs]
    check_records_fit(recs, ids, sampling.max_tokens, engine.max_context, "eval.max_tokens")
    texts, lens, res = _answer_and_score(engine, scorer, select, recs, ids, sampling, progress)
    mode = "greedy" if not sampled else "best_of_n" if select is not None and sampling.n > 1 \
        else "sampled"
    return _result(recs, texts, lens, res, mode, sampling, time.perf_counter() - t0,
                   cfg.data.task_field)


def _answer_and_score(engine, scorer, select, recs, ids, sampling, progress):
    """(texts [P][k], response lengths [P][k], scores): k = sampling.n, or 1 after best-of-N."""
    from tao_fast.rl import distributed as dist_
    from tao_fast.rl.rollout_shards import generate_and_score

    if select is None and dist_.active():  # under torchrun: each engine answers and scores
        # a slice, and every rank gets the whole result (as a training step's rollouts)
        ro, res, _, _ = generate_and_score(engine, scorer, ids, recs, sampling, progress)
        return ro.texts, [[len(t) for t in g] for g in ro.token_ids], res
    ro = engine.generate(ids, sampling, progress=progress)
    texts, lens = ro.texts, [[len(t) for t in g] for g in ro.token_ids]  # [P][N]
    if select is not None and sampling.n > 1:  # best-of-N: keep the selector's favourite
        sel = select.score(recs, texts).rewards
        best = [max(range(len(g)), key=lambda c, g=g: g[c]) for g in sel]
        texts = [[g[b]] for g, b in zip(texts, best)]
        lens = [[g[b]] for g, b in zip(lens, best)]
    return texts, lens, scorer.score(recs, texts)


NO_TASK = "(no task)"


def _figures(acc_pp, score_pp, lens) -> dict:
    """n, accuracy (Wilson 95% CI over prompts), mean score and tokens per response of some
    prompts: per-prompt accuracies and scores [P], response lengths [P][k]."""
    n, accuracy = len(acc_pp), sum(acc_pp) / len(acc_pp)
    lo, hi = wilson_interval(round(accuracy * n), n)
    return {"n": n, "accuracy": accuracy, "ci_low": lo, "ci_high": hi,
            "mean_score": sum(score_pp) / n,
            "mean_response_tokens": sum(map(sum, lens)) / sum(map(len, lens))}


def by_task(recs, acc_pp, score_pp, lens, task_field: str) -> dict:
    """_figures per task (the records' task_field; NO_TASK for those without), or {} when no
    record names a task."""
    tasks = [r.meta.get(task_field) for r in recs]
    if all(t is None for t in tasks):
        return {}
    keys = [NO_TASK if t is None else str(t) for t in tasks]
    out = {}
    for key in sorted(set(keys)):
        idx = [i for i, k in enumerate(keys) if k == key]
        out[key] = _figures([acc_pp[i] for i in idx], [score_pp[i] for i in idx],
                            [lens[i] for i in idx])
    return out


def _result(recs, texts, lens, res, mode, sampling, seconds, task_field: str) -> EvalResult:
    per_prompt = [sum(r) / len(r) for r in res.rewards]  # [P]
    acc_pp = [sum(x >= 1.0 for x in r) / len(r) for r in res.rewards]  # [P]
    records = [{"prompt": r.text, "response": t[0], "score": s[0],
                **({"samples": len(t), "accuracy": a} if len(t) > 1 else {}),
                **(res.details[i][0] if res.details else {})}
               for i, (r, t, s, a) in enumerate(zip(recs, texts, res.rewards, acc_pp))]
    return EvalResult(**_figures(acc_pp, per_prompt, lens), seconds=seconds, records=records,
                      mode=mode, samples=sampling.n, temperature=sampling.temperature,
                      by_task=by_task(recs, acc_pp, per_prompt, lens, task_field))
