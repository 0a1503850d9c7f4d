"""End to end on the embedded model: a 2-step tune changes the weights, logs metrics and
writes a checkpoint that plain transformers loads and generates from."""
import json

import pytest
import torch
from safetensors.torch import load_file

import tao_fast
from tao_fast.config import load_config

pytestmark = pytest.mark.slow

SCORER = '''
def longer_is_better(prompt, candidates):
    return [float(len(c)) for c in candidates]
'''


def test_two_step_tune_writes_loadable_checkpoint(tmp_path, monkeypatch, embedded):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "user_scorer.py").write_text(SCORER)
    (tmp_path / "prompts.jsonl").write_text("\n".join(json.dumps(
        {"prompt": f"Write a word that rhymes with {w}."}) for w in ("cat", "sun", "tree")) + "\n")
    (tmp_path / "tune.yaml").write_text(
        "model:\n  ops_backend: torch\n"
        "data:\n  train: prompts.jsonl\n"
        "scoring:\n  scorer: python:user_scorer:longer_is_better\n"
        "rollout:\n  engine: torch\n  n: 3\n  max_tokens: 12\n  dtype: bfloat16\n"
        "rl:\n  prompts_per_step: 2\n  lr: 1.0e-4\n  micro_batch_tokens: 64\n"
        "eval:\n  before: false\n  after: false\n"
        "run:\n  steps: 2\n  output_dir: run\n  progress: false\n  keep_states: 0\n"
        "  checkpoint_dtype: bfloat16\n")
    res = tao_fast.tune(str(tmp_path / "tune.yaml"))

    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2]
    for key in ("reward_mean", "reward_std", "zero_signal_frac", "kl", "clip_frac",
                "gen_tokens_per_s", "train_tokens_per_s", "step_seconds", "grad_norm"):
        assert key in lines[0], key
    assert lines[0]["micro_batches"] >= 2  # 64-token budget: the batch was split and packed
    assert lines[0]["sampler_logprob_abs_diff"] < 0.5  # bf16 sampler vs fp32 learner, same weights

    ckpt = res.checkpoint
    assert ckpt == tmp_path / "run" / "checkpoint-round1"
    assert not list((tmp_path / "run").glob("*.tmp-*"))  # nothing half-written left behind
    assert not (tmp_path / "run" / "state").exists()  # keep_states=0: 1.6 GB not written
    assert json.loads((ckpt / "config.json").read_text())["torch_dtype"] == "bfloat16"
    base, _, base_dir = embedded
    new = load_file(str(ckpt / "model.safetensors"))
    old = load_file(str(base_dir / "model.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in new.values())
    changed = [k for k in old if not torch.equal(old[k].to(torch.bfloat16), new[k])]
    assert len(changed) > len(old) // 2  # the update moved most tensors

    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(ckpt)
    out = hf.generate(**tok("What is 2 + 2?", return_tensors="pt"), max_new_tokens=5,
                      do_sample=False)
    assert out.shape[1] > 0 and isinstance(tok.decode(out[0]), str)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2 and len(summary["reward_curve"]) == 2


def test_tune_rejects_bad_config_before_loading(tmp_path):
    with pytest.raises(ValueError, match="cannot load"):
        tao_fast.tune(load_config(overrides=["scoring.scorer=python:nope_module:f",
                                             f"run.output_dir={tmp_path / 'r'}"]))
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        tao_fast.tune(load_config(overrides=[f"data.train={tmp_path / 'missing.jsonl'}",
                                             f"run.output_dir={tmp_path / 'r'}"]))


def test_evaluate_python_api(embedded):
    model, tok, _ = embedded
    res = tao_fast.evaluate(model, ["What is 10 + 10?", "What is 3 + 4?"], "arithmetic",
                            load_config(overrides=["eval.max_tokens=16"]), tokenizer=tok)
    assert res.n == 2 and 0.0 <= res.accuracy <= 1.0 and res.ci_low <= res.accuracy <= res.ci_high
    assert all("response" in r and "expected" in r for r in res.records)


def test_evaluate_sampled_and_best_of_n(embedded):
    """Same seed, same samples: an oracle selector's best-of-3 can't be below pass@1."""
    model, tok, _ = embedded
    qs = [f"What is {a} + {b}?" for a, b in ((12, 30), (7, 8), (41, 16), (5, 55))]
    cfg = load_config(overrides=["eval.max_tokens=16", "rollout.temperature=0.7",
                                 "eval.samples=3", "run.seed=1"])
    kw = dict(tokenizer=tok, sampled=True)
    sampled = tao_fast.evaluate(model, qs, "arithmetic", cfg, **kw)
    best = tao_fast.evaluate(model, qs, "arithmetic", cfg, select="arithmetic", **kw)
    assert (sampled.mode, best.mode, sampled.samples) == ("sampled", "best_of_n", 3)
    assert all(r["samples"] == 3 for r in sampled.records)
    assert best.accuracy >= sampled.accuracy
    for r_s, r_b in zip(sampled.records, best.records):  # per prompt: any correct -> picked
        assert r_b["score"] >= (1.0 if r_s["accuracy"] > 0 else 0.0)
    with pytest.raises(ValueError, match="needs rollout.temperature > 0"):
        tao_fast.evaluate(model, qs, "arithmetic",
                          load_config(overrides=["rollout.temperature=0", "eval.samples=2"]),
                          tokenizer=tok, sampled=True)
