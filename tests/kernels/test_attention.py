"""Triton varlen attention (kernels/attention.py) in the Triton interpreter vs a float64 oracle.

The oracle is plain softmax attention run on each sequence separately in float64 (not the
packed torch reference). Shapes stay small: the interpreter runs every program in Python.
Outputs are poisoned (NaN) before the kernels write them: given preallocated, or allocated by
the op under utils.DEBUG_POISON.
"""
import pytest

triton = pytest.importorskip("triton")

import torch  # noqa: E402

from tao_fast import ops  # noqa: E402
from tao_fast.kernels import attention as attn  # noqa: E402
from tao_fast.kernels import utils  # noqa: E402


_SKIP = attn.interpreter_unsupported_reason()
pytestmark = pytest.mark.skipif(_SKIP is not None, reason=str(_SKIP))


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    """Buffers the op allocates itself (outputs, delta) start as NaN: unwritten shows."""
    monkeypatch.setattr(utils, "DEBUG_POISON", True)


def _cu(lens):
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens).cumsum(0)
    return cu


def _oracle(q, k, v, lens, causal, scale, dtype=torch.float64):
    """Per-sequence softmax attention in `dtype` (float64: the oracle; fp16: torch's error)."""
    rep = q.shape[1] // k.shape[1]
    outs, s0 = [], 0
    for n in lens:
        qs = q[s0:s0 + n].to(dtype)  # [n, Hq, D]
        ks = k[s0:s0 + n].to(dtype).repeat_interleave(rep, 1)  # [n, Hq, D]
        vs = v[s0:s0 + n].to(dtype).repeat_interleave(rep, 1)
        s = torch.einsum("qhd,khd->hqk", qs, ks) * scale  # [Hq, n, n]
        if causal:
            s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        outs.append(torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), vs))  # [n, Hq, D]
        s0 += n
    return torch.cat(outs)


