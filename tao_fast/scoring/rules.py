"""Rule scorers: cheap, deterministic checks on each candidate's text.

    regex        match (1/0) or extract-and-compare against a field of the prompt record
    exact        the extracted answer equals the record's expected answer (normalised)
    numeric      the extracted number equals the record's number within a tolerance
    json         the candidate (or its ```json block) parses as JSON
    json_schema  ...and conforms to a JSON Schema (inline, from a file, or from the record)
    length       response length within [min_chars, max_chars] (or words)
    phrases      every required phrase present, no forbidden phrase

Each is 1.0 on pass and 0.0 on fail unless it says otherwise; the reasons go in the details.
A check that raises on a candidate (e.g. the record lacks the field it compares against)
scores `failure_value` and is counted as a failure, not as a wrong answer.
"""
from __future__ import annotations

import json
import re
from fractions import Fraction
from pathlib import Path

from tao_fast.config import ConfigError
from tao_fast.scoring.base import Scorer, score_each
from tao_fast.scoring.extract import extract_answer, parse_fraction, parse_json_candidate


def _compile(pattern: str, flags: str = ""):
    bits = 0
    for f in flags:
        bits |= {"i": re.I, "m": re.M, "s": re.S, "x": re.X}[f]  # KeyError names the flag
    try:
        return re.compile(pattern, bits)
    except re.error as e:
        raise ValueError(f"bad regex {pattern!r}: {e}") from None


class _Rule(Scorer):
    name = "rule"
    failure_value = 0.0
    answer_field = ""  # the record field a rule compares against ("" = none)

    def score(self, prompts, candidates):
        return score_each(self.name, self.score_one, prompts, candidates, self.failure_value)

    def score_one(self, rec, text: str) -> tuple[float, dict]:
        raise NotImplementedError

    def check(self, prompts) -> None:
        """A rule compared against a record field (answer_field): every record has it, else a
        ConfigError naming the first record without it (its file and line), before generation."""
        key = self.answer_field
        for i, rec in enumerate(prompts if key else ()):
            if key not in rec.meta:
                where = rec.source or f"prompt {i}"
                raise ConfigError(f"{self.name}: {where}: the record has no {key!r} field, "
                                  f"which answer_field={key!r} compares against")


class RegexScorer(_Rule):
    """mode=search: 1 if the pattern is found (fullmatch: the whole stripped response).
    With `answer_field`, group 1 (or the whole match) must equal record.meta[answer_field]."""

    def __init__(self, pattern: str, mode: str = "search", flags: str = "",
                 answer_field: str = "", name: str = "regex", failure_value: float = 0.0):
        if mode not in ("search", "fullmatch"):
            raise ValueError(f"mode must be 'search' or 'fullmatch', got {mode!r}")
        self.rx, self.mode, self.answer_field = _compile(pattern, flags), mode, answer_field
        self.name, self.failure_value = name, failure_value

    def score_one(self, rec, text):
        m = self.rx.search(text) if self.mode == "search" else self.rx.fullmatch(text.strip())
        if not self.answer_field:
            return float(m is not None), {"matched": m is not None}
        expected = str(rec.meta[self.answer_field])
        got = (m.group(1) if m.groups() else m.group(0)).strip() if m else None
        return float(got == expected.strip()), {"found": got, "expected": expected}


def _norm(s: str) -> str:
    return " ".join(re.sub(r"[^\w\s.-]", " ", s.lower()).split()).strip(" .")


class ExactScorer(_Rule):
    """The extracted answer equals record.meta[answer_field] after normalisation (case,
    punctuation, whitespace); `extract` as in tao_fast.scoring.extract."""

    def __init__(self, answer_field: str = "answer", extract: str = "final_line",
                 name: str = "exact", failure_value: float = 0.0):
        extract_answer("", extract)  # validates the extractor spec
        self.answer_field, self.extract = answer_field, extract
        self.name, self.failure_value = name, failure_value

    def score_one(self, rec, text):
        expected = str(rec.meta[self.answer_field])
        got = extract_answer(text, self.extract)
        ok = got is not None and _norm(got) == _norm(expected)
        return float(ok), {"found": got, "expected": expected}


class NumericScorer(_Rule):
    """The extracted number equals record.meta[answer_field] within rel_tol / abs_tol."""

    def __init__(self, answer_field: str = "answer", extract: str = "last_number",
                 rel_tol: float = 0.0, abs_tol: float = 0.0, name: str = "numeric",
                 failure_value: float = 0.0):
        extract_answer("", extract)
        self.answer_field, self.extract = answer_field, extract
        self.rel_tol, self.abs_tol = rel_tol, abs_tol
        self.name, self.failure_value = name, failure_value

    def score_one(self, rec, text):
        expected = parse_fraction(str(rec.meta[self.answer_field]))
        if expected is None:
            raise ValueError(f"record's {self.answer_field!r} is not a number: "
                             f"{rec.meta[self.answer_field]!r}")
        raw = extract_answer(text, self.extract)
        got = parse_fraction(raw) if raw is not None else None
        ok = got is not None and abs(got - expected) <= max(
            Fraction(self.abs_tol), Fraction(self.rel_tol) * abs(expected))
        return float(ok), {"found": None if got is None else str(got), "expected": str(expected)}


