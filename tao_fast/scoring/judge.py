"""LLM judge over any Engine: pointwise rubric scores, or a ranking of the group's candidates.

    pointwise  one call per candidate; the judge writes a 1-10 score (parsed robustly: "Score: 7",
               "7/10", "**8**", "8 out of 10", "I'd rate it 6"), mapped to (s - 1) / 9 in [0, 1]
    listwise   one call per group; the judge ranks the numbered candidates ("Ranking: 2 > 1 > 3");
               reward 1 for the best down to 0 for the worst, unranked ones share the bottom
    pairwise   one call per pair (both orders by default, against position bias); reward = the
               candidate's share of wins

Every judge call of a batch goes to the engine in one `generate` (greedy). The judge is the
policy being tuned (model="policy", no extra memory: self-judging), or any model spec that
`tao_fast.models.load_model` reads (embedded name, HF safetensors dir, GGUF). In Python, pass
`engine=` and `tokenizer=` directly. A reply that cannot be parsed is a failure of that
candidate (failure value, counted), not a zero.
"""
from __future__ import annotations

import re
from pathlib import Path

from tao_fast.data.prompts import PromptRecord
from tao_fast.scoring.base import ScoreResult, Scorer

TEMPLATES = {
    "pointwise": (
        "You are a strict grader. Rubric: {rubric}\n\nRequest:\n{prompt}\n\n"
        "Response:\n{response}\n\nGrade the response from 1 (useless) to 10 (perfect). "
        "Reply with one line: Score: <1-10>"),
    "listwise": (
        "You are a strict grader. Rubric: {rubric}\n\nRequest:\n{prompt}\n\n{responses}\n\n"
        "Rank all responses from best to worst. Reply with one line: Ranking: <best> > ... > "
        "<worst>, using the response numbers."),
    "pairwise": (
        "You are a strict grader. Rubric: {rubric}\n\nRequest:\n{prompt}\n\n"
        "Response A:\n{response_a}\n\nResponse B:\n{response_b}\n\n"
        "Which response is better? Reply with one line: Better: A or Better: B"),
}
DEFAULT_RUBRIC = "correct, complete, concise, and follows the request's instructions"

_SCORE_PATTERNS = [re.compile(p, re.I) for p in (
    r"score\s*(?:of|is|:|=)?\s*\**\s*(\d+(?:\.\d+)?)",
    r"(\d+(?:\.\d+)?)\s*(?:/|out\s+of)\s*10\b",
    r"(?:rating|grade|rate\s+(?:it|this)(?:\s+a)?)\s*(?:of|is|:|=)?\s*\**\s*(\d+(?:\.\d+)?)",
    r"\*\*\s*(\d+(?:\.\d+)?)\s*\*\*",
)]


def parse_score(reply: str, lo: float = 1, hi: float = 10) -> float | None:
    """The judge's 1-10 score, or None; patterns in order of how explicit they are, and a bare
    number only when it is the reply's one number."""
    for rx in _SCORE_PATTERNS:
        for m in rx.finditer(reply):
            v = float(m.group(1))
            if lo <= v <= hi:
                return v
    nums = re.findall(r"(?<![\d.])\d+(?:\.\d+)?(?![\d.])", reply)
    if len(nums) == 1 and lo <= float(nums[0]) <= hi:
        return float(nums[0])
    return None


def parse_ranking(reply: str, n: int) -> list[int] | None:
    """0-based candidate order, best first, from 'Ranking: 2 > 1 > 3' (or '[2], [1], [3]');
    numbers out of range and repeats are ignored; None when nothing usable is there."""
    m = re.search(r"ranking\s*[:=]\s*(.+)", reply, re.I)
    text = m.group(1) if m else reply
    order: list[int] = []
    for tok in re.findall(r"\d+", text):
        i = int(tok) - 1
        if 0 <= i < n and i not in order:
            order.append(i)
    return order or None


def parse_choice(reply: str) -> str | None:
    """'A' or 'B' from 'Better: A' / 'Response B is better' / a bare letter."""
    m = re.search(r"better\s*[:=]?\s*(?:response\s*)?\**([AB])\b", reply, re.I) \
        or re.search(r"response\s*\**([AB])\**\s+is\s+better", reply, re.I) \
        or re.fullmatch(r"\W*([AB])\W*", reply.strip(), re.I)
    return m.group(1).upper() if m else None


