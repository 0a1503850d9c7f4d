"""Triton linear_logprob (kernels/linear_logprob.py) in the Triton interpreter vs a float64 oracle.

The oracle computes the logits in float64 on the CPU and differentiates with autograd. fp32 is
held to ~1e-5 relative error; fp16/bf16 to 2x the error of plain torch in that dtype (matmul in
the low dtype, log_softmax in fp32) plus a tiny floor. Outputs and scratch start as NaN
(utils.DEBUG_POISON), so any element a kernel forgets to write shows up.
"""
import pytest

pytest.importorskip("triton")

import torch  # noqa: E402

from tao_fast import ops  # noqa: E402
from tao_fast.kernels import linear_logprob as llp  # noqa: E402
from tao_fast.kernels import utils  # noqa: E402

IGN = -100


@pytest.fixture(autouse=True)
def _poison_and_one_blas_thread(monkeypatch):
    monkeypatch.setattr(utils, "DEBUG_POISON", True)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def _inputs(T, V, H, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * (2.0 / H ** 0.5)).to(dtype)  # logits std ~2
    targets = torch.randint(0, V, (T,), generator=g)
    targets[1::7] = IGN
    g_lp, g_ent = torch.randn(T, generator=g), torch.randn(T, generator=g)
    return hidden, weight, targets, g_lp, g_ent


def _torch_path(hidden, weight, targets, temperature, g_lp, g_ent, dtype):
    """logp, entropy, d hidden, d weight with the matmul in `dtype` (float64: the oracle)."""
    h = hidden.detach().to(dtype).requires_grad_()
    w = weight.detach().to(dtype).requires_grad_()
    z = (h @ w.t()).to(torch.promote_types(dtype, torch.float32)) / temperature  # [T, V]
    logq = torch.log_softmax(z, -1)
    valid = targets != IGN
    logp = logq.gather(1, targets.clamp(min=0)[:, None])[:, 0]
    ent = -(logq.exp() * logq).sum(-1)
    logp = torch.where(valid, logp, torch.zeros_like(logp))
    ent = torch.where(valid, ent, torch.zeros_like(ent))
    (logp * g_lp.to(logp.dtype) + ent * g_ent.to(ent.dtype)).sum().backward()
    return logp.detach(), ent.detach(), h.grad, w.grad


def _rel(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp(min=1e-30)).item()


def _triton_path(hidden, weight, targets, temperature, g_lp, g_ent):
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    logp, ent = llp.linear_logprob(h, w, targets, temperature=temperature, return_entropy=True)
    (logp * g_lp + ent * g_ent).sum().backward()
    return logp.detach(), ent.detach(), h.grad, w.grad


CASES = [  # dtype, T, V, H, temperature: not the full cross product (interpreter time)
    (torch.float32, 1, 1000, 64, 1.0),
    (torch.float32, 97, 1000, 576, 0.7),
    (torch.float32, 97, 32003, 64, 1.0),
    (torch.float32, 1025, 1000, 64, 0.7),
    (torch.float32, 1025, 32003, 576, 0.7),  # the large one, once
    (torch.float16, 97, 1000, 576, 0.7),
    (torch.float16, 1025, 1000, 256, 1.0),  # H % BLOCK_H == 0: the unmasked H loop
    (torch.bfloat16, 97, 1000, 64, 0.7),  # interpreter upcasts bf16 tiles before tl.dot
]


