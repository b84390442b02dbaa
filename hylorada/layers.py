"""The layer kinds hylorada works on and a uniform view of their weight: W is d_out x d_in.

- `nn.Linear`: y = W x + b (weight stored d_out x d_in);
- transformers' GPT-2 style `Conv1D`: y = x Wc + b with Wc stored d_in x d_out, so W = Wcᵀ;
- `FactorizedLinear`: y = up(down(x)) + b, W = up·down.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from .nn.factorized import FactorizedLinear

LINEAR_TYPES = (nn.Linear, Conv1D, FactorizedLinear)


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, LINEAR_TYPES)


def in_out_features(layer: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of a supported layer."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    if isinstance(layer, Conv1D):
        return layer.weight.shape[0], layer.weight.shape[1]
    if isinstance(layer, FactorizedLinear):
        return layer.in_features, layer.out_features
    raise TypeError(f"unsupported layer type {type(layer).__name__}; expected one of "
                    f"{[t.__name__ for t in LINEAR_TYPES]}")


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """W (d_out x d_in) of the layer; a view for Linear/Conv1D, a product for FactorizedLinear."""
    if isinstance(layer, nn.Linear):
        return layer.weight
    if isinstance(layer, Conv1D):
        return layer.weight.t()
    if isinstance(layer, FactorizedLinear):
        return layer.dense_weight()
    raise TypeError(f"unsupported layer type {type(layer).__name__}")


def layer_bias(layer: nn.Module) -> torch.Tensor | None:
    return layer.bias


def forward_no_bias(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """W x without the bias."""
    if isinstance(layer, nn.Linear):
        return F.linear(x, layer.weight)
    if isinstance(layer, Conv1D):
        return torch.matmul(x, layer.weight)
    if isinstance(layer, FactorizedLinear):
        return F.linear(F.linear(x, layer.down.weight), layer.up.weight)
    raise TypeError(f"unsupported layer type {type(layer).__name__}")


def set_dense_weight(layer: nn.Module, weight: torch.Tensor) -> None:
    """Overwrite W (d_out x d_in) in place for Linear/Conv1D."""
    with torch.no_grad():
        if isinstance(layer, nn.Linear):
            layer.weight.copy_(weight)
        elif isinstance(layer, Conv1D):
            layer.weight.copy_(weight.t())
        else:
            raise TypeError(f"set_dense_weight does not apply to {type(layer).__name__}")
