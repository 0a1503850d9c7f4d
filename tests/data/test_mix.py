"""Data mixes: data.train as several weighted sources. Each step's prompts are drawn to the
weights, builtin tasks name their task, the manifest records the mix, a resumed run rebuilds
every source's part of the pool."""
import bisect
import json
import random

import pytest

import tao_fast
from tao_fast.config import ConfigError, ResumeError, load_config
from tao_fast.data.mix import mix_order, plan_mix, pool_of_mix
from tao_fast.data.sources import load_prompts, load_sources
from tao_fast.data.tasks import JSON_SCORER, builtin_split
from tao_fast.scoring import build_scorer


def sources_of(order, sizes):
    ends = [sum(sizes[:i + 1]) for i in range(len(sizes))]
    return [bisect.bisect_right(ends, i) for i in order]


def test_every_prefix_of_the_order_holds_each_source_within_one_of_its_share():
    rng = random.Random(1)
    for trial in range(300):
        k = rng.randint(2, 4)
        sizes = [rng.randint(1, 12) for _ in range(k)]
        weights = [rng.choice([0.5, 1.0, 2.0, 3.0]) for _ in range(k)]
        order = mix_order(sizes, weights, 60, random.Random(trial))
        counts = [0] * k
        for n, s in enumerate(sources_of(order, sizes), 1):
            counts[s] += 1
            for i in range(k):
                assert abs(counts[i] - n * weights[i] / sum(weights)) <= 1 + 1e-9
        # within a source every prompt comes once before any comes twice
        for i in range(k):
            mine = [j for j, s in zip(order, sources_of(order, sizes)) if s == i]
            first = mine[:sizes[i]]
            assert len(set(first)) == len(first)


def test_weights_3_to_1_give_a_step_of_4_prompts_3_and_1():
    order = mix_order([10, 10], [3.0, 1.0], 20, random.Random(0))
    for step in range(5):
        assert sorted(sources_of(order[4 * step:4 * step + 4], [10, 10])) == [0, 0, 0, 1]


def test_a_lone_source_is_one_shuffle_as_before_mixes():
    want = list(range(7))
    random.Random(5).shuffle(want)
    assert mix_order([7], [1.0], 7, random.Random(5)) == want
    assert mix_order([0, 7], [2.0, 1.0], 7, random.Random(5)) == [j + 0 for j in want]


def test_data_train_as_a_list_and_its_errors(tmp_path):
    cfg = load_config(overrides=[
        "data.train=[{source: builtin:arithmetic, weight: 2}, {source: builtin:json}]"])
    assert [(s.source, s.weight) for s in cfg.data.sources] == [("builtin:arithmetic", 2.0),
                                                               ("builtin:json", 1.0)]
    assert cfg.data.mixed and not load_config().data.mixed
    for bad, msg in [
            ("[{source: builtin:nope}]", r"data.train\[0\]: unknown builtin task"),
            ("[{source: a.jsonl}, {source: b.jsonl, wieght: 2}]",
             r"data.train\[1\]\.wieght: unknown"),
            ("[{source: a.jsonl, weight: -1}]", r"data.train\[0\]\.weight: must be > 0"),
            ("[{source: a.jsonl, n_eval: 5}]", r"n_eval: sets a builtin task's size"),
            ("[{source: a.jsonl}, {source: a.jsonl}]", "names 'a.jsonl' twice")]:
        with pytest.raises(ConfigError, match=msg):
            load_config(overrides=[f"data.train={bad}"])
    with pytest.raises(ConfigError, match="data.train: an empty list"):  # as a YAML file has it
        load_config(values={"data.train": []})


def test_builtin_tasks_split_without_overlap_and_their_scorers_work():
    for name in ("json", "multiply"):
        train, held = builtin_split(name, 40, 30, 0)
        assert len(train) == 40 and len(held) == 30
        assert not {r.text for r in train} & {r.text for r in held}
        assert builtin_split(name, 40, 30, 0)[0] == train  # seeded
    rec = builtin_split("json", 1, 0, 3)[0][0]
    good = json.dumps({"name": rec.meta["name"], "age": int(rec.meta["age"]),
                       "city": rec.meta["city"]})
    wrong_age = json.dumps({"name": rec.meta["name"], "age": int(rec.meta["age"]) + 1,
                            "city": rec.meta["city"]})
    res = build_scorer(JSON_SCORER).score([rec], [[good, wrong_age, good + " and prose"]])
    assert res.rewards[0] == pytest.approx([1.0, 0.67, 0.0])  # gate, then a third per field
    with pytest.raises(ValueError, match="100 training . 50 held-out prompts asked for; the "
                                         "task has 144 distinct ones"):
        builtin_split("multiply", 100, 50, 0)


