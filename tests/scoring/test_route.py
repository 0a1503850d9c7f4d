"""The route scorer: each record scored by its task's scorer (by a field of its line), whole
groups per route, results back in the batch's order; a record with no route is an error before
any generation, naming its file and line."""
import json

import pytest

from tao_fast.config import ConfigError, load_config
from tao_fast.data import PromptRecord
from tao_fast.scoring import build_scorer

ROUTE = {"type": "route", "field": "task",
         "routes": {"math": "arithmetic", "vote": {"type": "consensus"}},
         "default": {"type": "length", "min": 2, "unit": "words"}}
LENGTH = {"type": "length", "min": 2, "unit": "words"}


def rec(q, where="train.jsonl:1", **meta):
    return PromptRecord([{"role": "user", "content": q}], meta, source=where)


def test_each_record_goes_to_its_tasks_scorer_in_the_batchs_order():
    scorer = build_scorer(ROUTE)
    prompts = [rec("What is 2 + 3?", task="math"), rec("Pick one", task="vote"),
               rec("Say hi", task="chat"), rec("What is 1 + 1?", task="math"), rec("Hello")]
    groups = [["5", "6"], ["7", "7", "8"], ["hi there", "hey"], ["2", "two"], ["x y", "x"]]
    res = scorer.score(prompts, groups)
    # math: the verifier; vote: the majority (7) of the whole group; chat and no task: the
    # default (at least 2 words)
    default = build_scorer(LENGTH).score([prompts[2], prompts[4]], [groups[2], groups[4]])
    want = [build_scorer("arithmetic").score([prompts[0]], [groups[0]]).rewards[0],
            build_scorer({"type": "consensus"}).score([prompts[1]], [groups[1]]).rewards[0],
            default.rewards[0],
            build_scorer("arithmetic").score([prompts[3]], [groups[3]]).rewards[0],
            default.rewards[1]]
    assert res.rewards == want
    assert res.rewards[0] == [1.0, 0.0] and res.rewards[1] == [1.0, 1.0, 0.0]
    assert [d[0]["route"] for d in res.details] == ["math", "vote", "default", "math", "default"]
    assert res.stats["route/math/reward_mean"] == pytest.approx(2 / 4)
    assert set(k for k in res.stats if k.startswith("route/")) == {
        "route/math/reward_mean", "route/vote/reward_mean", "route/default/reward_mean"}


def test_a_record_without_a_route_is_refused_naming_its_line():
    scorer = build_scorer({"type": "route", "field": "task", "routes": {"math": "arithmetic"}})
    scorer.check([rec("What is 1 + 1?", task="math")])
    with pytest.raises(ConfigError, match=r"data/train\.jsonl:7: has no 'task' field \(routes"):
        scorer.check([rec("q", task="math"), rec("q", "data/train.jsonl:7")])
    with pytest.raises(ConfigError, match=r"train\.jsonl:2: has task='poem', which no route"):
        scorer.check([rec("q", "train.jsonl:2", task="poem")])


@pytest.mark.parametrize("spec, message", [
    ({"type": "route", "routes": {"a": "exact"}}, r"scorer 'route' needs the option 'field'"),
    ({"type": "route", "field": "task", "routes": {}}, r"routes: must be a non-empty mapping"),
    ({"type": "route", "field": "prompt", "routes": {"a": "exact"}}, r"is the prompt itself"),
    ({"type": "route", "field": "task", "routes": {"a": "nope"}},
     r"scoring\.scorer\.routes\.a: unknown scorer 'nope'"),
    ({"type": "route", "field": "task", "routes": {"default": "exact"}, "default": "exact"},
     r"'default' is the default's name"),
])
def test_bad_route_specs_name_the_key(spec, message):
    with pytest.raises(ConfigError, match=message):
        build_scorer(spec)


def test_a_tune_with_an_unrouted_record_fails_before_the_model_loads(tmp_path, monkeypatch):
    import tao_fast.models

    monkeypatch.setattr(tao_fast.models, "load_model", lambda *a, **k: pytest.fail("loaded"))
    lines = [{"prompt": "What is 1 + 2?", "task": "math"}, {"prompt": "Write a haiku."}]
    (tmp_path / "mixed.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (tmp_path / "held.jsonl").write_text(json.dumps(lines[0]) + "\n")
    cfg = load_config(overrides=[
        f"data.train={tmp_path / 'mixed.jsonl'}", f"data.eval={tmp_path / 'held.jsonl'}",
        "scoring.scorer={type: route, field: task, routes: {math: arithmetic}}",
        f"run.output_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match=r"mixed\.jsonl:2: has no 'task' field"):
        tao_fast.tune(cfg)
