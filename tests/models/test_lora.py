"""LoRA on the in-house decoder (tao_fast/models/lora.py): the adapted model's log-probs are the
merged model's, each setting acts (targets, rank, alpha, dropout, base dtype), only the adapters
train, the KL reference is the base, and the PEFT files load back."""
import copy

import pytest
import torch

from tao_fast.config import ConfigError, LoraConfig, RLConfig, load_config
from tao_fast.kernels import reference
from tao_fast.models import lora
from tao_fast.models.config import ModelArgs
from tao_fast.models.llama import Transformer
from tao_fast.rl.packing import make_packed_batch
from tao_fast.rl.state import latest_state, load_state, save_state
from tao_fast.rl.trainer import Learner, Sample


def tiny(seed=0, dtype=torch.float64, **kw):
    torch.manual_seed(seed)
    args = ModelArgs(**{**dict(vocab_size=61, hidden_size=24, intermediate_size=40,
                               num_layers=2, num_heads=3, num_kv_heads=1, head_dim=8), **kw})
    m = Transformer(args).to(dtype)
    m.ops_backend = "torch"
    return m


def adapted(cfg: LoraConfig, seed=0, dtype=torch.float64):
    """A tiny model with adapters whose B is random (B = 0 at init would test nothing)."""
    m = lora.apply_lora(tiny(seed, dtype), cfg, dtype)
    m.to(dtype)  # the adapters too: float64 end to end for the comparisons
    with torch.no_grad():
        for n, p in lora.adapter_parameters(m):
            p.normal_(0.0, 0.3)
    return m


def logprobs(model, seqs):
    """Next-token log-probs [T] of packed sequences under the model."""
    batch = make_packed_batch(seqs, device="cpu")
    h = model(batch.input_ids, batch.positions, batch.cu_seqlens, batch.max_seqlen)  # [T, H]
    targets = torch.cat([torch.tensor(s[1:] + [-100]) for s in seqs])  # [T]
    return reference.linear_logprob(h, model.output_weight, targets)[0]


SEQS = [[1, 5, 9, 2, 33, 7], [4, 4, 60, 12], [8, 3, 17, 21, 40, 41, 42, 5, 6]]


@pytest.mark.parametrize("targets", ["all-linear", "q_proj,v_proj,down_proj", "up_proj"])
def test_logprobs_equal_the_merged_models(targets):
    m = adapted(LoraConfig(rank=4, alpha=8, target_modules=targets))
    merged = lora.merge_adapters(copy.deepcopy(m))
    assert not any(isinstance(x, lora.LoraLinear) for x in merged.modules())
    base = tiny(0)
    a, b, c = logprobs(m, SEQS), logprobs(merged, SEQS), logprobs(base, SEQS)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert (a - c).abs().max() > 1e-3  # the adapters do change the model


def test_each_target_gets_an_adapter_and_only_it():
    m = adapted(LoraConfig(rank=2, target_modules=["k_proj", "gate_proj", "o_proj"]))
    names = {n.split(".", 2)[2] for n, _ in lora.adapter_parameters(m)}
    assert names == {"self_attn.qkv_proj.lora_A.k_proj", "self_attn.qkv_proj.lora_B.k_proj",
                     "self_attn.o_proj.lora_A.o_proj", "self_attn.o_proj.lora_B.o_proj",
                     "mlp.gate_up_proj.lora_A.gate_proj", "mlp.gate_up_proj.lora_B.gate_proj"}
    qkv = m.layers[0].self_attn.qkv_proj
    assert qkv.lora_A["k_proj"].shape == (2, 24) and qkv.lora_B["k_proj"].shape == (8, 2)
    # only the k rows of the fused output move: q and v are the base's
    x = torch.randn(5, 24, dtype=torch.float64)
    d = qkv(x) - torch.nn.functional.linear(x, qkv.weight)  # [5, (3 + 1 + 1) * 8]
    assert d[:, :24].abs().max() == 0 and d[:, 32:].abs().max() == 0
    assert d[:, 24:32].abs().max() > 0
    assert not list(m.layers[0].mlp.down_proj.parameters())[1:]  # no adapter on down_proj


