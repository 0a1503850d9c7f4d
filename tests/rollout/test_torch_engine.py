"""The torch rollout engine on the embedded model: greedy = transformers' generate, sampled
log-probs = the learner's log-probs of the same tokens, top-p, stop tokens, shapes."""
import pytest
import torch

from tao_fast import ops
from tao_fast.data import PromptRecord
from tao_fast.data.prompts import encode_prompt
from tao_fast.rollout import SamplingParams
from tao_fast.rollout.torch_engine import TorchEngine, sample_tokens

pytestmark = pytest.mark.slow


def _prompts(tok, qs):
    return [encode_prompt(PromptRecord([{"role": "user", "content": q}]), tok) for q in qs]


def test_greedy_matches_transformers(embedded):
    from transformers import AutoModelForCausalLM

    model, tok, path = embedded
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = _prompts(tok, ["What is 23 + 45?", "Name a colour.", "Hi"])  # different lengths
    ro = TorchEngine(model, tok).generate(prompts, SamplingParams(temperature=0, max_tokens=12))
    for p, got in zip(prompts, ro.token_ids):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False)[0, len(p):]
        assert got[0] == ref.tolist()[:len(got[0])]


def test_sampled_logprobs_match_learner(embedded):
    model, tok, _ = embedded
    prompts = _prompts(tok, ["What is 61 + 17?", "Count to three."])
    sp = SamplingParams(n=3, temperature=0.7, max_tokens=10, seed=5)
    ro = TorchEngine(model, tok).generate(prompts, sp)
    assert len(ro.token_ids) == 2 and all(len(g) == 3 for g in ro.token_ids)
    for p, group, lps in zip(prompts, ro.token_ids, ro.logprobs):
        for resp, lp in zip(group, lps):
            ids = torch.tensor(p + resp)
            with torch.no_grad():
                h = model(ids, torch.arange(len(ids)), torch.tensor([0, len(ids)], dtype=torch.int32),
                          len(ids))
                ref = ops.linear_logprob(h[len(p) - 1:-1], model.output_weight,
                                         torch.tensor(resp), temperature=0.7, backend="torch")
            torch.testing.assert_close(torch.tensor(lp), ref, rtol=0, atol=2e-4)
    again = TorchEngine(model, tok).generate(prompts, sp)
    assert again.token_ids == ro.token_ids  # seeded sampling is reproducible


def test_stop_tokens_and_finish_reasons(embedded):
    model, tok, _ = embedded
    prompts = _prompts(tok, ["What is 2 + 2?"])
    eng = TorchEngine(model, tok)
    free = eng.generate(prompts, SamplingParams(temperature=0, max_tokens=8)).token_ids[0][0]
    ro = eng.generate(prompts, SamplingParams(temperature=0, max_tokens=8,
                                              stop_token_ids=(free[2],)))
    assert ro.token_ids[0][0] == free[:free.index(free[2]) + 1]
    assert ro.finish_reasons[0][0] == "stop"
    short = eng.generate(prompts, SamplingParams(temperature=0, max_tokens=3))
    assert len(short.token_ids[0][0]) == 3 and short.finish_reasons[0][0] == "length"


def test_top_p_keeps_the_nucleus():
    logits = torch.tensor([[3.0, 2.0, 0.0, -1.0]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    tok, lp = sample_tokens(logits, 1.0, 0.8, g)
    p = torch.softmax(logits[0], -1)  # 0.705, 0.259, 0.035, 0.013: nucleus 0.8 = first two
    assert set(tok.tolist()) == {0, 1}
    renorm = torch.log(p[:2] / p[:2].sum())
    torch.testing.assert_close(lp[tok == 0][0], renorm[0])
    torch.testing.assert_close(lp[tok == 1][0], renorm[1])
    tok1, _ = sample_tokens(logits, 1.0, 0.01, g)  # tiny top_p = greedy
    assert (tok1 == 0).all()
