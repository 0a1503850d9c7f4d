"""The one table from a dtype's name in a config (model.dtype, rollout.dtype,
run.checkpoint_dtype, ...) to torch's dtype."""
from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    """'bfloat16' -> torch.bfloat16; an unknown name is a ValueError naming the known ones."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r} (known: {sorted(DTYPES)})") from None