class JudgeScorer(Scorer):
    def __init__(self, mode: str = "pointwise", model: str = "policy", template: str = "",
                 rubric: str = DEFAULT_RUBRIC, max_tokens: int = 24, both_orders: bool = True,
                 max_response_chars: int = 4000, name: str = "judge",
                 failure_value: float = 0.0, policy_engine=None, base_dir: Path | str = ".",
                 engine=None, tokenizer=None):
        if mode not in TEMPLATES:
            raise ValueError(f"mode must be one of {sorted(TEMPLATES)}, got {mode!r}")
        self.template = template or TEMPLATES[mode]
        fields = {"pointwise": ("prompt", "response"), "listwise": ("prompt", "responses"),
                  "pairwise": ("prompt", "response_a", "response_b")}[mode]
        try:
            filled = self.template.format(rubric="", **{f: f"<{f}>" for f in fields})
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"{mode} template: bad placeholder {e} (available: "
                             f"{{rubric}}, {', '.join('{' + f + '}' for f in fields)})") from None
        missing = [f for f in fields if f"<{f}>" not in filled]
        if missing:
            raise ValueError(f"{mode} template lacks the placeholder {{{missing[0]}}}")
        if model != "policy" and engine is None:
            from tao_fast.models.loader import resolve_model_path

            p = Path(model)
            resolve_model_path(str(p if p.is_absolute() or model.startswith("embedded")
                                   else Path(base_dir) / p))  # fails now, not mid-run
        if model == "policy" and engine is None and policy_engine is None:
            raise ValueError("model='policy' needs the run's engine; in Python pass "
                             "engine= and tokenizer=")
        self.mode, self.model_spec, self.rubric = mode, model, rubric
        self.max_tokens, self.both_orders = max_tokens, both_orders
        self.max_chars, self.base_dir = max_response_chars, Path(base_dir)
        self.name, self.failure_value = name, failure_value
        self._policy_engine, self.engine, self.tokenizer = policy_engine, engine, tokenizer

    @property
    def uses_policy(self) -> bool:
        """A judge on the policy being tuned (model="policy") asks the run's own engine."""
        return self.model_spec == "policy"

    def _resolve(self):
        if self.engine is not None:
            return
        if self.model_spec == "policy":
            self.engine, self.tokenizer = self._policy_engine()
            return
        from tao_fast.models import load_model
        from tao_fast.rollout.torch_engine import TorchEngine

        spec = self.model_spec
        if not (Path(spec).is_absolute() or spec.startswith("embedded")):
            spec = str(self.base_dir / spec)
        model, self.tokenizer, _ = load_model(spec)
        self.engine = TorchEngine(model.requires_grad_(False), self.tokenizer)

    def _ask(self, texts: list[str]) -> list[str]:
        from tao_fast.data.prompts import encode_prompt
        from tao_fast.rollout import SamplingParams

        self._resolve()
        ids = [encode_prompt(PromptRecord([{"role": "user", "content": t}]), self.tokenizer)
               for t in texts]
        ro = self.engine.generate(ids, SamplingParams(n=1, temperature=0.0,
                                                      max_tokens=self.max_tokens))
        return [g[0] for g in ro.texts]

    def _cut(self, s: str) -> str:
        return s if len(s) <= self.max_chars else s[:self.max_chars] + " [...]"

    def score(self, prompts, candidates) -> ScoreResult:
        fill = dict(rubric=self.rubric)
        calls, owners = [], []  # judge prompts, and what each one decides
        for p, (rec, group) in enumerate(zip(prompts, candidates, strict=True)):
            if self.mode == "pointwise":
                for c, t in enumerate(group):
                    calls.append(self.template.format(**fill, prompt=rec.text,
                                                      response=self._cut(t)))
                    owners.append((p, c))
            elif self.mode == "listwise":
                listing = "\n\n".join(f"Response {i + 1}:\n{self._cut(t)}"
                                      for i, t in enumerate(group))
                calls.append(self.template.format(**fill, prompt=rec.text, responses=listing))
                owners.append((p, None))
            else:
                for a in range(len(group)):
                    for b in range(len(group)):
                        if a != b and (self.both_orders or a < b):
                            calls.append(self.template.format(
                                **fill, prompt=rec.text, response_a=self._cut(group[a]),
                                response_b=self._cut(group[b])))
                            owners.append((p, (a, b)))
        replies = self._ask(calls) if calls else []
        return getattr(self, f"_collect_{self.mode}")(candidates, owners, replies)

    def _result(self, candidates, rewards, details) -> ScoreResult:
        failed = 0
        for p, group in enumerate(candidates):
            for c in range(len(group)):
                if rewards[p][c] is None:
                    failed += 1
                    rewards[p][c] = self.failure_value
                    details[p][c].setdefault("error", "judge reply could not be parsed")
        return ScoreResult(rewards, details, {self.name: failed} if failed else {})

    def _collect_pointwise(self, candidates, owners, replies):
        rewards = [[None] * len(g) for g in candidates]
        details = [[{} for _ in g] for g in candidates]
        for (p, c), reply in zip(owners, replies):
            s = parse_score(reply)
            details[p][c] = {"judge_reply": reply[:300], "judge_score": s}
            rewards[p][c] = None if s is None else (s - 1) / 9
        return self._result(candidates, rewards, details)

    def _collect_listwise(self, candidates, owners, replies):
        rewards = [[None] * len(g) for g in candidates]
        details = [[{} for _ in g] for g in candidates]
        for (p, _), reply in zip(owners, replies):
            n = len(candidates[p])
            order = parse_ranking(reply, n)
            for c in range(n):
                details[p][c] = {"judge_reply": reply[:300]}
            if order is None:
                continue
            for c in range(n):  # unranked candidates share the place after the ranked ones
                pos = order.index(c) if c in order else len(order)
                rewards[p][c] = 1.0 - pos / (n - 1) if n > 1 else 1.0
                details[p][c]["rank"] = pos + 1
        return self._result(candidates, rewards, details)

    def _collect_pairwise(self, candidates, owners, replies):
        wins = [[0] * len(g) for g in candidates]
        games = [[0] * len(g) for g in candidates]
        bad = [[0] * len(g) for g in candidates]
        for (p, (a, b)), reply in zip(owners, replies):
            choice = parse_choice(reply)
            if choice is None:
                bad[p][a] += 1
                bad[p][b] += 1
                continue
            games[p][a] += 1
            games[p][b] += 1
            wins[p][a if choice == "A" else b] += 1
        rewards = [[w / g if g else (1.0 if len(ws) == 1 else None)
                    for w, g in zip(ws, gs)] for ws, gs in zip(wins, games)]
        details = [[{"wins": w, "comparisons": g, "unparsed": u}
                    for w, g, u in zip(ws, gs, us)] for ws, gs, us in zip(wins, games, bad)]
        return self._result(candidates, rewards, details)
