"""Low-rank compression of Hugging Face causal LMs: plain, whitened (SVD-LLM) and Fisher-weighted
(K-FAC) truncated SVD.

    from hylorada.compress import CompressConfig, compress_model, save_compressed, load_compressed

FactorizedLinear (hylorada/nn/factorized.py) is imported eagerly; everything else on first use.
Recovery after compression is a recipe: hylorada.recipes.compress.recover_compressed.
"""
from __future__ import annotations

import importlib

from .factorized import FactorizedLinear

_LAZY = {
    "CompressConfig": "config",
    "compress_model": "api",
    "CompressReport": "api",
    "LayerReport": "api",
    "save_compressed": "api",
    "load_compressed": "api",
    "find_target_layers": "api",
    "stored_size": "api",
    "truncated_svd": "svd",
    "whitening_factor": "whiten",
    "whitened_svd": "whiten",
    "collect_grams": "whiten",
    "collect_output_grams": "curvature",
    "decide_ranks": "ranks",
    "break_even_rank": "ranks",
    "analyze_model": "analyze",
}

__all__ = ["FactorizedLinear", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