class JsonScorer(_Rule):
    """1 if the candidate (or its last ```json block) parses as JSON (of `require_type`)."""

    def __init__(self, require_type: str = "", name: str = "json", failure_value: float = 0.0):
        types = {"": object, "object": dict, "array": list, "string": str, "number": (int, float)}
        if require_type not in types:
            raise ValueError(f"require_type must be one of {sorted(types)}, got {require_type!r}")
        self.require, self.require_type = types[require_type], require_type
        self.name, self.failure_value = name, failure_value

    def score_one(self, rec, text):
        try:
            value = parse_json_candidate(text)
        except (json.JSONDecodeError, RecursionError) as e:
            return 0.0, {"valid": False, "reason": f"not JSON: {str(e)[:120]}"}
        if not isinstance(value, self.require):
            return 0.0, {"valid": False, "reason": f"not a JSON {self.require_type}"}
        return 1.0, {"valid": True}


class JsonSchemaScorer(_Rule):
    """1 if the candidate's JSON conforms to the schema: `schema` (a mapping, or a path to a
    .json file relative to base_dir), or record.meta[schema_field] per prompt."""

    def __init__(self, schema: dict | str = "", schema_field: str = "", name: str = "json_schema",
                 failure_value: float = 0.0, base_dir: Path | str = "."):
        import jsonschema

        if not schema and not schema_field:
            raise ValueError("give `schema` (mapping or .json path) or `schema_field`")
        if isinstance(schema, str) and schema:
            path = Path(base_dir) / schema
            if not path.exists():
                raise FileNotFoundError(f"schema file {path} does not exist")
            schema = json.loads(path.read_text(encoding="utf-8"))
        self.validator = None
        if schema:
            cls = jsonschema.validators.validator_for(schema)
            try:
                cls.check_schema(schema)
            except jsonschema.SchemaError as e:
                raise ValueError(f"invalid JSON schema: {e.message}") from None
            self.validator = cls(schema)
        self.schema_field = schema_field
        self.name, self.failure_value = name, failure_value

    def score_one(self, rec, text):
        import jsonschema

        validator = self.validator
        if self.schema_field and self.schema_field in rec.meta:
            schema = rec.meta[self.schema_field]
            validator = jsonschema.validators.validator_for(schema)(schema)
        if validator is None:
            raise ValueError(f"record has no {self.schema_field!r} schema")
        try:
            value = parse_json_candidate(text)
        except (json.JSONDecodeError, RecursionError) as e:
            return 0.0, {"valid": False, "reason": f"not JSON: {str(e)[:120]}"}
        err = jsonschema.exceptions.best_match(validator.iter_errors(value))
        if err is not None:
            path = "/".join(map(str, err.absolute_path)) or "(root)"
            return 0.0, {"valid": False, "reason": f"{path}: {err.message[:200]}"}
        return 1.0, {"valid": True}


class LengthScorer(_Rule):
    """1 if min <= length <= max, counted in `unit` (chars or words); `max` 0 = no limit."""

    def __init__(self, min: int = 0, max: int = 0, unit: str = "chars", name: str = "length",
                 failure_value: float = 0.0):
        if unit not in ("chars", "words"):
            raise ValueError(f"unit must be 'chars' or 'words', got {unit!r}")
        if min < 0 or max < 0 or (max and max < min):
            raise ValueError(f"need 0 <= min <= max (max 0 = no limit), got {min}, {max}")
        self.lo, self.hi, self.unit = min, max, unit
        self.name, self.failure_value = name, failure_value

    def score_one(self, rec, text):
        n = len(text) if self.unit == "chars" else len(text.split())
        return float(n >= self.lo and (not self.hi or n <= self.hi)), {self.unit: n}


class PhraseScorer(_Rule):
    """Fraction of the rules met: each required phrase present, each forbidden one absent
    (score="all": 1 only when every rule holds)."""

    def __init__(self, required: list[str] | str = (), forbidden: list[str] | str = (),
                 case_sensitive: bool = False, score: str = "all", name: str = "phrases",
                 failure_value: float = 0.0):
        self.required = [required] if isinstance(required, str) else list(required)
        self.forbidden = [forbidden] if isinstance(forbidden, str) else list(forbidden)
        if not self.required and not self.forbidden:
            raise ValueError("give `required` and/or `forbidden` phrases")
        if score not in ("all", "fraction"):
            raise ValueError(f"score must be 'all' or 'fraction', got {score!r}")
        self.case_sensitive, self.mode = case_sensitive, score
        self.name, self.failure_value = name, failure_value

    def score_one(self, rec, text):
        t = text if self.case_sensitive else text.lower()

        def norm(p):
            return p if self.case_sensitive else p.lower()
        missing = [p for p in self.required if norm(p) not in t]
        present = [p for p in self.forbidden if norm(p) in t]
        n_rules = len(self.required) + len(self.forbidden)
        met = n_rules - len(missing) - len(present)
        r = met / n_rules if self.mode == "fraction" else float(met == n_rules)
        return r, {"missing": missing, "forbidden_found": present}
