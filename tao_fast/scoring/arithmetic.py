"""Prompt-only verifier for arithmetic questions (TAO's "custom rule"): it parses the question,
computes the answer itself and checks the final number of the response. No label is stored.

The final number is the last number written in digits ("17+25=42, so 43" -> 43); commas as
thousands separators and a leading minus are understood ("-1,234" -> -1234); a response with no
number scores 0.
"""
from __future__ import annotations

import re
from fractions import Fraction

from tao_fast.scoring.base import ScoreResult, Scorer

_WORD_VALUES = {w: i for i, w in enumerate(
    ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
     "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
     "nineteen"])}
_WORD_VALUES.update({w: 10 * i for i, w in enumerate(
    ["twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"], 2)})
_NUM_WORD = r"(?:minus|negative|zero|one|two|three|four|five|six|seven|eight|nine|ten|eleven|" \
            r"twelve|thirteen|fourteen|fifteen|sixteen|seventeen|eighteen|nineteen|twenty|" \
            r"thirty|forty|fifty|sixty|seventy|eighty|ninety|hundred|thousand|and)"
_WORDS_NUMBER = rf"(?:{_NUM_WORD}(?:[\s-]+{_NUM_WORD})*)"
_DIGITS_NUMBER = r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?"
_OPS = {"+": "+", "plus": "+", "-": "-", "−": "-", "minus": "-", "*": "*", "x": "*", "×": "*",
        "times": "*", "/": "/", "÷": "/", "divided by": "/"}
_OP = r"(\+|-|−|\*|×|x|/|÷|plus|minus|times|divided by)"
_Q_DIGITS = re.compile(rf"({_DIGITS_NUMBER})\s*{_OP}\s*({_DIGITS_NUMBER})", re.I)
_Q_WORDS = re.compile(rf"\bis\s+({_WORDS_NUMBER}|{_DIGITS_NUMBER})\s+{_OP}\s+"
                      rf"({_WORDS_NUMBER}|{_DIGITS_NUMBER})\s*\?", re.I)
_ANSWER = re.compile(_DIGITS_NUMBER)


def words_to_number(text: str) -> int:
    """'forty-five' -> 45, 'one hundred and two' -> 102, 'minus seven' -> -7."""
    toks = [t for t in re.split(r"[\s-]+", text.lower().strip()) if t and t != "and"]
    if not toks:
        raise ValueError(f"no number in {text!r}")
    sign = 1
    if toks[0] in ("minus", "negative"):
        sign, toks = -1, toks[1:]
    total, cur = 0, 0
    for t in toks:
        if t in _WORD_VALUES:
            cur += _WORD_VALUES[t]
        elif t == "hundred":
            cur = max(cur, 1) * 100
        elif t == "thousand":
            total, cur = total + max(cur, 1) * 1000, 0
        else:
            raise ValueError(f"not a number word: {t!r} in {text!r}")
    return sign * (total + cur)


def parse_number(s: str) -> Fraction:
    s = s.strip()
    if re.fullmatch(_DIGITS_NUMBER, s):
        return Fraction(s.replace(",", ""))
    return Fraction(words_to_number(s))


def parse_question(text: str):
    """(a, op, b) of the question, or None when the text holds no arithmetic question."""
    m = _Q_WORDS.search(text) or _Q_DIGITS.search(text)
    if not m:
        return None
    try:
        return parse_number(m.group(1)), _OPS[m.group(2).lower()], parse_number(m.group(3))
    except (ValueError, ZeroDivisionError):
        return None


def solve(text: str) -> Fraction | None:
    q = parse_question(text)
    if q is None:
        return None
    a, op, b = q
    if op == "/" and b == 0:
        return None
    return {"+": a + b, "-": a - b, "*": a * b, "/": a / b if b else None}[op]


def final_number(response: str) -> Fraction | None:
    """The last number written in digits in the response, or None."""
    found = _ANSWER.findall(response)
    return Fraction(found[-1].replace(",", "")) if found else None


class ArithmeticVerifier(Scorer):
    name = "arithmetic"

    def score(self, prompts, candidates):
        rewards, details = [], []
        for rec, group in zip(prompts, candidates):
            truth = solve(rec.text)
            rs, ds = [], []
            for resp in group:
                got = final_number(resp)
                ok = truth is not None and got is not None and got == truth
                rs.append(1.0 if ok else 0.0)
                ds.append({"expected": None if truth is None else str(truth),
                           "found": None if got is None else str(got)})
            rewards.append(rs)
            details.append(ds)
        return ScoreResult(rewards, details)
