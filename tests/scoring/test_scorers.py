"""Rules, consensus, mix and the judge's parsers on hand-made candidates (no model needed)."""
import json

import pytest

from tao_fast.config import ConfigError, load_config
from tao_fast.data import PromptRecord
from tao_fast.scoring import ScoreResult, build_scorer
from tao_fast.scoring.extract import canonical, extract_answer
from tao_fast.scoring.judge import parse_choice, parse_ranking, parse_score
from tao_fast.scoring.mix import MixScorer, Part, normalize


def rec(q="q", **meta):
    return PromptRecord([{"role": "user", "content": q}], meta)


def rewards(spec, candidates, record=None, **kw):
    res = build_scorer(spec, **kw).score([record or rec()], [candidates])
    return res.rewards[0], res


# ---- extraction -------------------------------------------------------------------------

@pytest.mark.parametrize("text,spec,want", [
    ("17 + 25 = 42, so the answer is 1,234.", "last_number", "1234"),
    ("no digits here", "last_number", None),
    ("thus \\boxed{\\frac{1}{2}} and \\boxed{x^{2}}", "boxed", "x^{2}"),
    ("work...\n\nAnswer: Paris\n\n", "final_line", "Paris"),
    ("Answer: 3\nmore text\nFinal answer: 4", "answer_tag", "4"),
    ('```json\n{"a": {"b": [1, 2]}}\n```', "json:a.b.1", "2"),
    ('{"a": 1}', "json:missing", None),
    ("id=7; id=9", r"regex:id=(\d+)", "9"),
    ("  hi  ", "whole", "hi"),
])
def test_extractors(text, spec, want):
    assert extract_answer(text, spec) == want


def test_canonical_compares_numbers_by_value_and_text_by_words():
    assert canonical("42.0") == canonical("42") == canonical("84/2")
    assert canonical("New  York!") == canonical("new york")
    assert canonical(None) is None


# ---- rules ------------------------------------------------------------------------------

def test_regex_match_and_extract():
    assert rewards({"type": "regex", "pattern": r"Answer: \d+$", "flags": "m"},
                   ["Answer: 12", "answer: 12", "Answer: x"])[0] == [1, 0, 0]
    r, res = rewards({"type": "regex", "pattern": r"Answer: (\w+)", "answer_field": "gold"},
                     ["Answer: cat", "Answer: dog", "nothing"], rec(gold="cat"))
    assert r == [1, 0, 0] and res.details[0][1] == {"found": "dog", "expected": "cat"}


def test_exact_and_numeric():
    r, _ = rewards({"type": "exact", "answer_field": "a"},
                   ["so...\nAnswer: New York.", "York"], rec(a="new york"))
    assert r == [1, 0]
    r, _ = rewards({"type": "numeric", "answer_field": "a", "rel_tol": 0.01},
                   ["about 99.5", "100", "101.5", "none"], rec(a="100"))
    assert r == [1, 1, 0, 0]


def test_missing_answer_field_is_a_failure_not_a_wrong_answer():
    r, res = rewards({"type": "numeric", "answer_field": "a"}, ["1", "2"], rec(),
                     failure_value=-1.0)
    assert r == [-1.0, -1.0] and res.failures == {"numeric": 2}
    assert "KeyError" in res.details[0][0]["error"]


def test_json_and_schema(tmp_path):
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0}},
              "required": ["n"]}
    (tmp_path / "s.json").write_text(json.dumps(schema))
    cands = ['{"n": 3}', '```json\n{"n": 4}\n```', '{"n": -1}', '{"m": 1}', "{n: 3}", "[1]"]
    assert rewards("json", cands)[0] == [1, 1, 1, 1, 0, 1]
    assert rewards({"type": "json", "require_type": "object"}, cands)[0] == [1, 1, 1, 1, 0, 0]
    r, res = rewards({"type": "json_schema", "schema": "s.json"}, cands, base_dir=tmp_path)
    assert r == [1, 1, 0, 0, 0, 0]
    assert "minimum" in res.details[0][2]["reason"] and "'n' is a required" in \
        res.details[0][3]["reason"]
    r, _ = rewards({"type": "json_schema", "schema_field": "schema"}, cands, rec(schema=schema))
    assert r == [1, 1, 0, 0, 0, 0]
    hostile = "[" * 100_000 + "]" * 100_000  # deep nesting: a clean 0, not a crash
    assert rewards("json", [hostile])[0] == [0.0]


