"""In-house decoder vs transformers, on the embedded model and on tiny random Qwen2 / Llama 3."""
import json

import pytest
import torch
from safetensors.torch import save_file

from tao_fast.models import load_model
from tao_fast.models.llama import KVCache


def _packed(seqs):
    ids = torch.tensor([t for s in seqs for t in s])
    pos = torch.cat([torch.arange(len(s)) for s in seqs])
    cu = torch.tensor([0] + list(torch.tensor([len(s) for s in seqs]).cumsum(0)), dtype=torch.int32)
    return ids, pos, cu, max(map(len, seqs))


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _check_parity(model, hf, seqs, tol):
    with torch.no_grad():
        ids, pos, cu, mx = _packed(seqs)
        logits = model.logits(model(ids, pos, cu, mx))  # [T, V]
        for j, s in enumerate(seqs):
            ref = hf(torch.tensor([s])).logits[0]
            assert _rel(logits[cu[j]:cu[j + 1]], ref) <= tol


@pytest.mark.slow
def test_embedded_logits_match_transformers(embedded):
    from transformers import AutoModelForCausalLM

    model, tok, path = embedded
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    seqs = [tok("What is 23 + 45?")["input_ids"],
            tok("The quick brown fox jumps over the lazy dog. " * 6)["input_ids"], [1]]
    _check_parity(model, hf, seqs, 1e-4)  # packed: three sequences, one of a single token


def _tiny_hf(tmp_path, kind):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    if kind == "qwen2":
        hf = Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=False))
    else:  # Llama 3 with its long-context rope scaling, untied head, GQA 4:2
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64}
        hf = LlamaForCausalLM(LlamaConfig(**common, rope_parameters=rope,
                                          tie_word_embeddings=False))
    with torch.no_grad():  # random biases: Qwen2's qkv bias must be applied, not ignored
        for n, p in hf.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.5)
    hf.eval()
    hf.save_pretrained(tmp_path)
    assert list(tmp_path.glob("*.safetensors"))
    return hf


@pytest.mark.parametrize("kind", ["qwen2", "llama3"])
def test_tiny_architectures_match_transformers(tmp_path, kind):
    hf = _tiny_hf(tmp_path, kind)
    model, _, _ = load_model(str(tmp_path))
    assert model.args.qkv_bias == (kind == "qwen2")
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 211, (n,), generator=g).tolist() for n in (1, 37, 150)]
    _check_parity(model, hf, seqs, 1e-5)


def test_cached_forward_matches_packed(tmp_path):
    """The engine's padded KV-cache path computes the same logits as the packed path."""
    _tiny_hf(tmp_path, "llama3")
    model, _, _ = load_model(str(tmp_path))
    seqs = [[5, 6, 7, 8, 9], [10, 11]]
    ids, pos, cu, mx = _packed(seqs)
    with torch.no_grad():
        ref = model.logits(model(ids, pos, cu, mx))
        cache = KVCache(model.args, 2, 8, torch.float32, "cpu")
        L = 5
        pad_ids = torch.tensor([[5, 6, 7, 8, 9], [0, 0, 0, 10, 11]])
        pad_pos = torch.tensor([[0, 1, 2, 3, 4], [0, 0, 0, 0, 1]])
        key_mask = torch.tensor([[True] * 8, [False] * 3 + [True] * 5])
        prefill = model.logits(model.forward_cached(pad_ids[:, :L - 1], pad_pos[:, :L - 1], cache, key_mask))
        step = model.logits(model.forward_cached(pad_ids[:, L - 1:], pad_pos[:, L - 1:], cache, key_mask))
    assert torch.isfinite(prefill).all()  # pad rows see their own slot: no NaN leaks
    torch.testing.assert_close(prefill[0], ref[:4], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(step[0, 0], ref[4], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(prefill[1, 3], ref[5], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(step[1, 0], ref[6], rtol=1e-5, atol=1e-5)


def test_refuses_pickle_and_bad_dirs(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(FileNotFoundError, match="pickle files are never loaded"):
        load_model(str(tmp_path))
    with pytest.raises(ValueError, match="pickle checkpoints are not loaded"):
        load_model(str(tmp_path / "pytorch_model.bin"))
    with pytest.raises(FileNotFoundError, match="not 'embedded'"):
        load_model(str(tmp_path / "nowhere"))


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="unsupported architecture"):
        load_model(str(tmp_path))