def test_alpha_and_rank_scale_the_update():
    m = adapted(LoraConfig(rank=4, alpha=8, target_modules="o_proj"))
    o = m.layers[1].self_attn.o_proj
    x = torch.randn(3, 24, dtype=torch.float64)
    base = torch.nn.functional.linear(x, o.weight)
    want = 2.0 * x @ o.lora_A["o_proj"].t() @ o.lora_B["o_proj"].t()  # alpha / r = 2
    torch.testing.assert_close(o(x) - base, want, rtol=1e-12, atol=1e-12)
    o.scale = 0.5  # as alpha=2 would make it
    torch.testing.assert_close(o(x) - base, want / 4, rtol=1e-12, atol=1e-12)


def test_a_fresh_adapter_is_the_base_and_adapters_off_is_the_base():
    base = tiny(0)
    fresh = lora.apply_lora(tiny(0), LoraConfig(rank=8), torch.float64)
    assert torch.equal(logprobs(fresh, SEQS), logprobs(base, SEQS))  # B = 0 at init
    m = adapted(LoraConfig(rank=4))
    with lora.adapters_off(m):
        assert torch.equal(logprobs(m, SEQS), logprobs(base, SEQS))
    assert not torch.equal(logprobs(m, SEQS), logprobs(base, SEQS))  # back on after the block


def test_dropout_acts_only_while_training():
    m = adapted(LoraConfig(rank=4, dropout=0.5))
    same = adapted(LoraConfig(rank=4, dropout=0.0))
    m.eval()
    assert torch.equal(logprobs(m, SEQS), logprobs(same, SEQS))
    m.train()
    torch.manual_seed(1)
    assert not torch.allclose(logprobs(m, SEQS), logprobs(same, SEQS))


def test_base_dtype_freezes_the_base_in_it_and_keeps_fp32_adapters():
    m = lora.apply_lora(tiny(0, torch.float32), LoraConfig(rank=4), torch.bfloat16)
    for n, p in m.named_parameters():
        want = torch.float32 if lora.is_adapter(n) else torch.bfloat16
        assert p.dtype == want and p.requires_grad == lora.is_adapter(n), n
    assert m.inv_freq.dtype == torch.float32
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert lora.base_dtype(LoraConfig(rank=1), torch.float32, gpu) == torch.bfloat16
    assert lora.base_dtype(LoraConfig(rank=1), torch.float32, cpu) == torch.float32  # no bf16 CPU
    assert lora.base_dtype(LoraConfig(rank=1, base_dtype="bfloat16"), torch.float32,
                           cpu) == torch.bfloat16


def test_lora_config_is_checked_and_named():
    assert LoraConfig(target_modules="q_proj, v_proj").targets == ("q_proj", "v_proj")
    assert LoraConfig(target_modules=["down_proj", "q_proj"]).targets == ("q_proj", "down_proj")
    assert len(LoraConfig().targets) == 7
    for kw, key in ((dict(rank=-1), "model.lora.rank"), (dict(alpha=0), "model.lora.alpha"),
                    (dict(dropout=1.0), "model.lora.dropout"),
                    (dict(target_modules="qkv_proj"), "model.lora.target_modules"),
                    (dict(base_dtype="fp8"), "model.lora.base_dtype")):
        with pytest.raises(ConfigError, match=key):
            LoraConfig(**kw)
    cfg = load_config(None, ["model.lora.rank=8", "model.lora.target_modules=[q_proj,v_proj]"])
    assert cfg.model.lora.targets == ("q_proj", "v_proj")
    with pytest.raises(ConfigError, match="run.merge_lora"):
        load_config(None, ["run.merge_lora=true"])