@pytest.mark.parametrize("dtype,T,V,H,temperature", CASES)
def test_matches_float64_oracle(dtype, T, V, H, temperature):
    hidden, weight, targets, g_lp, g_ent = _inputs(T, V, H, dtype, seed=T + V + H)
    ours = _triton_path(hidden, weight, targets, temperature, g_lp, g_ent)
    oracle = _torch_path(hidden, weight, targets, temperature, g_lp, g_ent, torch.float64)
    if dtype == torch.float32:
        tols = [2e-6, 2e-6, 1e-5, 1e-5]  # logp, entropy, d hidden, d weight (seen: <1e-6)
    else:
        plain = _torch_path(hidden, weight, targets, temperature, g_lp, g_ent, dtype)
        tols = [2 * _rel(p, o) + 1e-6 for p, o in zip(plain, oracle)]
    for name, x, ref, tol in zip(["logp", "entropy", "d_hidden", "d_weight"], ours, oracle, tols):
        assert x.dtype == (torch.float32 if name in ("logp", "entropy") else dtype), name
        assert torch.isfinite(x).all(), f"{name}: NaN/inf (unwritten or overflow)"
        assert _rel(x, ref) <= tol, f"{name}: rel err {_rel(x, ref):.3g} > {tol:.3g}"
    ignored = targets == IGN
    assert (ours[0][ignored] == 0).all() and (ours[1][ignored] == 0).all()
    assert (ours[2][ignored] == 0).all(), "ignored tokens must get no gradient"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_backward_in_several_chunks_is_deterministic(monkeypatch, dtype):
    """dx chunks of 256 tokens (5 chunks for T=1025): d weight accumulates in fp32; two
    backward passes give bitwise-equal gradients and match the one-chunk result; backward_info
    says which path ran."""
    T, V, H, temp = 1025, 1000, 64, 1.3
    hidden, weight, targets, g_lp, g_ent = _inputs(T, V, H, dtype, seed=3)
    name = str(dtype).removeprefix("torch.")
    one = _triton_path(hidden, weight, targets, temp, g_lp, g_ent)
    assert llp.backward_info() == dict(dw_accumulation="single-chunk-native", chunks=1,
                                       chunk_tokens=T, dx_dtype=name)
    bt = llp._INTERP_BLOCKS["BLOCK_T"]
    monkeypatch.setattr(llp, "_DX_CHUNK_BYTES", bt * V * hidden.element_size())
    runs = [_triton_path(hidden, weight, targets, temp, g_lp, g_ent) for _ in range(2)]
    path = "fp32-addmm" if dtype == torch.float32 else "fp32-cast-addmm"  # CPU: no mm out_dtype
    assert llp.backward_info() == dict(dw_accumulation=path, chunks=5, chunk_tokens=256,
                                       dx_dtype=name)
    for a, b in zip(runs[0], runs[1]):
        assert torch.equal(a, b)
    tol = 1e-6 if dtype == torch.float32 else 2e-3  # fp16: chunk sums rounded once each
    assert _rel(runs[0][2], one[2]) < 1e-6  # d hidden: same math, BLAS blocking differs
    assert _rel(runs[0][3], one[3]) < tol
    if dtype != torch.float32:
        # The fp32 sum is rounded to the 16-bit dtype once, as the one-chunk GEMM's fp32
        # accumulator is: the same bits nearly everywhere (measured 99.98% bf16, 99.8% fp16).
        # Rounding each chunk's product to the 16-bit dtype first (the earlier fallback) left
        # 65.6% / 65.5% equal.
        same = (runs[0][3] == one[3]).float().mean().item()
        assert same > 0.98, f"only {same:.1%} of d weight equals the one-chunk result"


def test_dw_accumulates_in_fp32_across_chunks(monkeypatch):
    """Chunk products that nearly cancel (bf16): the fp32 accumulator, taken a vocab slice at a
    time, stays within fp32 error of the float64 sum; rounding each chunk's product to bf16
    (the earlier fallback) is ~10% off here, which the same bound rejects."""
    monkeypatch.setattr(llp, "_DW_SLICE_BYTES", 4 * 96 * 300)  # 300-row slices of V=1000
    g = torch.Generator().manual_seed(11)
    V, H, n = 1000, 64, 96
    dx1 = torch.randn(n, V, generator=g).bfloat16()
    h1 = torch.randn(n, H, generator=g).bfloat16()
    h2 = (h1.float() + torch.randn(n, H, generator=g) / 64).bfloat16()
    dx3 = (torch.randn(n, V, generator=g) / 64).bfloat16()
    chunks = [(dx1, h1), (-dx1, h2), (dx3, torch.randn(n, H, generator=g).bfloat16())]
    acc = torch.zeros(V, H)  # [V, H] fp32
    paths = {llp._accumulate_dw(acc, dx, h) for dx, h in chunks}
    assert paths == {"fp32-cast-addmm"}  # CPU; CUDA takes "fp32-mm"
    want = sum(dx.double().t() @ h.double() for dx, h in chunks)  # [V, H] float64
    bound = 1e-4  # measured 4.0e-6
    assert _rel(acc, want) < bound
    rounded = sum((dx.float().t() @ h.float()).bfloat16().float() for dx, h in chunks)
    assert _rel(rounded, want) > 100 * bound  # the bound tells the two apart (measured 0.105)


@pytest.mark.parametrize("gpu_dtype", llp.DTYPES[1:], ids=["16-bit", "fp32"])
def test_gpu_block_shapes_in_the_interpreter(monkeypatch, gpu_dtype):
    """The GPU configs' blocks (fwd and dlogits) run in the interpreter on fp32 inputs against
    the float64 oracle; H=96 is a multiple of BLOCK_H=32, not of 64 (both H loops run)."""
    assert llp._GPU_CONFIGS[torch.bfloat16] == llp._GPU_CONFIGS[torch.float16]
    monkeypatch.setattr(llp, "configs", lambda dtype: llp._GPU_CONFIGS[gpu_dtype])
    T, V, H, temp = 300, 700, 96, 0.9
    hidden, weight, targets, g_lp, g_ent = _inputs(T, V, H, torch.float32, seed=13)
    ours = _triton_path(hidden, weight, targets, temp, g_lp, g_ent)
    oracle = _torch_path(hidden, weight, targets, temp, g_lp, g_ent, torch.float64)
    for name, x, ref, tol in zip(["logp", "entropy", "d_hidden", "d_weight"], ours, oracle,
                                 [2e-6, 2e-6, 1e-5, 1e-5]):
        assert _rel(x, ref) <= tol, f"{name}: rel err {_rel(x, ref):.3g} > {tol:.3g}"