def test_length_and_phrases():
    assert rewards({"type": "length", "min": 2, "max": 3, "unit": "words"},
                   ["one", "one two", "a b c d"])[0] == [0, 1, 0]
    spec = {"type": "phrases", "required": ["because"], "forbidden": ["As an AI"]}
    assert rewards(spec, ["yes because x", "as an ai, because", "no"])[0] == [1, 0, 0]
    spec["score"] = "fraction"
    assert rewards(spec, ["yes because x", "as an ai, because", "no"])[0] == [1, 0.5, 0.5]


@pytest.mark.parametrize("spec,msg", [
    ("bleu", "unknown scorer 'bleu'"),
    ({"type": "regex"}, "needs the option 'pattern'"),
    ({"type": "regex", "pattern": "x", "patern": 1}, "has no option 'patern'"),
    ({"type": "regex", "pattern": "("}, "bad regex"),
    ({"type": "consensus", "extract": "nonsense"}, "unknown extractor"),
    ({"type": "json_schema", "schema": {"type": "nope"}}, "invalid JSON schema"),
    ({"type": "json_schema", "schema": "missing.json"}, "does not exist"),
    ({"type": "mix", "parts": [{"scorer": "json", "wieght": 1}]}, r"parts\[0\]: unknown key"),
    ({"type": "mix", "parts": [{"scorer": {"type": "bleu"}}]}, r"parts\[0\]\.scorer: unknown"),
    ({"type": "judge"}, "needs the run's engine"),
    ({"type": "reward_model", "path": "no/such/dir"}, "does not exist"),
    ({"no_type": 1}, "mapping with a 'type'"),
])
def test_bad_specs_name_the_key(spec, msg):
    with pytest.raises(ConfigError, match=msg):
        build_scorer(spec)


def test_mapping_specs_load_from_yaml(tmp_path):
    (tmp_path / "c.yaml").write_text(
        "scoring:\n  scorer:\n    type: mix\n    parts:\n"
        "      - {scorer: json, gate: true}\n      - {scorer: {type: length, max: 5}}\n")
    cfg = load_config(tmp_path / "c.yaml")
    assert cfg.scoring.scorer["parts"][1]["scorer"] == {"type": "length", "max": 5}
    assert build_scorer(cfg.scoring.scorer).score([rec()], [["1", "[1,2,3]"]]).rewards == \
        [[1.0, 0.0]]


# ---- consensus --------------------------------------------------------------------------

def test_majority_vote():
    r, res = rewards("consensus", ["it is 42", "42.0", "41", "I think 42", "no idea"])
    assert r == [1, 1, 0, 1, 0]
    assert res.details[0][0]["majority"] == "42" and res.details[0][0]["majority_share"] == 0.6
    assert res.stats == {"consensus/majority_rate": 1.0, "consensus/majority_share": 0.6,
                         "consensus/extract_rate": 0.8}


def test_no_majority_on_ties_singletons_or_below_min_share():
    assert rewards("consensus", ["1", "1", "2", "2"])[0] == [0, 0, 0, 0]  # tie
    assert rewards("consensus", ["1", "2", "3"])[0] == [0, 0, 0]  # nobody agrees
    _, res = rewards({"type": "consensus", "min_share": 0.75}, ["1", "1", "2"])
    assert res.rewards == [[0, 0, 0]] and res.stats["consensus/majority_rate"] == 0.0
    r, _ = rewards({"type": "consensus", "reward": "share"}, ["1", "1", "2", "x"])
    assert r == [0.5, 0.5, 0.25, 0.0]


def test_consensus_with_custom_extraction():
    spec = {"type": "consensus", "extract": "json:city"}
    assert rewards(spec, ['{"city": "Paris"}', '{"city": "paris"}', '{"city": "Rome"}'])[0] == \
        [1, 1, 0]


# ---- mix --------------------------------------------------------------------------------

class Counting:
    """Records which candidates it was shown (to check that gated ones are not)."""

    def __init__(self, name, fn):
        self.name, self.fn, self.seen = name, fn, []

    def score(self, prompts, candidates):
        self.seen.append([list(g) for g in candidates])
        return ScoreResult([[self.fn(t) for t in g] for g in candidates],
                           [[{"len": len(t)} for t in g] for g in candidates])


def test_normalize_by_hand():
    assert normalize([1, 2, 3], "minmax") == [0, 0.5, 1]
    assert normalize([1, 3], "group") == [-1, 1]
    assert normalize([5, 1, 5, 3], "rank") == [2.5 / 3, 0, 2.5 / 3, 1 / 3]
    assert normalize([2, 2], "group") == [0, 0]