def _inputs(lens, Hq, Hkv, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    T = sum(lens)
    q, k, v = (torch.randn(T, h, D, generator=g).to(dtype) for h in (Hq, Hkv, Hkv))
    dout = torch.randn(T, Hq, D, generator=g).to(dtype)
    return q, k, v, dout


def _oracle_grads(q, k, v, dout, lens, causal, scale, dtype):
    xs = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
    out = _oracle(*xs, lens, causal, scale, dtype)
    return (out, *torch.autograd.grad(out, xs, dout.to(dtype)))


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _random_lens(seed, n, hi):
    """n random lengths in [2, hi] plus a 1, shuffled (seeded)."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(2, hi + 1, (n,), generator=g).tolist() + [1]
    return [lens[i] for i in torch.randperm(n + 1, generator=g).tolist()]


# (lens, Hq, Hkv, D, dtype, causal): lengths include 1, 0 (empty sequence) and values that are
# not multiples of the interpreter's 16/32 blocks; GQA ratios 1, 3, 4, 8.
CASES = [
    (_random_lens(0, 7, 90), 8, 1, 64, torch.float32, True),
    (_random_lens(1, 5, 70), 6, 2, 64, torch.float16, True),
    ([1, 17, 40, 64, 5], 2, 2, 64, torch.float32, True),
    ([33, 1, 0, 70], 3, 1, 64, torch.float32, True),
    ([50, 9, 1], 8, 1, 64, torch.float32, True),
    ([31, 1, 48], 4, 1, 64, torch.float32, False),
    ([40, 3], 4, 2, 128, torch.float32, True),
    ([1, 45, 20], 3, 1, 64, torch.float16, True),
    ([1, 45, 20], 2, 1, 128, torch.float16, False),
    ([37, 1, 12], 4, 1, 64, torch.bfloat16, True),  # interpreter upcasts bf16 before tl.dot
]


@pytest.mark.parametrize("lens,Hq,Hkv,D,dtype,causal", CASES)
def test_forward_backward_vs_float64(lens, Hq, Hkv, D, dtype, causal):
    q, k, v, dout = _inputs(lens, Hq, Hkv, D, dtype, seed=sum(lens) + Hq)
    cu, T = _cu(lens), sum(lens)
    scale = D ** -0.5 if causal else 0.3  # non-default scale in the non-causal case
    nan = float("nan")
    out = torch.full_like(q, nan)  # poisoned: every element must be written
    lse = torch.full((Hq, T), nan)
    attn.varlen_attention_forward(q, k, v, cu, max(lens), causal, scale, out=out, lse=lse)
    grads = [torch.full_like(x, nan) for x in (q, k, v)]
    attn.varlen_attention_backward(dout, q, k, v, out, lse, cu, max(lens), causal, scale, *grads)
    for name, x in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads)):
        assert not x.isnan().any(), f"{name} has unwritten (NaN) elements"

    ref = _oracle_grads(q, k, v, dout, lens, causal, scale, torch.float64)
    if dtype == torch.float32:
        bounds = [1e-5] * 4  # measured 1e-7..4e-7
    else:  # bounded by 2x the error of plain torch attention run in this dtype, plus a floor
        low = _oracle_grads(q, k, v, dout, lens, causal, scale, dtype)
        bounds = [2 * _rel(a, b) + 1e-6 for a, b in zip(low, ref)]
    for name, got, want, bound in zip(("out", "dq", "dk", "dv"), (out, *grads), ref, bounds):
        assert _rel(got, want) < bound, f"{name}: rel err {_rel(got, want):.2e} >= {bound:.2e}"

    # lse is the natural-log logsumexp of the scaled scores of each (head, token).
    if dtype == torch.float32 and causal:
        n, rep = lens[0], Hq // Hkv
        s = torch.einsum("qhd,khd->hqk", q[:n].double(),
                         k[:n].double().repeat_interleave(rep, 1)) * scale
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        torch.testing.assert_close(lse[:, :n].double(), torch.logsumexp(s, -1),
                                   rtol=1e-5, atol=1e-5)


def _gpu_tile_shapes():
    """The distinct (fwd, preprocess, dkdv, dq) configs of the GPU table, named by (dtype, D)."""
    shapes = {}
    for key, cfgs in attn._GPU_CONFIGS.items():
        shapes.setdefault(str(cfgs), (key, cfgs))
    return [pytest.param(cfgs, id=f"{str(k[0]).removeprefix('torch.')}-D{k[1]}")
            for k, cfgs in shapes.values()]


@pytest.mark.parametrize("cfgs", _gpu_tile_shapes())
def test_gpu_tile_shapes_in_the_interpreter(monkeypatch, cfgs):
    """Each GPU config's block shapes (e.g. dkdv with BLOCK_M > BLOCK_N) run in the interpreter
    at D=64 fp32 against the float64 oracle, so a config no GPU ran is still correct."""
    monkeypatch.setattr(attn, "_INTERP_CONFIGS", cfgs)
    lens, Hq, Hkv, D = [1, 70, 33, 140], 2, 1, 64
    q, k, v, dout = _inputs(lens, Hq, Hkv, D, torch.float32, seed=11)
    cu, scale = _cu(lens), D ** -0.5
    out, lse = attn.varlen_attention_forward(q, k, v, cu, max(lens), True, scale)
    grads = attn.varlen_attention_backward(dout, q, k, v, out, lse, cu, max(lens), True, scale)
    ref = _oracle_grads(q, k, v, dout, lens, True, scale, torch.float64)
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), ref):
        assert _rel(got, want) < 1e-5, f"{name}: rel err {_rel(got, want):.2e}"


def test_autograd_deterministic_and_ops_backends():
    lens, Hq, Hkv, D = [29, 1, 44], 4, 2, 64
    q, k, v, dout = _inputs(lens, Hq, Hkv, D, torch.float32, seed=7)
    cu = _cu(lens)

    def run(backend):
        xs = [x.clone().requires_grad_() for x in (q, k, v)]
        out = ops.varlen_attention(*xs, cu, max(lens), causal=True, backend=backend)
        return (out, *torch.autograd.grad(out, xs, dout))

    tri1, tri2, ref = run("triton"), run("triton"), run("torch")
    for a, b in zip(tri1, tri2):  # no atomics: bitwise equal run to run
        assert torch.equal(a, b)
    for name, a, b in zip(("out", "dq", "dk", "dv"), tri1, ref):
        assert _rel(a, b) < 2e-5, f"{name}: triton vs torch backend rel err {_rel(a, b):.2e}"


def test_strided_views_of_fused_qkv():
    """q/k/v as views into one fused [T, Hq + 2 Hkv, D] projection (token stride != H*D)."""
    lens, Hq, Hkv, D = [20, 35], 4, 1, 64
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(sum(lens), Hq + 2 * Hkv, D, generator=g)
    q, k, v = qkv[:, :Hq], qkv[:, Hq:Hq + Hkv], qkv[:, Hq + Hkv:]
    cu = _cu(lens)
    got = attn.varlen_attention(q, k, v, cu, max(lens))
    want = attn.varlen_attention(q.contiguous(), k.contiguous(), v.contiguous(), cu, max(lens))
    assert torch.equal(got, want)


def test_input_errors():
    q, k, v = torch.randn(8, 4, 64), torch.randn(8, 2, 64), torch.randn(8, 2, 64)
    cu = _cu([3, 5])
    with pytest.raises(ValueError, match="head dim"):
        attn.varlen_attention(torch.randn(8, 4, 48), torch.randn(8, 2, 48), torch.randn(8, 2, 48),
                              cu, 5)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        attn.varlen_attention(torch.randn(8, 3, 64), k, v, cu, 5)
    with pytest.raises(ValueError, match="int32"):
        attn.varlen_attention(q, k, v, cu.long(), 5)
    with pytest.raises(ValueError, match="share a dtype"):
        attn.varlen_attention(q.half(), k, v, cu, 5)
    with pytest.raises(ValueError, match="max_seqlen"):
        attn.varlen_attention(q, k, v, cu, 4)  # a sequence of 5 > max_seqlen
    with pytest.raises(ValueError, match="rise from 0 to T"):
        attn.varlen_attention(q, k, v, _cu([3, 4]), 5)  # ends at 7, T = 8
    with pytest.raises(ValueError, match="Python int"):
        attn.varlen_attention(q, k, v, cu, torch.tensor(5))
