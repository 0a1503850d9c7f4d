"""In-house decoder (Llama/Qwen2/SmolLM families), loading HF safetensors and GGUF, saving HF."""
from tao_fast.models.config import ModelArgs
from tao_fast.models.llama import KVCache, Transformer
from tao_fast.models.loader import DEFAULT_MODEL, hf_state_dict, load_model, resolve_model_path

__all__ = ["ModelArgs", "Transformer", "KVCache", "DEFAULT_MODEL", "load_model",
           "resolve_model_path", "hf_state_dict"]
