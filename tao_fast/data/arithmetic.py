"""Built-in task: short arithmetic questions generated from a seed. No answers are stored: the
verifier (`tao_fast.scoring.arithmetic`) recomputes them from the question text alone."""
from __future__ import annotations

import random

from tao_fast.data.prompts import PromptRecord

_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
         "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
         "eighteen", "nineteen"]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
OP_WORDS = {"+": "plus", "-": "minus"}
TEMPLATE = "What is {a} {op} {b}?"


def number_to_words(n: int) -> str:
    """0..9999 in English words: 'forty-five', 'one hundred and two', 'minus seven'."""
    if n < 0:
        return "minus " + number_to_words(-n)
    if n >= 10000:
        raise ValueError(f"number_to_words supports |n| < 10000, got {n}")
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("-" + _ONES[n % 10] if n % 10 else "")
    if n < 1000:
        rest = n % 100
        return _ONES[n // 100] + " hundred" + (" and " + number_to_words(rest) if rest else "")
    rest = n % 1000
    sep = " and " if 0 < rest < 100 else " "
    return _ONES[n // 1000] + " thousand" + (sep + number_to_words(rest) if rest else "")


def make_question(a: int, op: str, b: int, words: bool) -> str:
    if words:
        return TEMPLATE.format(a=number_to_words(a), op=OP_WORDS[op], b=number_to_words(b))
    return TEMPLATE.format(a=a, op=op, b=b)


def arithmetic_prompts(n: int, seed: int, *, ops: str = "+", digits: int = 2,
                       words: float = 0.0, exclude: set[str] | None = None) -> list[PromptRecord]:
    """n distinct questions `What is a <op> b?` with `digits`-digit operands.

    ops: a string of operators drawn uniformly ("+", "+-"); words: fraction of questions
    written in English words; exclude: question texts that must not appear (the held-out set
    excludes the training set's questions, so the two never share a question).
    """
    if not ops or set(ops) - set(OP_WORDS):
        raise ValueError(f"ops must be made of {sorted(OP_WORDS)}, got {ops!r}")
    if not 1 <= digits <= 3:
        raise ValueError(f"digits must be 1..3, got {digits}")
    lo, hi = (0 if digits == 1 else 10 ** (digits - 1)), 10 ** digits - 1
    space = (hi - lo + 1) ** 2 * len(ops)
    exclude = exclude or set()
    if n > space - len(exclude):
        raise ValueError(f"asked for {n} distinct questions, only {space - len(exclude)} exist")
    rng = random.Random(seed)
    out, seen = [], set(exclude)
    while len(out) < n:
        a, b, op = rng.randint(lo, hi), rng.randint(lo, hi), rng.choice(ops)
        q = make_question(a, op, b, rng.random() < words)
        if q in seen:
            continue
        seen.add(q)
        out.append(PromptRecord(messages=[{"role": "user", "content": q}],
                                meta={"source": f"arithmetic:seed={seed}"}))
    return out


def arithmetic_split(n_train: int, n_eval: int, seed: int, **kw):
    """Training and held-out prompts from disjoint seeds and with no question in common."""
    train = arithmetic_prompts(n_train, seed, **kw)
    held = arithmetic_prompts(n_eval, seed + 1_000_003, exclude={p.text for p in train}, **kw)
    return train, held
