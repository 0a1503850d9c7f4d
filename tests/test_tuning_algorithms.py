"""The algorithms through the whole recipe on the tiny model: DAPO's dynamic sampling fills the
batch with groups that carry signal, or stops at its bound; several epochs and minibatches show
in the step's metrics; bon-sft trains. The scorer is a user function that gives signal only to
prompts that ask for it, so which groups have signal is known."""
import json

import tao_fast

SCORER = '''
def signal_if_asked(prompt, candidates):
    if "split" in prompt:
        return [float(i % 2) for i in range(len(candidates))]
    return [0.0] * len(candidates)
'''


def _run(tmp_path, monkeypatch, tiny_model, words, *overrides):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "user_scorer.py").write_text(SCORER)
    (tmp_path / "prompts.jsonl").write_text("".join(
        json.dumps({"prompt": f"Say {w}."}) + "\n" for w in words))
    tao_fast.tune(overrides=[
        f"model.path={tiny_model}", "model.ops_backend=torch", "data.train=prompts.jsonl",
        "scoring.scorer=python:user_scorer:signal_if_asked", "rollout.engine=torch",
        "rollout.n=2", "rollout.max_tokens=4", "rollout.temperature=1.0",
        "rl.prompts_per_step=2", "rl.lr=1e-3", "eval.before=false", "eval.after=false",
        "run.output_dir=run", "run.progress=false", "run.threads=1", "run.keep_states=0",
        *overrides])
    return [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]


def test_dynamic_sampling_fills_the_batch(tmp_path, monkeypatch, tiny_model):
    # 2 of 6 prompts give signal; one batch of 2 rarely holds both, 4 batches always do
    lines = _run(tmp_path, monkeypatch, tiny_model,
                 ["split one", "flat a", "flat b", "split two", "flat c", "flat d"],
                 "rl.algorithm=dapo", "rl.overlong=none", "run.steps=2")
    for m in lines:
        assert m["signal_groups"] == 2 and 0 <= m["dynamic_rounds"] <= 3
        assert m["samples"] == 4  # 2 groups x 2 candidates
        assert m["gen_tokens"] <= 2 * 2 * 4 * (1 + m["dynamic_rounds"])
    assert any(m["dynamic_rounds"] > 0 for m in lines)


def test_dynamic_sampling_stops_at_its_bound(tmp_path, monkeypatch, tiny_model):
    lines = _run(tmp_path, monkeypatch, tiny_model, ["flat a", "flat b", "flat c"],
                 "rl.algorithm=dapo", "rl.overlong=none", "rl.dynamic_sampling=2", "run.steps=1")
    (m,) = lines
    assert m["dynamic_rounds"] == 2 and m["signal_groups"] == 0 and "skipped" in m


def test_epochs_and_minibatches_in_the_metrics(tmp_path, monkeypatch, tiny_model):
    lines = _run(tmp_path, monkeypatch, tiny_model, ["split a", "split b"],
                 "rl.epochs=2", "rl.minibatches=2", "run.steps=1")
    (m,) = lines
    assert m["optimizer_steps"] == 4 and len(m["updates"]) == 4
    assert "dynamic_rounds" not in m  # grpo: one batch per step
    for key in ("entropy", "clip_frac", "ratio_mean", "loss", "grad_norm"):
        assert all(key in u for u in m["updates"]), key
    assert m["entropy"] > 0


def test_bon_sft_tunes(tmp_path, monkeypatch, tiny_model):
    (m,) = _run(tmp_path, monkeypatch, tiny_model, ["split a", "flat b"],
                "rl.algorithm=bon-sft", "rl.prompts_per_step=2", "run.steps=1")
    assert m["samples"] == 1 and m["sft_chosen_reward_mean"] == 1.0  # the split group's best
    assert m["loss"] > 0  # a negative log-likelihood
