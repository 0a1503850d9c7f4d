"""CPU micro-benchmarks of pg_loss providers (pytest-benchmark).

    pytest bench/bench_pg_loss.py --benchmark-only
    TRITON_INTERPRET=1 pytest bench/bench_pg_loss.py   # adds the Triton interpreter

Providers: the torch reference (the CPU fallback) and the fused Triton kernel only under
TRITON_INTERPRET=1 (a correctness tool, not a speed measure). GPU: bench/gpu_loss_kernels.py.
"""
import os

import pytest
import torch

from tao_fast.kernels import reference

pytest.importorskip("pytest_benchmark")

B, L = 64, 512  # 32k tokens
PROVIDERS = {"torch-reference": reference.pg_loss}
if os.environ.get("TRITON_INTERPRET") == "1":
    from tao_fast.kernels.pg_loss import pg_loss as _triton_impl

    PROVIDERS["triton-interpreter"] = _triton_impl


def _inputs():
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(B, L, generator=g) * 0.3 - 1.0
    old = logp + torch.randn(B, L, generator=g) * 0.2
    adv = torch.randn(B, 1, generator=g).expand(B, L).contiguous()
    mask = torch.rand(B, L, generator=g) > 0.2
    ref = logp + torch.randn(B, L, generator=g) * 0.1
    sampler = old + torch.randn(B, L, generator=g) * 0.1
    return logp, old, adv, mask, ref, sampler


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_pg_loss(benchmark, provider, agg):
    impl = PROVIDERS[provider]
    logp, old, adv, mask, ref, sampler = _inputs()
    benchmark.extra_info.update(tokens=B * L, provider=provider, agg=agg)

    def fwd_bwd():
        lp = logp.detach().requires_grad_()
        loss, _ = impl(lp, old, adv, mask, ref_logp=ref, kl_coef=0.01, kl_estimator="k3",
                       clip_low=0.2, clip_high=0.28, dual_clip=3.0, sampler_logp=sampler,
                       tis_cap=2.0, agg=agg, cu_seqlens=None, loss_norm=None)
        loss.backward()
        return lp.grad

    rounds = 3 if provider.startswith("triton") else 20
    out = benchmark.pedantic(fwd_bwd, rounds=rounds, iterations=1)
    assert torch.isfinite(out).all()
