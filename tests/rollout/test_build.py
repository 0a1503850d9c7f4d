"""build_engine on the rollout section: the torch engine when vLLM is absent or not asked for
(sharing the learner's tensors, or a copy in rollout.dtype), the ConfigErrors when vLLM is
asked for and cannot be used. vLLM's availability is monkeypatched (compat.vllm_status /
vllm_installed / import_vllm): these tests run with or without vLLM installed and never
start it; tests/rollout/test_vllm_engine.py builds the real one."""
import pytest
import torch

from tao_fast.config import ConfigError, RolloutConfig
from tao_fast.models import load_model
from tao_fast.rollout import build_engine
from tao_fast.rollout.torch_engine import TorchEngine
from tao_fast.rollout.vllm import compat


@pytest.fixture(scope="module")
def tiny(tiny_model):
    model, tok, path = load_model(str(tiny_model))  # fp32
    model.ops_backend = "torch"
    return model, tok, path


def _build(ro, tiny):
    model, tok, path = tiny
    return build_engine(ro, model, tok, model_dir=path, seed=0)


def _no_vllm(monkeypatch):
    monkeypatch.setattr(compat, "vllm_installed", lambda: False)


def test_torch_engine_when_asked_shares_the_learners_tensors(tiny, monkeypatch):
    def never(*a, **k):
        raise AssertionError("rollout.engine=torch must not look at vLLM")

    monkeypatch.setattr(compat, "vllm_status", never)
    eng = _build(RolloutConfig(engine="torch", max_batch_rows=7), tiny)
    assert isinstance(eng, TorchEngine) and eng.name == "torch"
    assert eng.model is tiny[0]  # rollout.dtype float32 = the model's: no copy
    assert eng.max_batch_rows == 7  # rollout.max_batch_rows reaches the engine
    assert _build(RolloutConfig(engine="torch"), tiny).max_batch_rows == 256


def test_bf16_copy_when_rollout_dtype_differs(tiny):
    model = tiny[0]
    eng = _build(RolloutConfig(engine="torch", dtype="bfloat16"), tiny)
    assert eng.model is not model
    for (n, p), (m, q) in zip(eng.model.named_parameters(), model.named_parameters()):
        assert n == m and p.dtype == torch.bfloat16 and q.dtype == torch.float32
        assert not p.requires_grad and p.data_ptr() != q.data_ptr()
        assert torch.equal(p, q.to(torch.bfloat16))
    assert eng.model.inv_freq.dtype == torch.float32  # rotary frequencies stay fp32


def test_auto_without_vllm_is_the_torch_engine_quietly(tiny, monkeypatch, capsys):
    _no_vllm(monkeypatch)
    eng = _build(RolloutConfig(engine="auto"), tiny)
    assert eng.name == "torch" and eng.model is tiny[0]
    assert "rollout engine" not in capsys.readouterr().err  # nothing to explain: not installed


def test_auto_with_an_unusable_vllm_says_why(tiny, monkeypatch, capsys):
    monkeypatch.setattr(compat, "vllm_installed", lambda: True)
    monkeypatch.setattr(compat, "vllm_status", lambda: (False, "vLLM 0.31.0 is too old"))
    assert _build(RolloutConfig(engine="auto"), tiny).name == "torch"
    assert ("[tao-fast] rollout engine: torch (vLLM not used: vLLM 0.31.0 is too old)"
            in capsys.readouterr().err)


def test_vllm_asked_for_and_unusable_is_a_config_error(tiny, monkeypatch):
    monkeypatch.setattr(compat, "vllm_status", lambda: (False, "vLLM is not installed (x)"))
    with pytest.raises(ConfigError, match=r"^rollout.engine=vllm: vLLM is not installed \(x\)$"):
        _build(RolloutConfig(engine="vllm"), tiny)

    def broken():  # installed and in range, but the import fails
        raise compat.VllmUnavailable("vLLM is installed but fails to import (boom)")

    monkeypatch.setattr(compat, "vllm_status", lambda: (True, "0.32.0"))
    monkeypatch.setattr(compat, "import_vllm", broken)
    with pytest.raises(ConfigError, match=r"rollout.engine=vllm: .*fails to import \(boom\)"):
        _build(RolloutConfig(engine="vllm"), tiny)
    assert _build(RolloutConfig(engine="auto"), tiny).name == "torch"  # auto falls back


def test_tensor_parallel_without_vllm_is_a_config_error(tiny, monkeypatch):
    with pytest.raises(ConfigError, match=r"rollout.tensor_parallel=2 .* \(rollout.engine=torch\)$"):
        _build(RolloutConfig(engine="torch", tensor_parallel=2), tiny)
    _no_vllm(monkeypatch)
    with pytest.raises(ConfigError, match=r"rollout.engine=auto: vLLM is not installed"):
        _build(RolloutConfig(engine="auto", tensor_parallel=2), tiny)


def test_auto_gives_a_lora_model_on_the_cpu_the_torch_engine(tiny_model, monkeypatch, capsys):
    """rollout.engine=auto, a LoRA learner on the CPU: the torch engine (vLLM's CPU LoRA ops are
    slow, bench/RESULTS.md), on the learner's own tensors, vLLM never looked at."""
    from tao_fast.config import LoraConfig, ModelConfig

    def never(*a, **k):
        raise AssertionError("auto with LoRA on the CPU must not start vLLM")

    monkeypatch.setattr(compat, "vllm_status", never)
    model, tok, path = load_model(ModelConfig(path=str(tiny_model), lora=LoraConfig(rank=2)))
    eng = build_engine(RolloutConfig(engine="auto"), model, tok, model_dir=path, seed=0)
    assert isinstance(eng, TorchEngine) and eng.model is model
    assert "model.lora on the CPU" in capsys.readouterr().err
