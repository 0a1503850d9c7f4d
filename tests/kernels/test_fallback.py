"""backend="auto" runs the torch reference, after one warning per (op, reason), where a kernel
cannot compile or launch or does not cover the inputs; backend="triton" raises instead.

MOCK, for what cannot happen here: a kernel that fails to launch. The Triton interpreter has no
shared-memory limit and compiles nothing, so the tests replace one kernel of an op by a stand-in
whose launch raises the error Triton raises on a GPU (OutOfResources at load, CompilationError,
PTXASError); every other kernel and the reference run for real.
"""
import warnings

import pytest

pytest.importorskip("triton")

import torch  # noqa: E402
from triton.compiler.errors import CompilationError  # noqa: E402
from triton.runtime.errors import OutOfResources, PTXASError  # noqa: E402

from tao_fast import ops  # noqa: E402
from tao_fast.kernels import attention, linear_logprob, pg_loss, reference, utils  # noqa: E402

_SKIP = attention.interpreter_unsupported_reason()


class _FailingKernel:
    """Stands in for a @triton.jit kernel: `kernel[grid](...)` raises `error`; counts launches."""

    def __init__(self, error):
        self.error, self.launches = error, 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches += 1
            raise self.error
        return launch


def _out_of_smem():
    return OutOfResources(262144, utils.SMEM_LIMIT, "shared memory")


@pytest.fixture(autouse=True)
def _fresh_fallback_state(monkeypatch):
    monkeypatch.setattr(utils, "_FAILED", {})
    monkeypatch.setattr(utils, "_WARNED", set())


def _fallback_warnings(record, op):
    return [w for w in record if issubclass(w.category, RuntimeWarning)
            and f"tao_fast {op}:" in str(w.message)]


