"""A LoRA tune end to end (the torch engine, a tiny model): SIGKILLed and resumed it lands on the
same adapter as an uninterrupted run; only the adapter trains (states hold it alone, the base
bytes are the base's); its checkpoint is a PEFT adapter that `peft` loads to the same
log-probs as ours, and run.merge_lora's merged/ is the same model as an HF checkpoint."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tao_fast.models import load_model, lora

pytestmark = pytest.mark.slow


def write_config(tmp_path, name, model):
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(
        f"model:\n  path: {model}\n  ops_backend: torch\n  lora: {{rank: 4, alpha: 8}}\n"
        "data:\n  train: prompts.jsonl\n"
        "scoring:\n  scorer: random\n"
        "rollout:\n  engine: torch\n  n: 2\n  max_tokens: 6\n  temperature: 1.0\n"
        "rl:\n  prompts_per_step: 2\n  lr: 1.0e-2\n"
        "eval:\n  before: false\n  after: false\n"
        f"run:\n  steps: 5\n  output_dir: {name}\n  progress: false\n  threads: 1\n"
        "  save_every: 2\n  merge_lora: true\n")
    return tmp_path / name, cfg


def cli(*args, cwd, env=None):
    return subprocess.Popen([sys.executable, "-m", "tao_fast.cli", *map(str, args)], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})


def _logprobs(model, ids):
    from tao_fast.rl.packing import make_packed_batch

    b = make_packed_batch([ids], device="cpu")
    with torch.no_grad():
        h = model(b.input_ids, b.positions, b.cu_seqlens, b.max_seqlen)
        return torch.log_softmax(model.logits(h).float(), -1)  # [T, V]


def test_lora_tune_resumes_trains_only_the_adapter_and_saves_peft(tmp_path, tiny_model):
    (tmp_path / "prompts.jsonl").write_text("".join(
        json.dumps({"prompt": f"Say something about {w}."}) + "\n"
        for w in ("cats", "rain", "tea", "maps", "jazz")))
    ref, ref_cfg = write_config(tmp_path, "ref", tiny_model)
    killed, killed_cfg = write_config(tmp_path, "killed", tiny_model)
    p = cli("tune", "--config", ref_cfg, cwd=tmp_path)
    q = cli("tune", "--config", killed_cfg, cwd=tmp_path, env={"TAO_FAST_KILL_AT": "4"})
    out = q.communicate(timeout=300)[0]
    assert q.returncode == -signal.SIGKILL, out
    assert p.wait(timeout=300) == 0, p.stdout.read()
    state = load_file(str(killed / "state" / "step-000002" / "model.safetensors"))
    assert state and all(lora.is_adapter(k) for k in state)  # the adapters alone
    r = cli("tune", "--resume", killed, cwd=tmp_path)
    out = r.communicate(timeout=300)[0]
    assert r.returncode == 0 and "round 1, step 3" in out, out
    assert "LoRA rank 4" in out

    a = load_file(str(ref / "checkpoint-round1" / lora.ADAPTER_WEIGHTS))
    b = load_file(str(killed / "checkpoint-round1" / lora.ADAPTER_WEIGHTS))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.endswith("lora_B.weight") and a[k].abs().max() > 0 for k in a)  # it trained
    assert len(a) == 2 * 7 * 2  # A and B, seven modules, two layers
    conf = json.loads((ref / "checkpoint-round1" / lora.ADAPTER_CONFIG).read_text())
    assert conf["r"] == 4 and conf["lora_alpha"] == 8 and conf["base_model_name_or_path"]

    # the merged checkpoint: the base's bytes plus B @ A where adapters are; the rest the base's
    base = load_file(str(tiny_model / "model.safetensors"))
    merged = load_file(str(ref / "checkpoint-round1" / "merged" / "model.safetensors"))
    assert set(merged) == set(base)
    assert torch.equal(merged["model.norm.weight"], base["model.norm.weight"])
    assert not torch.equal(merged["model.layers.0.self_attn.q_proj.weight"],
                           base["model.layers.0.self_attn.q_proj.weight"])

    # peft loads the adapter onto the HF base: the same log-probs as ours and as merged/
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = [1, 504, 3458, 282, 4649, 314, 9, 77]
    hf = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    peft = PeftModel.from_pretrained(hf, ref / "checkpoint-round1").eval()
    with torch.no_grad():
        want = torch.log_softmax(peft(torch.tensor([ids])).logits[0].float(), -1)
        with peft.disable_adapter():
            plain = torch.log_softmax(peft(torch.tensor([ids])).logits[0].float(), -1)
    assert (want - plain).abs().max() > 1e-3  # the adapter matters to peft too
    for path in (ref / "checkpoint-round1", ref / "checkpoint-round1" / "merged"):
        model, tok, _ = load_model(str(path))
        model.ops_backend = "torch"
        assert tok is not None and not lora.is_lora(model)  # merged on load: a plain model
        torch.testing.assert_close(_logprobs(model, ids), want, rtol=0, atol=2e-5)