def test_weighted_sum_and_gate():
    judge = Counting("judge", lambda t: float(len(t)))
    mix = MixScorer([Part(judge, weight=0.5),
                     {"scorer": "json", "gate": True, "weight": 2.0}], gate_fail_value=-1.0)
    res = mix.score([rec(), rec()], [['{"a":1}', "oops", "[]"], ["bad"]])
    # json passes -> 2.0 * 1 + 0.5 * len; json fails -> gate value; the judge never saw those
    assert res.rewards == [[2.0 + 0.5 * 7, -1.0, 2.0 + 0.5 * 2], [-1.0]]
    assert judge.seen == [[['{"a":1}', "[]"]]]  # only prompt 1's survivors, prompt 2 skipped
    d = res.details[0][1]
    assert d["gated_by"] == "json" and "judge" not in d["parts"]
    assert res.details[0][0]["parts"]["judge"] == {"score": 7.0, "len": 7}
    assert res.stats["mix/gate_pass_rate"] == 0.5


def test_mix_counts_failures_per_part_and_keeps_stats():
    mix = build_scorer({"type": "mix", "parts": [
        {"scorer": {"type": "numeric", "answer_field": "a"}},
        {"scorer": "consensus", "normalize": "minmax", "weight": 2}]})
    res = mix.score([rec(a=3), rec()], [["3", "3", "4"], ["1", "1"]])
    assert res.failures == {"numeric": 2}  # prompt 2 has no answer field
    assert res.rewards == [[1 + 2, 1 + 2, 0], [0, 0]]  # prompt 2: consensus equal -> minmax 0
    assert res.stats["consensus/majority_rate"] == 1.0


def test_duplicate_part_names_are_kept_apart():
    mix = build_scorer({"type": "mix", "parts": [{"scorer": {"type": "length", "max": 3}},
                                                 {"scorer": {"type": "length", "min": 3}}]})
    res = mix.score([rec()], [["abcd"]])
    assert set(res.details[0][0]["parts"]) == {"length", "length#1"}
    assert res.rewards == [[1.0]]



def test_score_results_of_slices_concatenate():
    """Slices of 2, 1 and 0 prompts: groups in order, failures summed per scorer, each stat the
    prompt-weighted mean of the slices that report it."""
    a = ScoreResult([[1.0, 0.0], [0.5]], [[{"a": 1}, {}], [{}]], {"x": 1, "y": 2},
                    {"m/rate": 0.5, "m/only_a": 1.0})
    b = ScoreResult([[2.0]], [[{"b": 1}]], {"x": 3}, {"m/rate": 0.8})
    got = ScoreResult.concat([a, b, ScoreResult([], [])])
    assert got.rewards == [[1.0, 0.0], [0.5], [2.0]]
    assert got.details == [[{"a": 1}, {}], [{}], [{"b": 1}]]
    assert got.failures == {"x": 4, "y": 2} and got.num_failures == 6
    assert got.stats == {"m/rate": pytest.approx((2 * 0.5 + 1 * 0.8) / 3), "m/only_a": 1.0}
    assert ScoreResult.concat([]).rewards == [] and ScoreResult.concat([]).stats == {}

# ---- judge parsers ----------------------------------------------------------------------

@pytest.mark.parametrize("reply,want", [
    ("Score: 7", 7), ("score of **8**", 8), ("I'd give it 6/10.", 6), ("9 out of 10", 9),
    ("Rating: 3", 3), ("**5**", 5), ("7", 7), ("The response is good. 8", 8),
    ("Score: 11", None), ("Step 1: check. Step 2: verify.", None), ("", None),
    ("Score: 4.5", 4.5),
])
def test_parse_score(reply, want):
    assert parse_score(reply) == want


def test_parse_ranking_and_choice():
    assert parse_ranking("Ranking: 2 > 3 > 1", 3) == [1, 2, 0]
    assert parse_ranking("Response 3 is best, then [1]; 3 again; 9", 3) == [2, 0]
    assert parse_ranking("no idea", 3) is None
    assert [parse_choice(s) for s in ("Better: B", "Response A is better", "A", "both")] == \
        ["B", "A", "A", None]


# ---- the Scorer protocol: every built-in scorer has uses_policy and check --------------

def _policy():  # the run's (engine, tokenizer); never called: building a judge does not ask
    raise AssertionError("a judge asked for the policy's engine while being built")


