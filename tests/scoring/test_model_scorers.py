"""Model-backed scorers for real: a reward model the test builds and saves, the LLM judge
served by the embedded model through the torch engine, and a 2-step tune with a mixed scorer."""
import json

import pytest
import torch

import tao_fast
from tao_fast.config import ConfigError
from tao_fast.data import PromptRecord
from tao_fast.rollout.torch_engine import TorchEngine
from tao_fast.scoring import build_scorer
from tao_fast.scoring.judge import JudgeScorer

pytestmark = pytest.mark.slow


def rec(q):
    return PromptRecord([{"role": "user", "content": q}])


@pytest.fixture(scope="module")
def tiny_rm(tmp_path_factory, embedded):
    """A 2-layer Llama reward head with the embedded tokenizer, saved as safetensors."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    _, tok, _ = embedded
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      num_labels=1, pad_token_id=tok.pad_token_id or tok.eos_token_id)
    model = LlamaForSequenceClassification(cfg).eval()
    out = tmp_path_factory.mktemp("rm")
    model.save_pretrained(out)  # safetensors
    tok.save_pretrained(out)
    return out, model, tok


def test_reward_model_batched_equals_one_by_one(tiny_rm):
    path, model, tok = tiny_rm
    rm = build_scorer({"type": "reward_model", "path": str(path), "batch_size": 3})
    prompts = [rec("Name a colour."), rec("What is 2 + 2? Answer briefly, please.")]
    cands = [["Red.", "Blue is a colour, and so is green.", "7"], ["4", "Four."]]
    res = rm.score(prompts, cands)
    for p, group in zip(prompts, cands):  # unpadded, one at a time, straight from transformers
        for c, text in enumerate(group):
            msgs = [*p.messages, {"role": "assistant", "content": text}]
            ids = tok(tok.apply_chat_template(msgs, tokenize=False), return_tensors="pt",
                      add_special_tokens=False)
            with torch.inference_mode():
                want = model(**ids).logits[0, 0].item()
            got = res.rewards[prompts.index(p)][c]
            assert abs(got - want) < 1e-4 * max(1.0, abs(want)), (text, got, want)
    assert res.num_failures == 0 and len(set(r for g in res.rewards for r in g)) == 5
    assert not rm.uses_policy and rm.check(prompts) is None  # the Scorer protocol's defaults


def test_reward_model_refuses_pickle_only_dirs(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ConfigError, match="pickle"):
        build_scorer({"type": "reward_model", "path": str(tmp_path)})


@pytest.fixture(scope="module")
def judge_engine(embedded):
    model, tok, _ = embedded
    return TorchEngine(model, tok), tok


class CountingEngine:
    """The real engine, counting generate calls (the judge must batch a whole score())."""

    def __init__(self, engine):
        self.engine, self.calls, self.prompts = engine, 0, 0

    def generate(self, prompts, sampling, progress=False):
        self.calls += 1
        self.prompts += len(prompts)
        return self.engine.generate(prompts, sampling, progress)


@pytest.mark.parametrize("mode,calls", [("pointwise", 5), ("listwise", 2), ("pairwise", 8)])
def test_judge_modes_on_the_embedded_model(judge_engine, mode, calls):
    engine, tok = judge_engine
    counting = CountingEngine(engine)
    judge = JudgeScorer(mode=mode, engine=counting, tokenizer=tok, max_tokens=12)
    prompts = [rec("What is the capital of France?"), rec("What is 3 + 4?")]
    cands = [["Paris.", "The capital of France is Paris.", "Berlin"], ["7", "12"]]
    res = judge.score(prompts, cands)
    assert counting.calls == 1 and counting.prompts == calls  # one batched generate
    unparsed = 0
    for group, rs, ds in zip(cands, res.rewards, res.details):
        assert len(rs) == len(group) and len(ds) == len(group)
        for r, d in zip(rs, ds):
            if "error" in d:
                unparsed += 1
                assert r == 0.0
            else:
                assert 0.0 <= r <= 1.0
    assert res.num_failures == unparsed


def test_judge_loads_its_own_model_and_reports_what_it_said():
    judge = build_scorer({"type": "judge", "model": "embedded:smollm2-135m-instruct",
                          "template": "Rate this answer to '{prompt}': {response}\n"
                                      "Reply 'Score: N' with N from 1 to 10.",
                          "max_tokens": 8})
    res = judge.score([rec("Say hi.")], [["Hi!", "Goodbye."]])
    assert all("judge_reply" in d or "error" in d for d in res.details[0])
    assert not judge.uses_policy  # its own model, not the policy's engine
    with pytest.raises(ConfigError, match="placeholder"):
        build_scorer({"type": "judge", "model": "embedded", "template": "no slots {prompt}"})


def test_two_step_tune_with_a_gated_mix(tmp_path, monkeypatch, embedded):
    """Format gate -> consensus vote + the policy judging itself; failures and stats logged."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompts.jsonl").write_text("\n".join(json.dumps(
        {"prompt": f"What is {a} + {b}? Reply with just the number."})
        for a, b in ((2, 3), (10, 7), (4, 4))) + "\n")
    scorer = {"type": "mix", "parts": [
        {"scorer": {"type": "regex", "pattern": r"\d"}, "gate": True},
        {"scorer": "consensus", "weight": 1.0},
        {"scorer": {"type": "judge", "max_tokens": 8}, "weight": 0.5, "normalize": "minmax"},
    ]}
    cfg = tao_fast.load_config(overrides=[
        "model.ops_backend=torch", "data.train=prompts.jsonl", "rollout.n=3",
        "rollout.engine=torch",
        "rollout.max_tokens=8", "rollout.temperature=1.0", "rl.prompts_per_step=2",
        "eval.before=false", "eval.after=false", "run.steps=2", "run.output_dir=run",
        "run.progress=false", "run.keep_states=0",
        "run.checkpoint_dtype=bfloat16"])
    cfg.scoring.scorer = scorer
    res = tao_fast.tune(cfg)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2] and res.checkpoint.exists()
    for m in lines:
        assert "consensus/majority_rate" in m and "mix/gate_pass_rate" in m
        per_scorer = sum(v for k, v in m.items() if k.startswith("score_failures/"))
        assert m["score_failures"] == per_scorer
