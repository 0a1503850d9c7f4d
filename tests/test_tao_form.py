"""TAO's form: candidates generated under the strategy's prompt (or several strategies mixed in
a group), the learner trained, and the held-out set answered, on the user's plain prompt
(rollout.strategy, rollout.train_prompt; tao_fast/rollout/strategies.py)."""
import json

import pytest

import tao_fast
from tao_fast.config import STRATEGIES, ConfigError, load_config, save_config
from tao_fast.data.prompts import STRATEGY_SUFFIX, PromptRecord, encode_prompt
from tao_fast.rollout import Rollouts, SamplingParams
from tao_fast.rollout.strategies import (
    PromptVariants,
    candidate_counts,
    generate_candidates,
    merge_candidates,
    strategy_sampling,
)
from tao_fast.scoring.base import ScoreResult


# ------------------------------------------------------------------ config
@pytest.mark.parametrize("overrides, message", [
    (["rollout.train_prompt=both"], r"rollout\.train_prompt: must be one of \['strategy', "
                                    r"'plain'\], got 'both'"),
    (["rollout.strategy=cot+bogus", "rollout.train_prompt=plain"],
     r"rollout\.strategy: must be one of .*, got 'bogus'"),
    (["rollout.strategy=cot+"], r"rollout\.strategy: must be one of .*, got ''"),
    (["rollout.strategy=plain+cot"], r"rollout\.strategy: 'plain\+cot' mixes 2 prompts .*"
                                     r"needs rollout\.train_prompt=plain"),
    (["rollout.strategy=cot+structured", "rollout.train_prompt=strategy"],
     r"needs rollout\.train_prompt=plain"),
    (["rollout.strategy=cot+cot", "rollout.train_prompt=plain"], r"rollout\.strategy: names a "
                                                                 r"strategy twice"),
    (["rollout.strategy=plain+cot+structured", "rollout.train_prompt=plain", "rollout.n=2"],
     r"rollout\.n: must be >= 3, the strategies in rollout\.strategy="),
])
def test_bad_strategy_settings_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=overrides)


def test_strategy_settings_parse_and_round_trip(tmp_path):
    cfg = load_config(overrides=["rollout.strategy=plain+cot", "rollout.train_prompt=plain",
                                 "rollout.n=3"])
    assert cfg.rollout.strategies == ("plain", "cot") and cfg.rollout.prompt_strategy == "plain"
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg
    dflt = load_config()
    assert (dflt.rollout.strategies, dflt.rollout.train_prompt, dflt.rollout.prompt_strategy) \
        == (("plain",), "strategy", "plain")
    assert load_config(overrides=["rollout.strategy=cot"]).rollout.prompt_strategy == "cot"
    assert load_config(overrides=["rollout.strategy=cot", "rollout.train_prompt=plain"]
                       ).rollout.prompt_strategy == "plain"
    assert STRATEGIES == tuple(STRATEGY_SUFFIX)  # the config's names are the suffixes'


def test_eval_strategy_flag_is_checked_by_the_config():
    from tao_fast.cli import build_parser, eval_config

    parse = build_parser().parse_args
    cfg, _ = eval_config(parse(["eval", "--strategy", "plain+cot", "rollout.train_prompt=plain"]))
    assert cfg.rollout.strategies == ("plain", "cot")
    with pytest.raises(ConfigError, match="needs rollout.train_prompt=plain"):
        eval_config(parse(["eval", "--strategy", "plain+cot"]))
    with pytest.raises(ConfigError, match=r"rollout\.strategy: must be one of"):
        eval_config(parse(["eval", "--strategy", "verbose"]))


# ------------------------------------------------------------------ the candidate merge
def _part(tag: str, n_prompts: int, n: int) -> Rollouts:
    """Rollouts whose candidate c of prompt p is named TAG p c (in text, tokens, log-probs)."""
    return Rollouts(
        prompt_ids=[[ord(tag), p] for p in range(n_prompts)],
        token_ids=[[[ord(tag), p, c] for c in range(n)] for p in range(n_prompts)],
        texts=[[f"{tag}{p}{c}" for c in range(n)] for p in range(n_prompts)],
        logprobs=[[[-float(c)] * 3 for c in range(n)] for p in range(n_prompts)],
        finish_reasons=[[f"{tag}-stop"] * n for _ in range(n_prompts)],
        stats={"tokens": 3 * n * n_prompts, "seconds": 1.0, "peak_memory_mb": len(tag)})


