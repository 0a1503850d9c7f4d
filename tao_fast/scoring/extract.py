"""Answer extraction, shared by the rules and the consensus vote, and the candidate's JSON value
(`parse_json_candidate`, for the json / json_schema rules and the json:KEY extractor).

An extractor spec is one of:
    last_number      the last number written in digits ("so 17+25 = 42" -> "42")
    boxed            the content of the last \\boxed{...}
    final_line       the last non-empty line, without an "Answer:"-style prefix
    answer_tag       the text after the last "Answer:" (to the end of its line)
    json:KEY         the value at KEY (dotted path) of the candidate's JSON
    regex:PATTERN    group 1 (or the whole match) of the last match of PATTERN
    whole            the whole stripped response
The result is a string, or None when the candidate holds no answer of that kind.
"""
from __future__ import annotations

import json
import re
from fractions import Fraction

_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?(?:/\d+)?")
_ANSWER_PREFIX = re.compile(r"^\s*(?:final\s+answer|answer|result)\s*[:=]\s*", re.I)
_ANSWER_TAG = re.compile(r"(?:final\s+answer|answer)\s*[:=]\s*(.+)", re.I)
_KINDS = ("last_number", "boxed", "final_line", "answer_tag", "whole")
_JSON_BLOCK = re.compile(r"```(?:json)?\s*\n(.*?)```", re.S)


def parse_json_candidate(text: str):
    """The candidate's JSON value: its last ```json block if it has one, else the whole text."""
    blocks = _JSON_BLOCK.findall(text)
    return json.loads(blocks[-1] if blocks else text.strip())


def _boxed(text: str) -> str | None:
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j].strip()
    return None  # unbalanced


def extract_answer(text: str, spec: str = "last_number") -> str | None:
    """The answer the candidate gives, by `spec` (see the module docstring); ValueError for
    an unknown spec, so a config error shows before any generation."""
    if spec.startswith("regex:"):
        try:
            rx = re.compile(spec[6:], re.S)
        except re.error as e:
            raise ValueError(f"extract {spec!r}: bad regex: {e}") from None
        found = list(rx.finditer(text))
        if not found:
            return None
        m = found[-1]
        return (m.group(1) if m.groups() else m.group(0)).strip()
    if spec.startswith("json:"):
        try:
            value = parse_json_candidate(text)
        except (json.JSONDecodeError, RecursionError):
            return None
        for key in spec[5:].split("."):
            if isinstance(value, dict) and key in value:
                value = value[key]
            elif isinstance(value, list) and key.isdigit() and int(key) < len(value):
                value = value[int(key)]
            else:
                return None
        return value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    if spec not in _KINDS:
        raise ValueError(f"unknown extractor {spec!r}: use one of {list(_KINDS)}, "
                         f"'json:KEY' or 'regex:PATTERN'")
    if spec == "whole":
        return text.strip() or None
    if spec == "last_number":
        found = _NUMBER.findall(text)
        return found[-1].replace(",", "") if found else None
    if spec == "boxed":
        return _boxed(text)
    if spec == "answer_tag":
        found = _ANSWER_TAG.findall(text)
        return found[-1].strip() if found else None
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return _ANSWER_PREFIX.sub("", lines[-1]).strip() if lines else None


def parse_fraction(s: str) -> Fraction | None:
    """'1,234.5' -> 1234.5 exactly, '3/4' -> 3/4; None when it is not a number."""
    s = s.strip().replace(",", "").rstrip(".")
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def canonical(answer: str | None) -> str | None:
    """Vote key: numbers compared by value ('42.0' == '42'), text by normalised words."""
    if answer is None:
        return None
    num = parse_fraction(answer)
    if num is not None:
        return str(num)
    key = " ".join(re.sub(r"[^\w\s]", " ", answer.lower()).split())
    return key or None
