import pytest
import torch

try:  # the Triton interpreter's tl.dot runs on numpy's BLAS; a spinning 2-thread BLAS on a
    # loaded 2-core machine made a small matmul 300x slower (18 ms vs 0.06 ms): use one thread
    from threadpoolctl import threadpool_limits

    threadpool_limits(1, user_api="blas")
except ImportError:
    pass


@pytest.fixture(scope="session")
def embedded():
    """(model, tokenizer, model_dir) of the embedded SmolLM2-135M-Instruct, fp32, loaded once.
    The first load ever converts the GGUF to the safetensors cache (~30 s)."""
    from tao_fast.models import load_model

    torch.manual_seed(0)
    model, tok, path = load_model("embedded:smollm2-135m-instruct")
    # Kernel test modules set TRITON_INTERPRET=1 for the whole session, which makes "auto"
    # pick the (slow) interpreter; tests that want Triton on this model ask for it.
    model.ops_backend = "torch"
    return model, tok, path
