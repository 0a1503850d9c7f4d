from fractions import Fraction

import pytest

from tao_fast.data import PromptRecord, arithmetic_prompts, arithmetic_split
from tao_fast.data.arithmetic import number_to_words
from tao_fast.scoring import build_scorer
from tao_fast.scoring.arithmetic import final_number, parse_question, solve, words_to_number


def rec(q):
    return PromptRecord(messages=[{"role": "user", "content": q}])


@pytest.mark.parametrize("response, expected", [
    ("17+25=42, so 43", Fraction(43)),  # the final number counts, not the first right one
    ("The answer is 68.", Fraction(68)),
    ("no idea", None),
    ("It is -22", Fraction(-22)),
    ("23-45=-22", Fraction(-22)),
    ("the total is 1,234 apples", Fraction(1234)),
    ("68.0", Fraction(68)),
    ("", None),
])
def test_final_number(response, expected):
    assert final_number(response) == expected


@pytest.mark.parametrize("question, answer", [
    ("What is 23 + 45?", 68),
    ("What is 23 - 45?", -22),
    ("What is 23-45?", -22),
    ("What is forty-five plus twelve?", 57),
    ("What is ninety-nine minus one hundred and two?", -3),
    ("What is 12 times 3?", 36),
    ("what is 1,000 + 5?", 1005),
])
def test_solve(question, answer):
    assert solve(question) == answer


def test_no_question():
    assert parse_question("Tell me a story.") is None
    scores = build_scorer("arithmetic").score([rec("Tell me a story.")], [["42"]])
    assert scores.rewards == [[0.0]]


def test_words_roundtrip():
    for n in (0, 7, 13, 20, 45, 99, 100, 102, 999, 1000, 1001, 4321, -7):
        assert words_to_number(number_to_words(n)) == n


def test_verifier_scores_groups():
    s = build_scorer("arithmetic")
    res = s.score([rec("What is 17 + 25?"), rec("What is 50 - 75?")],
                  [["17+25=42, so 43", "42", "The sum is 42."], ["-25", "25", "50 - 75 = -25"]])
    assert res.rewards == [[0.0, 1.0, 1.0], [1.0, 0.0, 1.0]]
    assert res.details[0][0] == {"expected": "42", "found": "43"}


def test_arithmetic_split_is_disjoint_and_seeded():
    train, held = arithmetic_split(300, 200, seed=3, ops="+-", words=0.3)
    assert not {p.text for p in train} & {p.text for p in held}
    assert [p.text for p in train] == [p.text for p in arithmetic_prompts(300, 3, ops="+-", words=0.3)]
    assert all(solve(p.text) is not None for p in train + held)
    assert any("plus" in p.text or "minus" in p.text for p in train)