def test_entropy_only_gradient_and_partial_requires_grad():
    T, V, H = 33, 700, 64
    hidden, weight, targets, _, g_ent = _inputs(T, V, H, torch.float32, seed=5)
    h = hidden.clone().requires_grad_()
    logp, ent = llp.linear_logprob(h, weight, targets, return_entropy=True)
    (ent * g_ent).sum().backward()  # no gradient through logp; weight needs none
    _, _, ref_dh, _ = _torch_path(hidden, weight, targets, 1.0, torch.zeros(T), g_ent,
                                  torch.float64)
    assert _rel(h.grad, ref_dh) < 1e-5


def test_unused_entropy_costs_the_backward_nothing(monkeypatch):
    # the learner asks for the entropy as a metric and backpropagates logp only: the backward
    # must get g_ent None (the entropy-gradient terms skipped), and the same d hidden as
    # without the entropy
    T, V, H = 40, 700, 64
    hidden, weight, targets, g_lp, _ = _inputs(T, V, H, torch.float32, seed=9)
    seen, real = [], llp._backward

    def spy(*args, **kw):
        seen.append(args[6] is None)  # g_ent
        return real(*args, **kw)

    monkeypatch.setattr(llp, "_backward", spy)
    grads = []
    for with_ent in (True, False):
        h = hidden.clone().requires_grad_()
        out = llp.linear_logprob(h, weight, targets, return_entropy=with_ent)
        (out[0] * g_lp).sum().backward()
        grads.append(h.grad)
    assert seen == [True, True]
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_entropy_as_a_metric_carries_no_gradient(backend):
    # entropy_grad=False: the same values, no graph through the entropy (the reference's
    # backward recompute then builds no [C, V] softmax for it), logp's gradient unchanged
    T, V, H = 40, 700, 64
    hidden, weight, targets, g_lp, _ = _inputs(T, V, H, torch.float32, seed=11)
    outs = []
    for entropy_grad in (True, False):
        h = hidden.clone().requires_grad_()
        lp, ent = ops.linear_logprob(h, weight, targets, return_entropy=True,
                                     entropy_grad=entropy_grad, backend=backend)
        assert ent.requires_grad == entropy_grad
        (lp * g_lp).sum().backward()
        outs.append((ent.detach(), h.grad))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=0, atol=0)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-6, atol=1e-7)


def test_ops_triton_backend_matches_torch_backend():
    T, V, H = 130, 1500, 96
    hidden, weight, targets, g_lp, _ = _inputs(T, V, H, torch.float32, seed=7)
    outs = {}
    for backend in ("triton", "torch"):
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_()
        logp = ops.linear_logprob(h, w, targets, temperature=0.8, backend=backend)
        assert isinstance(logp, torch.Tensor) and logp.shape == (T,)
        (logp * g_lp).sum().backward()
        outs[backend] = (logp.detach(), h.grad, w.grad)
    for a, b in zip(outs["triton"], outs["torch"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    lp, ent = ops.linear_logprob(hidden, weight, targets, return_entropy=True, backend="triton")
    rlp, rent = ops.linear_logprob(hidden, weight, targets, return_entropy=True, backend="torch")
    torch.testing.assert_close(ent, rent, rtol=1e-5, atol=1e-6)


def test_empty_and_out_of_range_targets():
    hidden, weight = torch.randn(0, 64), torch.randn(100, 64)
    logp, ent = llp.linear_logprob(hidden, weight, torch.zeros(0, dtype=torch.long),
                                   return_entropy=True)
    assert logp.shape == (0,) and ent.shape == (0,)
    t = torch.tensor([5, 100, -1, IGN], dtype=torch.int32)
    logp, _ = llp.linear_logprob(torch.randn(4, 64), weight, t)
    assert torch.isfinite(logp[0]) and logp[1].isnan() and logp[2].isnan() and logp[3] == 0


def test_bad_inputs_raise_clear_errors():
    h, w, t = torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long)
    bad = [
        ((h, torch.randn(10, 9), t), "hidden \\[T, H\\] and weight \\[V, H\\]"),
        ((h, w, torch.zeros(3, dtype=torch.long)), "targets must be \\[T\\]"),
        ((h.double(), w.double(), t), "bf16, fp16 or fp32"),
        ((h, w.half(), t), "weight dtype"),
        ((h, w, t.float()), "int32 or int64"),
        ((h, torch.randn(8, 10).t(), t), "unit stride"),
        ((h, w.to("meta"), t), "different devices"),
    ]
    for args, msg in bad:
        with pytest.raises(ValueError, match=msg):
            llp.linear_logprob(*args)
    with pytest.raises(ValueError, match="temperature"):
        llp.linear_logprob(h, w, t, temperature=0.0)