def _samples():
    g = torch.Generator().manual_seed(0)
    out = []
    for i, seq in enumerate(SEQS):
        n_resp = len(seq) - 2
        out.append(Sample(seq, 2, [1.0, -1.0, 0.5][i], (-torch.rand(n_resp, generator=g)).tolist()))
    return out


def test_only_the_adapters_train_and_the_kl_reference_is_the_base():
    m = lora.apply_lora(tiny(0, torch.float32), LoraConfig(rank=4), torch.float32)
    base_before = {n: p.clone() for n, p in m.named_parameters() if not lora.is_adapter(n)}
    learner = Learner(m, RLConfig(lr=1e-2, kl_coef=0.1), temperature=1.0, ops_backend="torch")
    assert learner.ref is None  # no frozen copy: the base is the reference
    assert {id(p) for p in learner.trainable} == {id(p) for _, p in lora.adapter_parameters(m)}
    ref_calls = []
    orig = lora.adapters_off
    lora_off = lambda model: (ref_calls.append(1), orig(model))[1]  # noqa: E731
    lora.adapters_off = lora_off
    try:
        first = learner.step(_samples())
        second = learner.step(_samples())
    finally:
        lora.adapters_off = orig
    assert ref_calls  # the reference's log-probs came from the base (adapters off)
    assert first["kl"] == pytest.approx(0.0, abs=1e-9)  # B = 0: policy = reference at first
    assert second["kl"] > 0
    for n, p in m.named_parameters():
        if not lora.is_adapter(n):
            assert torch.equal(p, base_before[n]), n  # the base's bytes never change
    assert all(p.abs().max() > 0 for n, p in lora.adapter_parameters(m) if ".lora_B." in n)
    assert [n for n, _ in learner.named_sync_parameters()] == [
        n for n, _ in lora.adapter_parameters(m)]


def test_a_lora_state_holds_the_adapters_alone_and_resumes(tmp_path):
    def make():
        m = lora.apply_lora(tiny(0, torch.float32), LoraConfig(rank=4), torch.float32)
        return Learner(m, RLConfig(lr=1e-2), temperature=1.0, ops_backend="torch")

    a = make()
    a.step(_samples())
    save_state(tmp_path, 1, a.model, a.opt, a.sched, {})
    from safetensors.torch import load_file

    saved = load_file(str(latest_state(tmp_path) / "model.safetensors"))
    assert set(saved) == {n for n, _ in lora.adapter_parameters(a.model)}
    b = make()
    load_state(latest_state(tmp_path), b.model, b.opt, b.sched)
    torch.manual_seed(5)
    a.step(_samples())
    torch.manual_seed(5)
    b.step(_samples())
    for (n, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.equal(p, q), n


def test_the_triton_kernels_train_the_adapters_as_the_torch_ops_do():
    """The LoRA path through the fused kernels (Triton interpreter): linear log-prob on the
    frozen head (no weight gradient), varlen attention's backward into the adapters, pg_loss;
    two steps agree with the torch references."""
    pytest.importorskip("triton")
    stats, adapters = {}, {}
    for backend in ("torch", "triton"):
        m = lora.apply_lora(tiny(0, torch.float32, hidden_size=32, num_heads=2, head_dim=16),
                            LoraConfig(rank=4), torch.float32)
        learner = Learner(m, RLConfig(lr=1e-2, kl_coef=0.05, micro_batch_tokens=16),
                          temperature=0.7, ops_backend=backend)
        stats[backend] = [learner.step(_samples()) for _ in range(2)]
        adapters[backend] = dict(lora.adapter_parameters(m))
        assert m.output_weight.grad is None  # the frozen head got no gradient
    for a, b in zip(stats["torch"], stats["triton"]):
        for k in ("loss", "kl", "grad_norm", "entropy"):
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), k
    for n, p in adapters["torch"].items():
        torch.testing.assert_close(adapters["triton"][n], p, rtol=1e-4, atol=1e-5)
