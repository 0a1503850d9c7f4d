"""model.autocast and rollout.dtype=auto: which CPUs get bf16 by default; that the autocast
setting changes the learner's arithmetic (bf16 matmuls, fp32 master weights) within bf16's
error, and the sampler's dtype what the torch engine runs."""
from types import SimpleNamespace

import pytest
import torch

from tao_fast.config import ConfigError, RLConfig, load_config
from tao_fast.dtypes import cpu_flags, learner_autocast, sampler_dtype
from tao_fast.models.config import ModelArgs
from tao_fast.models.llama import Transformer
from tao_fast.rl.trainer import Learner, Sample

XEON_AVX512 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_vnni\n"
SAPPHIRE = "flags\t\t: fpu avx2 avx512f avx512_bf16 amx_tile amx_bf16\n"


def test_auto_follows_the_cpus_bf16_support():
    cpu = torch.device("cpu")
    assert learner_autocast("auto", cpu, cpu_flags(XEON_AVX512)) is None
    assert learner_autocast("auto", cpu, cpu_flags(SAPPHIRE)) is torch.bfloat16
    assert learner_autocast("auto", cpu, cpu_flags("no flags line")) is None
    assert learner_autocast("bfloat16", cpu, set()) is torch.bfloat16
    assert learner_autocast("none", cpu, cpu_flags(SAPPHIRE)) is None
    assert learner_autocast("auto", torch.device("meta"), cpu_flags(SAPPHIRE)) is None
    with pytest.raises(ValueError, match="model.autocast=bfloat16 applies to a CPU learner"):
        learner_autocast("bfloat16", torch.device("meta"), set())
    with pytest.raises(ConfigError, match="model.autocast: must be one of"):
        load_config(overrides=["model.autocast=fp8"])


def test_sampler_dtype_auto_follows_the_cpu_and_else_the_learner():
    cpu, meta = torch.device("cpu"), torch.device("meta")
    assert sampler_dtype("auto", torch.float32, cpu, cpu_flags(XEON_AVX512)) is torch.float32
    assert sampler_dtype("auto", torch.float32, cpu, cpu_flags(SAPPHIRE)) is torch.bfloat16
    assert sampler_dtype("auto", torch.bfloat16, meta, cpu_flags(SAPPHIRE)) is torch.bfloat16
    assert sampler_dtype("auto", torch.float32, meta, cpu_flags(SAPPHIRE)) is torch.float32
    assert sampler_dtype("bfloat16", torch.float32, cpu, set()) is torch.bfloat16
    assert sampler_dtype("float32", torch.float32, cpu, cpu_flags(SAPPHIRE)) is torch.float32
    assert load_config().rollout.dtype == "auto"
    with pytest.raises(ConfigError, match="rollout.dtype: must be one of"):
        load_config(overrides=["rollout.dtype=fp8"])


def test_the_torch_engine_samples_in_the_dtype_auto_picks(monkeypatch):
    """rollout.dtype=auto: on a CPU without native bf16 the engine samples on the learner's own
    tensors; on one with it, from a bf16 copy."""
    import tao_fast.dtypes
    from tao_fast.config import RolloutConfig
    from tao_fast.rollout.build import build_engine

    torch.manual_seed(0)
    model = Transformer(ModelArgs(vocab_size=64, hidden_size=32, intermediate_size=64,
                                  num_layers=1, num_heads=2, num_kv_heads=1))
    ro, tok = RolloutConfig(engine="torch"), SimpleNamespace(eos_token_id=None)  # no text here
    assert build_engine(ro, model, tok, model_dir="", seed=0).model is model
    monkeypatch.setattr(tao_fast.dtypes, "cpu_flags", lambda cpuinfo=None: cpu_flags(SAPPHIRE))
    copy = build_engine(ro, model, tok, model_dir="", seed=0).model
    assert copy is not model and copy.embed_tokens.weight.dtype == torch.bfloat16


def _learner(autocast):
    torch.manual_seed(0)
    m = Transformer(ModelArgs(vocab_size=64, hidden_size=32, intermediate_size=64,
                              num_layers=2, num_heads=2, num_kv_heads=1))
    return Learner(m, RLConfig(lr=1e-3, epochs=2), temperature=1.0, ops_backend="torch",
                   autocast=autocast)


def _samples():
    g = torch.Generator().manual_seed(3)
    return [Sample(torch.randint(0, 64, (n + 4,), generator=g).tolist(), 4, a, [-1.0] * n)
            for n, a in ((9, 1.0), (5, -1.0), (7, 0.5))]


def test_bf16_autocast_changes_the_arithmetic_within_bf16_error():
    samples = _samples()
    fp32, bf16 = _learner("none"), _learner("bfloat16")
    old32, _ = fp32._old_logprobs(samples, [fp32._plan(samples, [0, 1, 2])])
    old16, _ = bf16._old_logprobs(samples, [bf16._plan(samples, [0, 1, 2])])
    for i in range(3):
        d = (old32[i] - old16[i]).abs().max()
        assert 0 < d < 0.05  # bf16 matmuls: different, by about bf16's 2^-8 relative error
    st = bf16.step(samples)
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())  # master weights
    assert st["grad_norm"] > 0 and st["updates"][1]["ratio_mean"] != 1.0
