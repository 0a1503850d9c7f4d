import pytest
import torch


@pytest.fixture(scope="session")
def embedded():
    """(model, tokenizer, model_dir) of the embedded SmolLM2-135M-Instruct, fp32, loaded once.
    The first load ever converts the GGUF to the safetensors cache (~30 s)."""
    from tao_fast.models import load_model

    torch.manual_seed(0)
    return load_model("embedded:smollm2-135m-instruct")
