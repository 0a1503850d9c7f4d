"""Model shapes and building: transformers' Qwen2 model and the in-house packed model from one
seeded HF state dict (the weight copy goes through tao_fast.models.weights.from_hf)."""
from __future__ import annotations

import torch

from harness import free_device
from tao_fast.models.config import ModelArgs, rope_inv_freq
from tao_fast.models.llama import Transformer
from tao_fast.models.weights import from_hf

CLIP = 0.2  # the pg loss's clip range (both sides), every provider
COMMON = dict(tie_word_embeddings=True, qkv_bias=True, model_type="qwen2", rope_theta=1e6,
              rms_norm_eps=1e-6, max_position_embeddings=32768)
MODELS = {
    "0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24,
                 num_heads=14, num_kv_heads=2, head_dim=64),
    "1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28,
                 num_heads=12, num_kv_heads=2, head_dim=128),
    "tiny": dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_layers=2,
                 num_heads=4, num_kv_heads=2, head_dim=16),  # --dry-run
}


def model_args(size: str) -> ModelArgs:
    return ModelArgs(**MODELS[size], **COMMON)


def hf_config(args: ModelArgs):
    from transformers import AutoConfig

    d = args.to_hf()
    for k in ("architectures", "torch_dtype"):
        d.pop(k, None)
    return AutoConfig.for_model(d.pop("model_type"), **d)


def cast_keep_fp32_buffers(model, dtype):
    """model.to(dtype), but floating buffers (rotary inv_freq) keep their fp32 values, as when
    a model is built in its dtype: bf16-rounded rotary frequencies would skew long positions."""
    saved = {n: b.detach().clone() for n, b in model.named_buffers() if b.is_floating_point()}
    model.to(dtype)
    for name, b in saved.items():
        mod, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(mod) if mod else model, leaf, b)
    return model


def build_hf(args: ModelArgs, sd: dict, device, dtype):
    """transformers' model from an HF state dict (whatever the transformers modules are now:
    with Liger's patches applied, the Liger model)."""
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_config(args), attn_implementation="sdpa")
    model = model.to(device)  # no-op unless this transformers ignored the device context
    model.load_state_dict(sd)  # tied: lm_head.weight and embed_tokens are one parameter
    model.config.use_cache = False
    return cast_keep_fp32_buffers(model, dtype).train()


def build_tao(args: ModelArgs, sd: dict, device, dtype, backend: str):
    """The in-house model from the same HF state dict, via the loader's fused-layout mapping;
    its ops run on `backend` ("triton" for every GPU timing)."""
    with torch.device("meta"):
        model = Transformer(args)
    model = model.to_empty(device=device)
    missing, unexpected = model.load_state_dict(from_hf(dict(sd), args), strict=False)
    if [m for m in missing if m != "inv_freq"] or unexpected:
        raise RuntimeError(f"weight mapping: missing {missing}, unexpected {unexpected}")
    model.inv_freq = rope_inv_freq(args).to(device)  # fp32
    model = cast_keep_fp32_buffers(model, dtype)
    model.ops_backend = backend
    return model.train()


def make_weights(args: ModelArgs, device, seed: int):
    """(fp32 HF state dict on the CPU, transformers' parameter count) from a seeded HF init."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(hf_config(args), attn_implementation="sdpa")
    with torch.no_grad():  # HF zero-inits biases: random ones make the check cover their mapping
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.02)
    n_hf = sum(p.numel() for p in hf.parameters())
    sd32 = {k: v.detach().to("cpu", torch.float32) for k, v in hf.state_dict().items()}
    del hf
    free_device(device)
    return sd32, n_hf


def apply_liger(model_type: str) -> None:
    """Liger-Kernel's patches of transformers' module for this model type (global)."""
    from liger_kernel.transformers import apply_liger_kernel_to_llama, apply_liger_kernel_to_qwen2

    fn = {"qwen2": apply_liger_kernel_to_qwen2, "llama": apply_liger_kernel_to_llama}[model_type]
    fn(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
       fused_linear_cross_entropy=False)


def liger_grpo_loss():
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    return LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, epsilon_low=CLIP,
                                    epsilon_high=CLIP, temperature=1.0)