def test_candidate_counts_split_n_by_j_mod_k():
    assert candidate_counts(8, 2) == [4, 4]
    assert candidate_counts(5, 2) == [3, 2]
    assert candidate_counts(7, 3) == [3, 2, 2]
    assert candidate_counts(4, 1) == [4]
    with pytest.raises(ConfigError, match=r"rollout\.n: must be >= 3"):
        candidate_counts(2, 3)


def test_merge_puts_candidate_j_under_strategy_j_mod_k():
    a, b, c = _part("a", 2, 3), _part("b", 2, 2), _part("c", 2, 2)  # N = 7 over k = 3
    m = merge_candidates([a, b, c])
    assert m.texts == [["a00", "b00", "c00", "a01", "b01", "c01", "a02"],
                       ["a10", "b10", "c10", "a11", "b11", "c11", "a12"]]
    for p in range(2):
        for j in range(7):
            src = (a, b, c)[j % 3]
            assert m.token_ids[p][j] == src.token_ids[p][j // 3]
            assert m.logprobs[p][j] == src.logprobs[p][j // 3]
            assert m.finish_reasons[p][j] == src.finish_reasons[p][j // 3]
    assert m.prompt_ids == a.prompt_ids
    assert m.stats["tokens"] == 42 and m.stats["seconds"] == 3.0
    assert m.stats["peak_memory_mb"] == 1
    with pytest.raises(ValueError, match="not the j % k split"):
        merge_candidates([_part("a", 2, 2), _part("b", 2, 3)])  # the second may not hold more
    with pytest.raises(ValueError, match="different numbers of prompts"):
        merge_candidates([_part("a", 2, 2), _part("b", 1, 2)])


class _Engine:
    """Answers each call with candidates named by the call's first prompt token."""
    name, lockstep, tensor_parallel, max_context = "fake", False, 1, 1 << 20

    def __init__(self):
        self.calls = []

    def generate(self, prompts, sampling, progress=False):
        self.calls.append((prompts, sampling))
        return _part(chr(prompts[0][0]), len(prompts), sampling.n)


class _Scorer:
    name, uses_policy = "count", False

    def score(self, prompts, candidates):
        self.seen = candidates
        return ScoreResult([[float(t[0] == "c") for t in g] for g in candidates])


def test_generate_candidates_seeds_each_strategy_and_scores_whole_groups():
    engine, scorer = _Engine(), _Scorer()
    prompts = [PromptVariants([[ord("p"), i], [ord("c"), i]], [0, i]) for i in range(3)]
    recs = [PromptRecord([{"role": "user", "content": str(i)}]) for i in range(3)]
    sampling = SamplingParams(n=5, temperature=1.0, seed=11, prompt_index=0)
    ro, sc, _, _ = generate_candidates(engine, scorer, prompts, recs, sampling, ("plain", "cot"))
    (p0, s0), (p1, s1) = engine.calls
    assert p0 == [[ord("p"), i] for i in range(3)] and p1 == [[ord("c"), i] for i in range(3)]
    assert (s0.n, s1.n) == (3, 2) and s0.seed != s1.seed  # distinct draws per strategy
    assert strategy_sampling(sampling, 1, 2) == s1
    assert scorer.seen == ro.texts and len(ro.texts[0]) == 5  # the scorer saw whole groups
    assert [t[0] for t in ro.texts[0]] == list("pcpcp")
    assert sc.stats == {"reward_mean/plain": 0.0, "reward_mean/cot": 1.0}


# ------------------------------------------------------------------ a tune on the tiny model
def _records(path, words):
    path.write_text("".join(json.dumps({"prompt": f"Say something about {w}."}) + "\n"
                            for w in words))
    return [PromptRecord([{"role": "user", "content": f"Say something about {w}."}])
            for w in words]


def _tune(tmp_path, monkeypatch, tiny_model, name, overrides):
    """A 2-step tune of the tiny model (random scorer); returns what the engine was asked
    (training: temperature 1; held-out: greedy), the samples the learner stepped on, and the
    tokenizer."""
    from tao_fast.models import load_model
    from tao_fast.rl.trainer import Learner
    from tao_fast.rollout.torch_engine import TorchEngine

    train = _records(tmp_path / "train.jsonl", ["cats", "rain", "tea", "maps"])
    held = _records(tmp_path / "heldout_set.jsonl", ["owls", "moss"])
    seen = {"train": [], "eval": [], "samples": []}
    gen, step = TorchEngine.generate, Learner.step

    def generate(self, prompts, sampling, progress=False):
        ro = gen(self, prompts, sampling, progress)
        seen["eval" if sampling.temperature == 0 else "train"].append((list(prompts), ro))
        return ro

    def learner_step(self, samples):
        seen["samples"].extend(samples)
        return step(self, samples)

    monkeypatch.setattr(TorchEngine, "generate", generate)
    monkeypatch.setattr(Learner, "step", learner_step)
    cfg = load_config(overrides=[
        f"model.path={tiny_model}", "model.ops_backend=torch", "rollout.engine=torch",
        f"data.train={tmp_path / 'train.jsonl'}", f"data.eval={tmp_path / 'heldout_set.jsonl'}",
        "scoring.scorer=random", "rollout.n=4", "rollout.max_tokens=4", "eval.max_tokens=3",
        "eval.samples=0", "rl.prompts_per_step=4", "run.steps=2", "run.threads=1",
        "run.progress=false", "run.keep_states=0", f"run.output_dir={tmp_path / name}",
        *overrides])
    tao_fast.tune(cfg)
    tok = load_model(str(tiny_model))[1]
    return seen, tok, train, held


def _ids(tok, recs, strategy):
    return {tuple(encode_prompt(r, tok, strategy)) for r in recs}


@pytest.mark.parametrize("train_prompt", ["plain", "strategy"])
def test_train_prompt_decides_what_the_learner_and_the_eval_see(tmp_path, monkeypatch,
                                                                 tiny_model, train_prompt):
    seen, tok, train, held = _tune(tmp_path, monkeypatch, tiny_model, "cot",
                                   ["rollout.strategy=cot", f"rollout.train_prompt={train_prompt}"])
    cot, plain = _ids(tok, train, "cot"), _ids(tok, train, "plain")
    assert cot.isdisjoint(plain)
    asked = {tuple(p) for prompts, _ in seen["train"] for p in prompts}
    assert asked and asked <= cot  # candidates are generated under the strategy, either way
    trained_on = {tuple(s.ids[:s.prompt_len]) for s in seen["samples"]}
    want_train = plain if train_prompt == "plain" else cot
    assert seen["samples"] and trained_on <= want_train
    responses = {tuple(t) for _, ro in seen["train"] for g in ro.token_ids for t in g}
    assert all(tuple(s.ids[s.prompt_len:]) in responses for s in seen["samples"])
    evaluated = {tuple(p) for prompts, _ in seen["eval"] for p in prompts}
    want_eval = "plain" if train_prompt == "plain" else "cot"
    assert evaluated == _ids(tok, held, want_eval)  # before and after: the model's use


def test_a_mixed_group_is_generated_under_each_strategy_and_laid_out_j_mod_k(
        tmp_path, monkeypatch, tiny_model):
    from tao_fast.scoring.control import RandomScorer

    scored, score = [], RandomScorer.score

    def record_score(self, prompts, candidates):
        if len(candidates[0]) > 1:  # a training step's groups (held-out answers are one each)
            scored.append([list(g) for g in candidates])
        return score(self, prompts, candidates)

    monkeypatch.setattr(RandomScorer, "score", record_score)
    seen, tok, train, held = _tune(tmp_path, monkeypatch, tiny_model, "mixed",
                                   ["rollout.strategy=plain+cot", "rollout.train_prompt=plain"])
    plain, cot = _ids(tok, train, "plain"), _ids(tok, train, "cot")
    calls = seen["train"]
    assert len(calls) == 4 and len(scored) == 2  # 2 steps: one call per strategy, one scoring
    for step in range(2):
        (pp, a), (cp, b) = calls[2 * step], calls[2 * step + 1]
        assert {tuple(p) for p in pp} <= plain and {tuple(p) for p in cp} <= cot
        for i, rec_plain in enumerate(pp):  # the same record, under each strategy
            rec = next(r for r in train if tuple(encode_prompt(r, tok, "plain")) == tuple(
                rec_plain))
            assert cp[i] == encode_prompt(rec, tok, "cot")
        assert [len(g) for g in a.texts] == [len(g) for g in b.texts] == [2] * 4
        assert scored[step] == [[a.texts[p][0], b.texts[p][0], a.texts[p][1], b.texts[p][1]]
                                for p in range(4)]
    trained_on = {tuple(s.ids[:s.prompt_len]) for s in seen["samples"]}
    assert seen["samples"] and trained_on <= plain
    assert {tuple(p) for prompts, _ in seen["eval"] for p in prompts} == _ids(tok, held, "plain")
    metrics = [json.loads(x) for x in (tmp_path / "mixed" / "metrics.jsonl").read_text()
               .splitlines()]
    assert all("reward_mean/plain" in m and "reward_mean/cot" in m for m in metrics)


def test_a_mixed_group_is_refused_under_torchrun(monkeypatch):
    """Several strategies are generated and scored on one process; one strategy shards over
    ranks (generate_and_score), as before. A mock stands in for an active process group."""
    from tao_fast.rl import distributed as dist_

    monkeypatch.setattr(dist_, "active", lambda: True)
    prompts = [PromptVariants([[ord("p"), 0], [ord("c"), 0]], [0])]
    recs = [PromptRecord([{"role": "user", "content": "q"}])]
    with pytest.raises(ConfigError, match=r"rollout\.strategy: plain\+cot .*under torchrun"):
        generate_candidates(_Engine(), _Scorer(), prompts, recs, SamplingParams(n=2, seed=0),
                            ("plain", "cot"))


def test_scale_follows_the_eval_prompt_and_refuses_n_below_the_strategies(tmp_path, monkeypatch,
                                                                           tiny_model):
    """tao-fast scale's best-of-N line answers the prompt the tuned models are evaluated on;
    an N with fewer candidates than strategies is refused before any work."""
    from tao_fast.models import load_model
    from tao_fast.rollout.torch_engine import TorchEngine
    from tao_fast.scale import best_of_n, scale

    train = _records(tmp_path / "train.jsonl", ["cats", "rain"])
    held = _records(tmp_path / "held.jsonl", ["owls", "moss"])
    cfg = load_config(overrides=[
        f"model.path={tiny_model}", "rollout.engine=torch", "scoring.scorer=random",
        f"data.train={tmp_path / 'train.jsonl'}", f"data.eval={tmp_path / 'held.jsonl'}",
        "rollout.strategy=cot+structured", "rollout.train_prompt=plain", "rollout.n=2",
        "eval.max_tokens=3", "run.progress=false"])
    with pytest.raises(ConfigError, match=r"--n: every N must be >= 3, the strategies"):
        scale(load_config(overrides=["rollout.strategy=plain+cot+structured",
                                     "rollout.train_prompt=plain"]), [2, 4], tmp_path / "sc")
    asked, gen = [], TorchEngine.generate
    monkeypatch.setattr(TorchEngine, "generate", lambda self, prompts, sampling, progress=False:
                        asked.append(list(prompts)) or gen(self, prompts, sampling, progress))
    best_of_n(cfg, [1, 2], tmp_path)
    tok = load_model(str(tiny_model))[1]
    assert train and {tuple(p) for p in asked[0]} == _ids(tok, held, "plain")


# ------------------------------------------------------------------ the fewshot strategy
def _fewshot_file(path, pairs):
    path.write_text("".join(json.dumps({"prompt": q, "response": a}) + "\n" for q, a in pairs))
    return path


def test_fewshot_examples_go_before_the_prompt_after_the_system_message(tmp_path, tiny_model):
    from tao_fast.data.prompts import read_fewshot
    from tao_fast.models import load_model

    tok = load_model(str(tiny_model))[1]
    f = _fewshot_file(tmp_path / "shots.jsonl", [("What is 1 + 1?", "2"), ("What is 2 + 5?", "7")])
    turns = read_fewshot(f)
    assert [m["role"] for m in turns] == ["user", "assistant"] * 2
    rec = PromptRecord([{"role": "user", "content": "What is 3 + 4?"}])
    want = tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, *turns,
         {"role": "user", "content": "What is 3 + 4?"}], tokenize=False,
        add_generation_prompt=True)
    got = encode_prompt(rec, tok, "fewshot", "Be brief.", turns)
    assert got == tok(want, add_special_tokens=False)["input_ids"]
    assert encode_prompt(rec, tok, "plain", "Be brief.", turns) == \
        encode_prompt(rec, tok, "plain", "Be brief.")  # the examples belong to fewshot alone
    with pytest.raises(ValueError, match="fewshot strategy needs example turns"):
        encode_prompt(rec, tok, "fewshot")


@pytest.mark.parametrize("lines, message", [
    (['{"prompt": "q"}'], r"shots\.jsonl:1: an example is one user message and its assistant"),
    (['{"prompt": "q", "response": "a"}', "{oops"], r"shots\.jsonl:2: invalid JSON \("),
    (['{"messages": [{"role": "user", "content": "q"}]}'], r"shots\.jsonl:1: an example is"),
    (['{"text": "q"}'], r"shots\.jsonl:1: an example needs 'prompt' and 'response'"),
    ([""], r"needs 1 to 16 examples, has 0"),
    (['{"prompt": "q", "response": "a"}'] * 17, r"needs 1 to 16 examples, has 17"),
])
def test_a_bad_fewshot_file_names_its_line(tmp_path, lines, message):
    from tao_fast.data.prompts import PromptFileError, read_fewshot

    (tmp_path / "shots.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(PromptFileError, match=message):
        read_fewshot(tmp_path / "shots.jsonl")


def test_fewshot_file_and_strategy_come_together():
    with pytest.raises(ConfigError, match=r"rollout\.fewshot_file: is what the fewshot strategy"):
        load_config(overrides=["rollout.strategy=fewshot"])
    with pytest.raises(ConfigError, match=r"rollout\.fewshot_file: is what the fewshot strategy"):
        load_config(overrides=["rollout.fewshot_file=shots.jsonl"])  # would change nothing
    cfg = load_config(overrides=["rollout.strategy=plain+fewshot", "rollout.train_prompt=plain",
                                 "rollout.fewshot_file=shots.jsonl"])
    assert cfg.rollout.strategies == ("plain", "fewshot")


def test_a_missing_fewshot_file_fails_before_the_model_loads(tmp_path, monkeypatch):
    import tao_fast.models

    monkeypatch.setattr(tao_fast.models, "load_model", lambda *a, **k: pytest.fail("loaded"))
    cfg = load_config(overrides=["rollout.strategy=fewshot", f"rollout.fewshot_file="
                                 f"{tmp_path / 'none.jsonl'}", f"run.output_dir={tmp_path / 'r'}"])
    with pytest.raises(FileNotFoundError, match="rollout.fewshot_file .*none.jsonl does not"):
        tao_fast.tune(cfg)


def test_fewshot_candidates_train_the_plain_prompt(tmp_path, monkeypatch, tiny_model):
    shots = _fewshot_file(tmp_path / "shots.jsonl", [("Say something about dogs.", "Dogs bark.")])
    seen, tok, train, held = _tune(tmp_path, monkeypatch, tiny_model, "fewshot", [
        "rollout.strategy=plain+fewshot", "rollout.train_prompt=plain",
        f"rollout.fewshot_file={shots}"])
    from tao_fast.data.prompts import read_fewshot

    turns = read_fewshot(shots)
    plain = _ids(tok, train, "plain")
    fewshot = {tuple(encode_prompt(r, tok, "fewshot", "", turns)) for r in train}
    asked = [{tuple(p) for p in prompts} for prompts, _ in seen["train"]]
    assert asked[0] <= plain and asked[1] <= fewshot  # strategy 1's share under the examples
    assert {tuple(s.ids[:s.prompt_len]) for s in seen["samples"]} <= plain
    assert {tuple(p) for prompts, _ in seen["eval"] for p in prompts} == _ids(tok, held, "plain")