OTHER_JUDGE = {"type": "judge", "model": "judge-model", "engine": object(), "tokenizer": object()}
# spec type -> (spec, uses_policy); reward_model: tests/scoring/test_model_scorers.py
PROTOCOL_SPECS = {
    "arithmetic": ("arithmetic", False), "random": ("random", False),
    "python": ("python:{dir}/user_fn.py:length", False),
    "regex": ({"type": "regex", "pattern": "x"}, False), "exact": ({"type": "exact"}, False),
    "numeric": ({"type": "numeric"}, False), "json": ("json", False),
    "json_schema": ({"type": "json_schema", "schema": {"type": "object"}}, False),
    "length": ("length", False), "phrases": ({"type": "phrases", "required": ["a"]}, False),
    "consensus": ("consensus", False), "code": ("code", False), "sql": ("sql", False),
    "judge": ({"type": "judge"}, True),
    "mix": ({"type": "mix", "parts": [{"scorer": "json", "gate": True},
                                      {"scorer": {"type": "judge"}}]}, True),
    "route": ({"type": "route", "field": "task", "routes": {"chat": {"type": "judge"}},
               "default": "json"}, True),
}


def test_every_scorer_type_is_covered_and_subclasses_the_protocol():
    from tao_fast.scoring import Scorer
    from tao_fast.scoring.build import SCORER_TYPES, scorer_class

    assert set(PROTOCOL_SPECS) | {"reward_model"} == set(SCORER_TYPES)
    for kind in SCORER_TYPES:
        assert Scorer in scorer_class(kind).__mro__, kind  # subclassed, so the defaults apply


@pytest.mark.parametrize("kind", sorted(PROTOCOL_SPECS))
def test_uses_policy_and_check_on_every_builtin_scorer(kind, tmp_path):
    from tao_fast.scoring import Scorer, ScorerContext

    (tmp_path / "user_fn.py").write_text(
        "def length(prompt, candidates):\n    return [float(len(c)) for c in candidates]\n")
    (tmp_path / "shop.sqlite").write_bytes(b"")  # check() asks only that the file exists
    spec, uses_policy = PROTOCOL_SPECS[kind]
    if isinstance(spec, str):
        spec = spec.format(dir=tmp_path)
    scorer = build_scorer(spec, ScorerContext(base_dir=tmp_path, policy_engine=_policy))
    assert isinstance(scorer, Scorer)
    assert scorer.uses_policy is uses_policy
    assert scorer.check([rec(tests="assert True", db="shop.sqlite", answer="4")]) is None


def test_uses_policy_follows_the_judges_model_through_nested_mixes():
    from tao_fast.scoring import ScorerContext

    ctx = ScorerContext(policy_engine=_policy)
    assert not build_scorer(OTHER_JUDGE, ctx).uses_policy  # a judge with its own model
    own = {"type": "mix", "parts": [{"scorer": "json"}, {"scorer": OTHER_JUDGE}]}
    assert not build_scorer(own, ctx).uses_policy
    nested = {"type": "mix", "parts": [{"scorer": "length"}, {"scorer": {
        "type": "mix", "parts": [{"scorer": "consensus"}, {"scorer": {"type": "judge"}}]}}]}
    assert build_scorer(nested, ctx).uses_policy


def test_a_mix_checks_every_part(tmp_path):
    """A SQL part inside a mix checks its databases before any generation, as it would alone."""
    mix = build_scorer({"type": "mix", "parts": [{"scorer": "json", "gate": True},
                                                 {"scorer": "sql"}]}, base_dir=tmp_path)
    (tmp_path / "shop.sqlite").write_bytes(b"")
    mix.check([rec(db="shop.sqlite")])
    with pytest.raises(ConfigError, match="prompt 0: database .*nope.sqlite does not exist"):
        mix.check([rec(db="nope.sqlite")])


def test_a_rule_against_a_record_field_refuses_a_record_without_it_before_generation():
    from tao_fast.config import ConfigError
    from tao_fast.data import PromptRecord

    recs = [PromptRecord([{"role": "user", "content": "q"}], {"answer": "4"}, source="a.jsonl:1"),
            PromptRecord([{"role": "user", "content": "q"}], {}, source="a.jsonl:2")]
    for spec in ({"type": "exact"}, {"type": "numeric"},
                 {"type": "regex", "pattern": "(\\d+)", "answer_field": "answer"}):
        s = build_scorer(spec)
        s.check(recs[:1])
        with pytest.raises(ConfigError, match="a.jsonl:2: the record has no 'answer' field"):
            s.check(recs)
    build_scorer({"type": "regex", "pattern": "x"}).check(recs)  # no field compared: fine