def _attn_inputs(D=64, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    lens = [5, 17, 9]
    q, k, v = (torch.randn(sum(lens), h, D, generator=g).to(dtype) for h in (4, 2, 2))
    cu = torch.tensor([0, 5, 22, 31], dtype=torch.int32)
    return q, k, v, cu, max(lens), torch.randn(sum(lens), 4, D, generator=g).to(dtype)


def _attn_run(backend, q, k, v, cu, max_len, dout):
    xs = [x.clone().requires_grad_() for x in (q, k, v)]
    if backend == "reference":
        out = reference.varlen_attention(*xs, cu, max_len)
    else:
        out = ops.varlen_attention(*xs, cu, max_len, backend=backend)
    return (out, *torch.autograd.grad(out, xs, dout))


@pytest.mark.skipif(_SKIP is not None, reason=str(_SKIP))
def test_attention_forward_out_of_shared_memory(monkeypatch):
    inputs = _attn_inputs()
    want = _attn_run("reference", *inputs)
    failing = _FailingKernel(_out_of_smem())
    monkeypatch.setattr(attention, "_fwd_kernel", failing)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(2):
            got = _attn_run("auto", *inputs)
            for a, b in zip(got, want):
                assert torch.equal(a, b)
    (w,) = _fallback_warnings(record, "varlen_attention")
    assert "OutOfResources" in str(w.message) and "float32, D=64" in str(w.message)
    assert "shared memory" in str(w.message)
    assert failing.launches == 1, "after a failure, auto goes to the reference directly"
    with pytest.raises(OutOfResources):
        _attn_run("triton", *inputs)


@pytest.mark.skipif(_SKIP is not None, reason=str(_SKIP))
def test_attention_backward_compile_error(monkeypatch):
    """The forward runs the kernel, the backward's dkdv kernel fails: the gradients come from
    the reference, the output from the kernel."""
    inputs = _attn_inputs()
    want = _attn_run("reference", *inputs)
    kernel_out = _attn_run("triton", *inputs)[0]
    monkeypatch.setattr(attention, "_bwd_dkdv_kernel",
                        _FailingKernel(CompilationError(None, None, "unsupported layout")))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out, *grads = _attn_run("auto", *inputs)
    assert torch.equal(out, kernel_out)
    for a, b in zip(grads, want[1:]):
        assert torch.equal(a, b)
    (w,) = _fallback_warnings(record, "varlen_attention")
    assert "CompilationError" in str(w.message) and "unsupported layout" in str(w.message)
    with pytest.raises(CompilationError):
        _attn_run("triton", *inputs)


def test_attention_unsupported_head_dim():
    """D=48 is not a kernel head dim: auto uses the reference (one warning for two calls);
    triton raises the ValueError naming the head dim."""
    q, k, v, cu, max_len, dout = _attn_inputs(D=48)
    want = _attn_run("reference", q, k, v, cu, max_len, dout)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(2):
            for a, b in zip(_attn_run("auto", q, k, v, cu, max_len, dout), want):
                assert torch.equal(a, b)
    (w,) = _fallback_warnings(record, "varlen_attention")
    assert "head dim D=48" in str(w.message)
    with pytest.raises(ValueError, match="head dim D=48"):
        _attn_run("triton", q, k, v, cu, max_len, dout)


def _llp_inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    T, V, H = 40, 300, 64
    hidden = torch.randn(T, H, generator=g).to(dtype)  # [T, H]
    weight = torch.randn(V, H, generator=g).to(dtype)  # [V, H]
    targets = torch.randint(0, V, (T,), generator=g)
    targets[::5] = -100
    return hidden, weight, targets, torch.randn(T, generator=g), torch.randn(T, generator=g)


def _llp_run(backend, hidden, weight, targets, g_lp, g_ent):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    if backend == "reference":
        logp, ent = reference.linear_logprob(h, w, targets, 0.8, True)
    else:
        logp, ent = ops.linear_logprob(h, w, targets, temperature=0.8, return_entropy=True,
                                       backend=backend)
    (logp * g_lp + ent * g_ent).sum().backward()
    return logp.detach(), ent.detach(), h.grad, w.grad


@pytest.mark.parametrize("kernel,error", [
    ("_fwd_kernel", _out_of_smem()),
    ("_dlogits_kernel", PTXASError("ptxas failed with error code 255")),
])
def test_linear_logprob_kernel_failure(monkeypatch, kernel, error):
    inputs = _llp_inputs()
    want = _llp_run("reference", *inputs)
    kernel_fwd = _llp_run("triton", *inputs)[:2]
    monkeypatch.setattr(linear_logprob, kernel, _FailingKernel(error))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got = _llp_run("auto", *inputs)
        again = _llp_run("auto", *inputs)  # now the reference from the start
    fwd_want = want[:2] if kernel == "_fwd_kernel" else kernel_fwd
    for a, b in zip(got, fwd_want + want[2:]):
        assert torch.equal(a, b)
    for a, b in zip(again, want):
        assert torch.equal(a, b)
    assert linear_logprob.backward_info()["dw_accumulation"] == "torch-reference"
    (w,) = _fallback_warnings(record, "linear_logprob")
    assert type(error).__name__ in str(w.message) and "float32, entropy=True" in str(w.message)
    with pytest.raises(type(error)):
        _llp_run("triton", *inputs)


def test_linear_logprob_unsupported_dtype():
    inputs = _llp_inputs(torch.float64)
    want = _llp_run("reference", *inputs)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(2):
            for a, b in zip(_llp_run("auto", *inputs), want):
                assert torch.equal(a, b)
    (w,) = _fallback_warnings(record, "linear_logprob")
    assert "torch.float64" in str(w.message)
    with pytest.raises(ValueError, match="bf16, fp16 or fp32"):
        _llp_run("triton", *inputs)


def test_pg_loss_compile_error(monkeypatch):
    g = torch.Generator().manual_seed(2)
    logp, old, adv = (torch.randn(50, generator=g) * 0.2 for _ in range(3))
    mask = torch.rand(50, generator=g) > 0.2
    kw = dict(ref_logp=logp + 0.1, kl_coef=0.05, dual_clip=3.0)

    def run(backend):
        lp = logp.clone().requires_grad_()
        if backend == "reference":
            loss, stats = reference.pg_loss(lp, old, adv, mask, **kw)
        else:
            loss, stats = ops.pg_loss(lp, old, adv, mask, backend=backend, **kw)
        loss.backward()
        return loss.detach(), stats, lp.grad

    want = run("reference")
    monkeypatch.setattr(pg_loss, "_pg_fwd_kernel",
                        _FailingKernel(CompilationError(None, None, "bad constexpr")))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(2):
            loss, stats, grad = run("auto")
            assert torch.equal(loss, want[0]) and torch.equal(grad, want[2])
            assert all(torch.equal(stats[k], want[1][k]) for k in want[1])
    (w,) = _fallback_warnings(record, "pg_loss")
    assert "CompilationError for float32: bad constexpr" in str(w.message)
    with pytest.raises(CompilationError):
        run("triton")
