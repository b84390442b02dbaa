"""hylorada: compress Hugging Face causal LMs with (whitened) truncated SVD and adapt them with
LoRA, DoRA, LoRaDA and HyLoRADA adapters."""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

from .config import HyLoRADAConfig  # noqa: E402
from .model import HyLoRADAModel  # noqa: E402

# Heavier or optional parts load on first use.
_LAZY = {
    "CompressConfig": "hylorada.compress",
    "compress_model": "hylorada.compress",
    "save_compressed": "hylorada.compress",
    "load_compressed": "hylorada.compress",
    "FactorizedLinear": "hylorada.nn.factorized",
    "load_model": "hylorada.loading",
    "TrainConfig": "hylorada.train",
    "train": "hylorada.train",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hylorada' has no attribute {name!r}")


__all__ = ["HyLoRADAConfig", "HyLoRADAModel", "__version__", *_LAZY]
