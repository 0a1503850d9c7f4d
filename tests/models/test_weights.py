"""The one weight-name map (tao_fast/models/weights.py): this model's fused tensors <-> HF's."""
import pytest
import torch

from tao_fast.models.config import ModelArgs
from tao_fast.models.llama import Transformer
from tao_fast.models.weights import from_hf, hf_names, to_hf


def _args(**kw):
    base = dict(vocab_size=50, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                num_kv_heads=2, head_dim=8, qkv_bias=True, tie_word_embeddings=False)
    return ModelArgs(**{**base, **kw})


@pytest.mark.parametrize("tied", [False, True])
def test_round_trip_and_names(tied):
    torch.manual_seed(0)
    args = _args(tie_word_embeddings=tied)
    model = Transformer(args)
    named = dict(model.named_parameters())
    hf = dict(to_hf(named.items(), args))
    q, kv = 4 * 8, 2 * 8
    assert hf["model.layers.1.self_attn.k_proj.weight"].shape == (kv, 32)
    assert torch.equal(hf["model.layers.1.self_attn.v_proj.bias"],
                       named["layers.1.self_attn.qkv_proj.bias"][q + kv:])
    assert torch.equal(hf["model.layers.0.mlp.up_proj.weight"],
                       named["layers.0.mlp.gate_up_proj.weight"][48:])
    assert ("lm_head.weight" in hf) == (not tied)
    assert hf_names("layers.0.mlp.gate_up_proj.weight") == [
        "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight"]
    back = from_hf({**hf, "model.rotary_emb.inv_freq": torch.ones(4)}, args)
    assert back.keys() == named.keys()
    assert all(torch.equal(back[k], named[k]) for k in named)


def test_missing_and_unexpected_tensors_are_named():
    args = _args()
    hf = dict(to_hf(Transformer(args).named_parameters(), args))
    with pytest.raises(ValueError, match="model.layers.1.self_attn.k_proj.weight"):
        from_hf({k: v for k, v in hf.items() if k != "model.layers.1.self_attn.k_proj.weight"},
                args)
    with pytest.raises(ValueError, match="unexpected tensors in checkpoint: \\['extra.weight'\\]"):
        from_hf({**hf, "extra.weight": torch.zeros(1)}, args)