def test_a_mix_tags_its_tasks_and_gives_each_builtin_its_size(tmp_path):
    (tmp_path / "chat.jsonl").write_text('{"prompt": "hi"}\n{"prompt": "yo", "task": "mine"}\n')
    cfg = load_config(overrides=[
        f"data.train=[{{source: builtin:multiply, n_train: 20, n_eval: 10}}, "
        f"{{source: {tmp_path / 'chat.jsonl'}, task: chat}}]"])
    train, held = load_prompts(cfg.data, 0)
    assert [r.meta["task"] for r in train] == ["multiply"] * 20 + ["chat", "mine"]
    assert len(held) == 10 and {r.meta["task"] for r in held} == {"multiply"}
    one = load_config(overrides=["data.train=builtin:arithmetic", "data.n_train=5"])
    assert all("task" not in r.meta for r in load_prompts(one.data, 0)[0])  # no mix: no tag
    too_big = load_config(overrides=["data.train=[{source: builtin:multiply}, "
                                     "{source: builtin:json}]"])
    with pytest.raises(ConfigError, match=r"data.train\[0\]: builtin:multiply with "
                                          r"n_train=1024, n_eval=200: .*has 144 distinct"):
        load_sources(too_big.data, 0)


def test_the_manifest_records_the_mix_and_a_resume_rebuilds_each_part(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "w1.jsonl").write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    spec = (f"data.train=[{{source: builtin:multiply, weight: 2, n_train: 6, n_eval: 0}}, "
            f"{{source: {tmp_path / 'd'}, task: logs}}]")
    data = load_config(overrides=[spec]).data
    srcs = load_sources(data, 0)
    plan, sizes = plan_mix(1, srcs, [], data, 0)
    line = plan.manifest_line()
    assert sizes == [6, 2] and [m["n_prompts"] for m in line["mix"]] == [6, 2]
    assert [(m["task"], m["weight"]) for m in line["mix"]] == [("multiply", 2.0), ("logs", 1.0)]
    pool, sizes2 = pool_of_mix(line, load_sources(data, 0), data)
    assert [r.text for r in pool] == [r.text for r in plan.prompts] and sizes2 == sizes
    assert [r.meta["task"] for r in pool] == ["multiply"] * 6 + ["logs"] * 2
    other = load_config(overrides=["data.train=builtin:multiply", "data.n_train=6",
                                   "data.n_eval=0"]).data
    with pytest.raises(ResumeError, match="data.train now names"):
        pool_of_mix(line, load_sources(other, 0), other)


@pytest.mark.slow
def test_a_mixed_two_step_tune_draws_to_the_weights(tmp_path, tiny_model):
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps({"prompt": f"Say {w}."}) + "\n"
                                                 for w in ("tea", "owls", "rain")))
    cfg = load_config(overrides=[
        f"model.path={tiny_model}", "model.ops_backend=torch", "rollout.engine=torch",
        f"data.train=[{{source: builtin:arithmetic, weight: 3, n_train: 12, n_eval: 2}}, "
        f"{{source: {tmp_path / 'chat.jsonl'}, task: chat}}]",
        "scoring.scorer={type: route, field: task, routes: {arithmetic: arithmetic, "
        "chat: {type: length, min: 1}}}",
        "rollout.n=2", "rollout.max_tokens=3", "eval.max_tokens=3", "eval.samples=0",
        "rl.prompts_per_step=4", "run.steps=2", "run.threads=1", "run.progress=false",
        "run.keep_states=0", f"run.output_dir={tmp_path / 'run'}"])
    res = tao_fast.tune(cfg)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(m["mix/arithmetic/prompts"], m["mix/chat/prompts"]) for m in lines] == [(3, 1)] * 2
    (man,) = [json.loads(x) for x in (tmp_path / "run" / "manifest.jsonl").read_text().splitlines()]
    assert [(m["source"], m["weight"], m["n_prompts"]) for m in man["mix"]] == [
        ("builtin:arithmetic", 3.0, 12), (str(tmp_path / "chat.jsonl"), 1.0, 3)]
    assert sorted(res.eval_after.by_task) == ["arithmetic"]  # the builtin's held-out split
