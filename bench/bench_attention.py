"""CPU micro-benchmarks of varlen attention (pytest-benchmark), forward + backward.

    pytest bench/bench_attention.py --benchmark-only                      # torch providers
    TRITON_INTERPRET=1 pytest bench/bench_attention.py --benchmark-only   # + the Triton kernel
                                                                          #   in the interpreter
Providers: the torch reference (SDPA per sequence), SDPA on the right-padded batch, and the
Triton kernel only under TRITON_INTERPRET=1 (interpreter speed says nothing about the GPU;
the row is there to catch regressions in the host path). GPU numbers: bench/gpu_attention.py.
"""
import os

import pytest
import torch

from gpu_attention import _inputs, _repack, _setup_sdpa_padded, _setup_torch_ref, make_lens

pytest.importorskip("pytest_benchmark")

PROVIDERS = {"torch_ref": _setup_torch_ref, "sdpa_padded": _setup_sdpa_padded}
if os.environ.get("TRITON_INTERPRET") == "1":
    from gpu_attention import _setup_triton
    PROVIDERS["triton_interp"] = _setup_triton

# (mix, total tokens): many short documents, few long ones, and a mix (padding waste).
SHAPES = [("fixed:32", 512), ("fixed:256", 512), ("mixed:16-256", 512)]


@pytest.mark.parametrize("mix,total", SHAPES, ids=[m for m, _ in SHAPES])
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_varlen_attention_fwd_bwd(benchmark, provider, mix, total):
    if provider == "triton_interp" and mix != "fixed:32":
        pytest.skip("the interpreter is slow: one shape is enough")
    lens = make_lens(mix, total)
    (q, k, v), dout = _inputs(lens, 8, 2, 64, torch.float32, "cpu")
    fn, xs, _ = PROVIDERS[provider](q, k, v, lens)
    g = _repack(dout, provider if provider != "triton_interp" else "triton", lens)

    def step():
        return torch.autograd.grad(fn(*xs), xs, g)
    benchmark.extra_info.update(n_seqs=len(lens), tokens=total, Hq=8, Hkv=2, D=64)
    benchmark.pedantic(step, rounds=3 if provider == "triton_interp" else 10, warmup_rounds=1)
