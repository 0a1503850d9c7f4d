"""The built-in tasks (`data.train=builtin:NAME`), each generated from a seed, with the scorers
the multi-task demo trains and judges them by, declared once here as data.

    arithmetic  "What is 47 + 25?"                tao_fast/data/arithmetic.py; the verifier
                                                  recomputes the answer from the question
    json        "Maria is 34 and lives in Lima.   a format gate (json_schema) and content rules
                 Reply with only a JSON object     (exact name, age and city, a third each)
                 with the keys ..."
    multiply    "What is 7 times 13? Answer with  label-free in training (consensus: the
                 the number only."                 group's majority); its label judges held-out

Measured on the embedded SmolLM2-135M-Instruct (bench/RESULTS.md, the multi-task demo), greedy
before tuning: arithmetic 18.8%, json 31.2% (its JSON right but followed by prose, which the gate
refuses, or the age wrong), multiply 25.0%; on 60 prompts of a draft of multiply (both factors
one digit) the majority of 8 samples at T=0.7 was right 46.7% of the time against 29.6% for one
sample: the vote is the more accurate answer, which is when a vote can teach (tao-fast
check-scorer measures it).
"""
from __future__ import annotations

import random

from tao_fast.data.arithmetic import arithmetic_split
from tao_fast.data.prompts import PromptRecord

HELD_OUT_SEED = 1_000_003  # a held-out split's seed offset (as the arithmetic task's)

_NAMES = ["Maria", "John", "Aisha", "Kenji", "Olga", "Pedro", "Liam", "Nora", "Ravi", "Chen",
          "Fatima", "Tom", "Elena", "Omar", "Sara", "Ivan", "Zoe", "Kofi", "Mei", "Lucas"]
_CITIES = ["Lisbon", "Osaka", "Lagos", "Lima", "Oslo", "Pune", "Quito", "Turin", "Hanoi",
           "Accra", "Cusco", "Bergen", "Dakar", "Kyoto", "Porto", "Graz"]
_SENTENCES = ["{name} is {age} and lives in {city}.", "{name}, aged {age}, lives in {city}.",
              "{name} lives in {city} and is {age} years old."]
JSON_ASK = ' Reply with only a JSON object with the keys "name", "age" (a number) and "city".'
MULTIPLY = "What is {a} times {b}? Answer with the number only."

# the json task's scorer: a gate (the whole reply is a JSON object with the three keys, age an
# integer), then a third of the reward per field equal to the record's
JSON_SCORER = {"type": "mix", "parts": [
    {"scorer": {"type": "json_schema", "schema": {
        "type": "object", "required": ["name", "age", "city"],
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                       "city": {"type": "string"}}}}, "gate": True},
    *({"scorer": {"type": "exact", "answer_field": k, "extract": f"json:{k}"}, "weight": w}
      for k, w in (("name", 0.34), ("age", 0.33), ("city", 0.33)))]}

# per task: the scorer that trains it, and the one that judges its held-out answers
SCORERS = {
    "arithmetic": {"train": "arithmetic", "eval": "arithmetic"},
    "json": {"train": JSON_SCORER, "eval": JSON_SCORER},
    "multiply": {"train": {"type": "consensus", "extract": "last_number"},
                 "eval": {"type": "numeric", "answer_field": "answer"}},
}


def _distinct(make, n: int, seed: int, space: int, exclude: set[str]) -> list[PromptRecord]:
    """n records of distinct prompt text from make(rng) -> (text, meta), none in exclude."""
    if n > space - len(exclude):
        raise ValueError(f"asked for {n} distinct questions, only {space - len(exclude)} exist")
    rng, out, seen = random.Random(seed), [], set(exclude)
    while len(out) < n:
        text, meta = make(rng)
        if text not in seen:
            seen.add(text)
            out.append(PromptRecord([{"role": "user", "content": text}], meta))
    return out


def _json_record(rng: random.Random) -> tuple[str, dict]:
    name, age, city = rng.choice(_NAMES), rng.randint(18, 89), rng.choice(_CITIES)
    text = rng.choice(_SENTENCES).format(name=name, age=age, city=city) + JSON_ASK
    return text, {"name": name, "age": str(age), "city": city}


def _multiply_record(rng: random.Random) -> tuple[str, dict]:
    a, b = rng.randint(2, 9), rng.randint(2, 19)
    return MULTIPLY.format(a=a, b=b), {"answer": str(a * b)}


# name -> (make a record, distinct prompts there are)
_MAKERS = {"json": (_json_record, len(_NAMES) * 72 * len(_CITIES) * len(_SENTENCES)),
           "multiply": (_multiply_record, 8 * 18)}


def builtin_split(name: str, n_train: int, n_eval: int, seed: int, **arith):
    """(training, held-out) prompts of builtin task `name`: disjoint seeds, no prompt text in
    both. arith: the arithmetic task's ops, digits and words (data.*). ValueError when the
    task has fewer distinct prompts than asked for."""
    if name == "arithmetic":
        return arithmetic_split(n_train, n_eval, seed, **arith)
    make, space = _MAKERS[name]
    if n_train + n_eval > space:
        raise ValueError(f"{n_train} training + {n_eval} held-out prompts asked for; the task "
                         f"has {space} distinct ones")
    train = _distinct(make, n_train, seed, space, set())
    held = _distinct(make, n_eval, seed + HELD_OUT_SEED, space, {r.text for r in train})
    for r in train + held:
        r.meta["source"] = f"{name}:seed={seed}"
    return train, held
