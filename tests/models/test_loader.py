"""load_model with the model section (ModelConfig: path, dtype, gradient_checkpointing) and
with a plain path (fp32, no checkpointing), on the 2-layer model directory."""
import pytest
import torch

from tao_fast.config import ModelConfig
from tao_fast.models import load_model


def _saved_tensors(model) -> int:
    """Tensors autograd keeps for backward in one packed forward with grad."""
    ids = torch.arange(1, 33)
    count = [0]

    def pack(t):
        count[0] += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        h = model(ids, torch.arange(32), torch.tensor([0, 32], dtype=torch.int32), 32)
    h.float().square().mean().backward()
    return count[0]


def test_model_config_dtype(tiny_model):
    ref, tok, path = load_model(str(tiny_model))  # the plain path: fp32
    assert all(p.dtype == torch.float32 for p in ref.parameters())
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        model, tok2, path2 = load_model(ModelConfig(path=str(tiny_model), dtype=name))
        assert path2 == path and tok2 is not None
        for (n, p), (m, q) in zip(model.named_parameters(), ref.named_parameters()):
            assert n == m and p.dtype == dtype
            assert torch.equal(p, q.to(dtype))
        assert model.inv_freq.dtype == torch.float32
    bf16, _, _ = load_model(str(tiny_model), dtype=torch.bfloat16)  # a path with a dtype
    assert bf16.embed_tokens.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="load_model: dtype=.* with a ModelConfig.*model.dtype"):
        load_model(ModelConfig(path=str(tiny_model)), dtype=torch.bfloat16)


def test_model_config_gradient_checkpointing(tiny_model):
    plain, _, _ = load_model(str(tiny_model))
    off, _, _ = load_model(ModelConfig(path=str(tiny_model)))
    on, _, _ = load_model(ModelConfig(path=str(tiny_model), gradient_checkpointing=True))
    for m in (plain, off, on):
        m.ops_backend = "torch"
    assert not plain.gradient_checkpointing and not off.gradient_checkpointing
    assert on.gradient_checkpointing
    kept_off, kept_on = _saved_tensors(off), _saved_tensors(on)
    assert kept_on < kept_off / 2, (kept_on, kept_off)  # layers recompute instead of keeping
    for p, q in zip(on.parameters(), off.parameters()):  # the same gradients either way
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)


# ---- a model that cannot be loaded: one line naming the path, no traceback -------------------
@pytest.fixture
def bad_models(tmp_path, tiny_model, monkeypatch):
    import shutil

    monkeypatch.setenv("TAO_FAST_CACHE", str(tmp_path / "cache"))
    out = {}
    (tmp_path / "model.bin").write_bytes(b"\x80\x04pickle")
    out["bin"] = tmp_path / "model.bin"
    for name, cut in (("corrupt", None), ("truncated", 5000)):
        d = out[name] = tmp_path / name
        shutil.copytree(tiny_model, d)
        data = (tiny_model / "model.safetensors").read_bytes()
        (d / "model.safetensors").write_bytes(b"\xff" * 64 + data[64:] if cut is None
                                              else data[:cut])
    (tmp_path / "junk.gguf").write_bytes(b"this is not a gguf file at all")
    (tmp_path / "short.gguf").write_bytes(b"GGUF\x03\x00\x00\x00junk")  # magic, then cut
    out["junk.gguf"], out["short.gguf"] = tmp_path / "junk.gguf", tmp_path / "short.gguf"
    d = out["badconfig"] = tmp_path / "badconfig"
    shutil.copytree(tiny_model, d)
    (d / "config.json").write_text('{"model_type": "llama"}')
    return out


@pytest.mark.parametrize("case, message", [
    ("bin", r"model\.bin: pickle checkpoints are not loaded"),
    ("corrupt", r"corrupt/model\.safetensors: not a readable safetensors file, corrupt or "
                r"truncated \(.*header"),
    ("truncated", r"truncated/model\.safetensors: not a readable safetensors file"),
    ("junk.gguf", r"junk\.gguf: not a GGUF file \(it starts with b'this'"),
    ("short.gguf", r"short\.gguf: cannot read this GGUF file \(error: "),
    ("badconfig", r"badconfig/config\.json: no 'vocab_size': not a decoder config"),
])
def test_unloadable_models_are_config_errors_naming_the_path(bad_models, tmp_path, case, message,
                                                            capsys):
    from tao_fast.cli import main
    from tao_fast.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_model(str(bad_models[case]))
    assert main(["eval", "--model", str(bad_models[case]), "--n", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tao-fast: error: ") and err.count("\n") == 1 and \
        str(bad_models[case]) in err
    assert not (tmp_path / "cache" / "models").exists() or \
        not any((tmp_path / "cache" / "models").iterdir())  # nothing converted, nothing left


def test_unknown_embedded_name_is_a_config_error(capsys):
    from tao_fast.cli import main
    from tao_fast.config import ConfigError

    with pytest.raises(ConfigError, match=r"embedded:nosuch: unknown embedded model"):
        load_model("embedded:nosuch")
    assert main(["eval", "--model", "embedded:nosuch", "--n", "1"]) == 2
    assert "unknown embedded model" in capsys.readouterr().err
