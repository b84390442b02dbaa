"""FactorizedLinear: a rank-k replacement of a dense layer, y = up(down(x)) + b."""
from __future__ import annotations

import torch
from torch import nn


class FactorizedLinear(nn.Module):
    """y = U (V x) + b with V = `down` (k x d_in) and U = `up` (d_out x k); the bias lives in `up`.

    Stored parameters: k·(d_in + d_out) (+ d_out for the bias). It is smaller than the dense
    layer only when k < d_in·d_out / (d_in + d_out) (the break-even rank).
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__()
        if rank <= 0:
            raise ValueError(f"rank must be a positive integer, got {rank}")
        self.in_features = in_features
        self.out_features = out_features
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @classmethod
    def from_factors(cls, up: torch.Tensor, down: torch.Tensor,
                     bias: torch.Tensor | None = None) -> "FactorizedLinear":
        """Build from up (d_out x k), down (k x d_in) and an optional bias (d_out)."""
        if up.dim() != 2 or down.dim() != 2 or up.shape[1] != down.shape[0]:
            raise ValueError(f"factors do not chain: up {tuple(up.shape)}, down {tuple(down.shape)}")
        layer = cls(down.shape[1], up.shape[0], up.shape[1], bias=bias is not None,
                    device=up.device, dtype=up.dtype)
        with torch.no_grad():
            layer.up.weight.copy_(up)
            layer.down.weight.copy_(down)
            if bias is not None:
                layer.up.bias.copy_(bias)
        return layer

    @property
    def rank(self) -> int:
        return self.down.out_features

    @property
    def bias(self) -> torch.Tensor | None:
        return self.up.bias

    def dense_weight(self) -> torch.Tensor:
        """W = up @ down (d_out x d_in)."""
        return self.up.weight @ self.down.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = getattr(self.down, "weight", None)  # None when an adapter wraps the factor
        if w is None or x.dtype == w.dtype or torch.is_autocast_enabled(x.device.type):
            return self.up(self.down(x))
        # factors stored in another precision than the activations (CompressConfig.dtype)
        return self.up(self.down(x.to(w.dtype))).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, bias={self.bias is not None}")
