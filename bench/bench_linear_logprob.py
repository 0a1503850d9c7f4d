"""CPU micro-benchmarks of linear_logprob providers (pytest-benchmark), small shapes.

    pytest bench/bench_linear_logprob.py --benchmark-only
    TRITON_INTERPRET=1 pytest bench/bench_linear_logprob.py   # adds the Triton interpreter

Providers: the chunked torch reference (the CPU fallback), naive torch eager (matmul +
log_softmax + gather, holds [T, V] fp32), and the Triton kernel only under TRITON_INTERPRET=1
(the interpreter: a correctness tool, its time says nothing about the GPU).
GPU numbers: bench/gpu_loss_kernels.py.
"""
import os

import pytest
import torch

from tao_fast.kernels import reference

pytest.importorskip("pytest_benchmark")

T, V, H = 512, 8192, 256
TEMPERATURE = 0.8


def naive_eager(hidden, weight, targets, temperature=1.0, return_entropy=False):
    logits = (hidden @ weight.t()).float() / temperature  # [T, V]
    logq = torch.log_softmax(logits, -1)
    valid = targets != reference.IGNORE_INDEX
    logp = logq.gather(1, targets.clamp(min=0)[:, None])[:, 0]
    return torch.where(valid, logp, torch.zeros_like(logp)), None


PROVIDERS = {"torch-chunked": reference.linear_logprob, "torch-naive": naive_eager}
if os.environ.get("TRITON_INTERPRET") == "1":
    from tao_fast.kernels.linear_logprob import linear_logprob as _triton_impl

    PROVIDERS["triton-interpreter"] = _triton_impl


def _inputs():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(T, H, generator=g)
    weight = torch.randn(V, H, generator=g) / H ** 0.5
    targets = torch.randint(0, V, (T,), generator=g)
    targets[::9] = reference.IGNORE_INDEX
    return hidden, weight, targets


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_linear_logprob(benchmark, provider, mode):
    impl = PROVIDERS[provider]
    hidden, weight, targets = _inputs()
    benchmark.extra_info.update(T=T, V=V, H=H, provider=provider, mode=mode)

    def fwd():
        with torch.no_grad():
            return impl(hidden, weight, targets, temperature=TEMPERATURE)[0]

    def fwd_bwd():
        h = hidden.detach().requires_grad_()
        w = weight.detach().requires_grad_()
        logp = impl(h, w, targets, temperature=TEMPERATURE)[0]
        logp.sum().backward()
        return h.grad

    rounds = 1 if provider.startswith("triton") else 5
    out = benchmark.pedantic(fwd if mode == "fwd" else fwd_bwd, rounds=rounds, iterations=1)
    assert torch.isfinite(out).all()
