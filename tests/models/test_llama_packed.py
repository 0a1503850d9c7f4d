"""Packed forward of the in-house decoder == running each sequence alone.

A tiny random Llama-shaped model (GQA 6:2, qkv bias, 2 layers, fp32). Several sequences of
random lengths (1, and lengths that are not multiples of 16, some spanning several attention
blocks) are packed back to back; the per-token log-probs of the next token (via
ops.linear_logprob) must equal those of each sequence run on its own with the torch backend,
and so must the gradients of a scalar loss w.r.t. every weight. The packed run uses the torch
backend, and the Triton kernels in the Triton interpreter (TRITON_INTERPRET=1, set by
tests/conftest.py; skipped where triton is missing or its interpreter cannot run the
attention kernel's loops on this numpy).
"""
import importlib.util

import pytest
import torch

from tao_fast import ops
from tao_fast.kernels.reference import IGNORE_INDEX
from tao_fast.models.config import ModelArgs
from tao_fast.models.llama import Transformer
from tao_fast.rl.packing import make_packed_batch

LENGTHS = [1, 5, 17, 50, 33]  # 106 tokens; 50 spans two 32-token q blocks in the interpreter
RTOL = 1e-5


def _triton_reason():
    """None when the Triton path can run here, else why not."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    from tao_fast.kernels.attention import interpreter_unsupported_reason

    return interpreter_unsupported_reason()


def _model():
    torch.manual_seed(0)
    args = ModelArgs(vocab_size=300, hidden_size=64, intermediate_size=96, num_layers=2,
                     num_heads=6, num_kv_heads=2, head_dim=16, qkv_bias=True,
                     rope_theta=10000.0, model_type="qwen2")
    model = Transformer(args).float()
    with torch.no_grad():  # non-trivial norms and biases, so their gradients are tested too
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif n.endswith("bias"):
                p.normal_(0, 0.3)
    return model


def _data():
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 300, (n,), generator=g) for n in LENGTHS]
    # position t predicts token t + 1; the last token of each sequence predicts nothing
    targets = [torch.cat([s[1:], torch.tensor([IGNORE_INDEX])]) for s in seqs]
    weights = [torch.randn(n, generator=g) for n in LENGTHS]  # per-token loss weights
    return seqs, targets, weights


def _logp(model, seqs, targets):
    """Per-token log-probs [T] of `seqs` packed into one batch, with model.ops_backend."""
    batch = make_packed_batch(seqs)
    hidden = model(batch.input_ids, batch.positions, batch.cu_seqlens, batch.max_seqlen)  # [T, H]
    return ops.linear_logprob(hidden, model.output_weight, torch.cat(targets),
                              backend=model.ops_backend)  # [T]


def _run(model, seqs, targets, weights, packed: bool):
    """(logp [T], {param: grad}) of loss = sum(logp * weights), packed or one sequence at a time."""
    model.zero_grad(set_to_none=True)
    if packed:
        logp = _logp(model, seqs, targets)
        (logp * torch.cat(weights)).sum().backward()
    else:
        parts = []
        for s, t, w in zip(seqs, targets, weights):
            lp = _logp(model, [s], [t])
            (lp * w).sum().backward()  # gradients accumulate over the sequences
            parts.append(lp.detach())
        logp = torch.cat(parts)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return logp.detach(), grads


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_packed_matches_per_sequence(backend):
    if backend == "triton" and (why := _triton_reason()):
        pytest.skip(why)
    model = _model()
    seqs, targets, weights = _data()
    model.ops_backend = "torch"
    ref_logp, ref_grads = _run(model, seqs, targets, weights, packed=False)
    assert ref_logp.shape == (sum(LENGTHS),)
    assert ref_logp[torch.cat(targets) == IGNORE_INDEX].eq(0).all()

    model.ops_backend = backend
    logp, grads = _run(model, seqs, targets, weights, packed=True)
    torch.testing.assert_close(logp, ref_logp, rtol=RTOL, atol=RTOL)
    assert _rel(logp, ref_logp) <= RTOL
    for name, ref in ref_grads.items():
        assert torch.isfinite(grads[name]).all(), name
        assert _rel(grads[name], ref) <= RTOL, (name, _rel(grads[name], ref))
