"""SamplingParams: the sampling checks shared with rollout.* (written once, in
config.check_sampling), and SamplingParams.from_config, each rollout field shown to change the
torch engine's samples the way it claims (the 2-layer random-weight model: milliseconds)."""
import dataclasses

import pytest

from tao_fast.config import ConfigError, RolloutConfig
from tao_fast.models import load_model
from tao_fast.rollout import SamplingParams
from tao_fast.rollout.torch_engine import TorchEngine

PROMPTS = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10], [11, 12]]


@pytest.fixture(scope="module")
def engine(tiny_model):
    model, tok, _ = load_model(str(tiny_model))
    model.ops_backend = "torch"
    return TorchEngine(model, tok, max_batch_rows=256)


@pytest.mark.parametrize("field,bad,good", [
    ("n", 0, 1), ("temperature", -0.1, 0.0), ("top_p", 0.0, 1.0), ("top_p", 1.5, 1.0),
    ("max_tokens", 0, 1)])
def test_one_check_for_config_and_params(field, bad, good):
    with pytest.raises(ConfigError, match=rf"^rollout.{field}: must be"):
        RolloutConfig(**{field: bad})
    with pytest.raises(ValueError, match=rf"^SamplingParams.{field}: must be"):
        SamplingParams(**{field: bad})
    assert getattr(RolloutConfig(**{field: good}), field) == good
    assert getattr(SamplingParams(**{field: good}), field) == good


def _gen(engine, sp, prompts=PROMPTS[:2]):
    return engine.generate(prompts, sp)


def test_from_config_n(engine):
    sp = SamplingParams.from_config(RolloutConfig(n=3, max_tokens=4), seed=1)
    assert sp.n == 3
    assert [len(g) for g in _gen(engine, sp).token_ids] == [3, 3]
    one = SamplingParams.from_config(RolloutConfig(n=1, max_tokens=4), seed=1)
    assert [len(g) for g in _gen(engine, one).token_ids] == [1, 1]


def test_from_config_max_tokens(engine):
    sp = SamplingParams.from_config(RolloutConfig(n=4, max_tokens=3), seed=1)
    assert sp.max_tokens == 3
    ro = _gen(engine, sp)
    for group, reasons in zip(ro.token_ids, ro.finish_reasons):
        for t, r in zip(group, reasons):
            assert len(t) <= 3 and (r == "stop" or len(t) == 3)
    longer = _gen(engine, SamplingParams.from_config(RolloutConfig(n=4, max_tokens=7), seed=1))
    assert max(len(t) for g in longer.token_ids for t in g) > 3


def test_from_config_temperature(engine):
    greedy = [SamplingParams.from_config(RolloutConfig(n=2, temperature=0.0, max_tokens=6),
                                         seed=s) for s in (1, 2)]
    assert greedy[0].temperature == 0.0
    a, b = (_gen(engine, sp).token_ids for sp in greedy)
    assert a == b and all(g[0] == g[1] for g in a)  # greedy: the seed changes nothing
    hot = [SamplingParams.from_config(RolloutConfig(n=2, temperature=1.0, max_tokens=6),
                                      seed=s) for s in (1, 2)]
    assert hot[0].temperature == 1.0
    assert _gen(engine, hot[0]).token_ids != _gen(engine, hot[1]).token_ids


def test_from_config_top_p(engine):
    """A nucleus of one token: every sample is the greedy token, with log-prob 0 (probability
    1 after top-p), whatever the seed; top_p=1 samples the whole distribution."""
    tight = SamplingParams.from_config(RolloutConfig(n=2, top_p=1e-6, max_tokens=6), seed=3)
    assert tight.top_p == 1e-6 and tight.temperature == 1.0
    greedy = _gen(engine, SamplingParams(n=2, temperature=0.0, max_tokens=6)).token_ids
    ro = _gen(engine, tight)
    assert ro.token_ids == greedy
    assert all(lp == 0.0 for g in ro.logprobs for lps in g for lp in lps)
    full = _gen(engine, SamplingParams.from_config(RolloutConfig(n=2, max_tokens=6), seed=3))
    assert full.token_ids != greedy
    assert all(lp < 0.0 for g in full.logprobs for lps in g for lp in lps)


def test_from_config_seed(engine):
    ro = RolloutConfig(n=2, max_tokens=6)
    sp = SamplingParams.from_config(ro, seed=5)
    assert sp.seed == 5
    assert _gen(engine, sp).token_ids == _gen(engine, SamplingParams.from_config(
        ro, seed=5)).token_ids
    assert _gen(engine, sp).token_ids != _gen(engine, SamplingParams.from_config(
        ro, seed=6)).token_ids


def test_from_config_prompt_index_makes_samples_independent_of_the_split(engine):
    """prompt_index=0: the slices two ranks sample (their prompt_index set to their start, as
    rollout_shards.generate_and_score does) are the whole list's samples; without it they are not."""
    engine = TorchEngine(engine.model, engine.tokenizer, max_batch_rows=3)  # one prompt a chunk
    sp = SamplingParams.from_config(RolloutConfig(n=3, max_tokens=5), seed=7)
    assert sp.prompt_index == 0
    whole = engine.generate(PROMPTS, sp)
    a = engine.generate(PROMPTS[:3], sp)
    b = engine.generate(PROMPTS[3:], dataclasses.replace(sp, prompt_index=3))
    assert a.token_ids + b.token_ids == whole.token_ids
    plain = dataclasses.replace(sp, prompt_index=None)
    whole = engine.generate(PROMPTS, plain)
    b = engine.generate(PROMPTS[3:], plain)
    assert b.token_ids != whole.token_ids[3:]
