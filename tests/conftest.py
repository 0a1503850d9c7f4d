"""Shared fixtures, and the one place the suite chooses how Triton runs.

The kernels run in the Triton interpreter (TRITON_INTERPRET=1) on the CPU: set here, before
anything imports triton, for the whole session, so the backend a test gets does not depend on
which modules were collected first. With it, ops backend "auto" picks the (slow) interpreter for
CPU tensors: fixtures and tests that want speed pin "torch"; tests that compile for a GPU run
a subprocess without it.
"""
import dataclasses
import json
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
# The interpreter's tl.dot is numpy matmul: a 2-thread OpenBLAS on a loaded 2-core machine
# spin-waits and runs ~300x slower (measured 18 ms vs 0.06 ms for a 64x64x512 product).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

try:  # the Triton interpreter's tl.dot runs on numpy's BLAS; a spinning 2-thread BLAS on a
    # loaded 2-core machine made a small matmul 300x slower (18 ms vs 0.06 ms): use one thread
    from threadpoolctl import threadpool_limits

    threadpool_limits(1, user_api="blas")
except ImportError:
    pass


@pytest.fixture(autouse=True)
def cpu_without_native_bf16(monkeypatch):
    """The suite sees a CPU without native bf16 matmuls wherever it runs, so model.autocast=auto
    and rollout.dtype=auto resolve alike on every CI machine (fp32 learner, the sampler on the
    learner's tensors); the tests of that choice pass the flags they mean explicitly. A
    subprocess (torchrun, the CLI) reads the machine's own /proc/cpuinfo."""
    import tao_fast.dtypes

    parse = tao_fast.dtypes.cpu_flags  # the real one (monkeypatch restores it after each test)
    monkeypatch.setattr(tao_fast.dtypes, "cpu_flags",
                        lambda cpuinfo=None: set() if cpuinfo is None else parse(cpuinfo))


@pytest.fixture(scope="session")
def embedded():
    """(model, tokenizer, model_dir) of the embedded SmolLM2-135M-Instruct, fp32, loaded once.
    The first load ever converts the GGUF to the safetensors cache (~30 s)."""
    from tao_fast.models import load_model

    torch.manual_seed(0)
    model, tok, path = load_model("embedded:smollm2-135m-instruct")
    # TRITON_INTERPRET=1 (above) makes "auto" pick the slow interpreter; tests that want
    # Triton on this model ask for it.
    model.ops_backend = "torch"
    return model, tok, path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A model directory for tests of the run's machinery (resume, ranks, rounds, engines),
    where what the model says does not matter: the embedded model's tokenizer and chat
    template on a 2-layer, 128-wide Llama with random weights (seed 0), written by
    save_checkpoint. 6.4M parameters: a 77 MB training state instead of the 135M model's
    1.6 GB, and steps in milliseconds. head_dim 64, which vLLM's CPU attention supports."""
    from transformers import AutoTokenizer

    from tao_fast.checkpoint import save_checkpoint
    from tao_fast.models.config import ModelArgs
    from tao_fast.models.llama import Transformer
    from tao_fast.models.loader import resolve_model_path

    src = resolve_model_path("embedded:smollm2-135m-instruct")
    base = ModelArgs.from_hf(json.loads((src / "config.json").read_text()))
    args = dataclasses.replace(base, hidden_size=128, intermediate_size=256, num_layers=2,
                               num_heads=2, num_kv_heads=1, head_dim=64)
    torch.manual_seed(0)
    model = Transformer(args)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.02)
    return save_checkpoint(model, AutoTokenizer.from_pretrained(src),
                           tmp_path_factory.mktemp("tiny") / "tiny-llama")
