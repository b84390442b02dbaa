"""DoRA (Liu et al. 2024): y = (m / ||W'||_row) ⊙ (W' x) + b, W' = W + s·B A, m0 = ||W||_row.

The row norm is treated as a constant in backward (DoRA paper §4.3) and is computed without
building W' (docs/METHODS.md, "DoRA"):

    ||W'||²_row = ||W||²_row + 2s·rowsum((W Aᵀ) ⊙ B) + s²·rowsum((B (A Aᵀ)) ⊙ B)

with ||W||²_row cached. Dropout d acts on the low-rank path only, as in LoRA:
y = c ⊙ (W x + s·B A d(x)) + b, c = m / ||W'||_row. (peft also feeds d(x) to the rescaled base
term, y = W x + b + (c-1) ⊙ W d(x) + c ⊙ s·B A d(x), which costs a second full-size matmul;
both are c ⊙ (W' x) + b in eval mode or with dropout 0.)
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import HyLoRADAConfig
from ..layers import dense_weight, forward_no_bias
from .base import AdapterLayer


def row_norm_sq(weight: torch.Tensor) -> torch.Tensor:
    """||W||²_row, accumulated in fp64, returned in W's dtype promoted to at least fp32 (so an
    fp64 model stays exact: c = 1 at init to fp64 rounding)."""
    out = torch.promote_types(weight.dtype, torch.float32)
    return weight.detach().double().pow(2).sum(dim=1).to(out)


def norm_from_parts(WAt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, weight_norm_sq: torch.Tensor,
                    scaling: float, eps: float) -> torch.Tensor:
    """||W'||_row from W Aᵀ (d_out x r, accumulation dtype), A, B and ||W||²_row:
    M = 2s·W Aᵀ + s²·B (A Aᵀ);  ||W'||² = ||W||² + rowsum(B ⊙ M), clamped at eps²."""
    A, B = A.to(WAt.dtype), B.to(WAt.dtype)
    M = torch.addmm(WAt, B, A @ A.t(), beta=2.0 * scaling, alpha=scaling * scaling)
    n2 = torch.linalg.vecdot(B, M) + weight_norm_sq
    return n2.clamp_min(eps * eps).sqrt()


def weight_times_At(base_layer: nn.Module, A: torch.Tensor) -> torch.Tensor:
    """W Aᵀ (d_out x r) in at least float32, without autocast and without gradient."""
    with torch.no_grad(), torch.autocast(device_type=A.device.type, enabled=False):
        wdt = next(base_layer.parameters()).dtype
        return forward_no_bias(base_layer, A.detach().to(wdt)).t().to(torch.promote_types(A.dtype, torch.float32))


@torch.no_grad()
def factored_weight_norm(base_layer: nn.Module, weight_norm_sq: torch.Tensor, A: torch.Tensor,
                         B: torch.Tensor, scaling: float, eps: float) -> torch.Tensor:
    """||W + s·B A||_row from ||W||²_row, W Aᵀ and A Aᵀ; never builds the d_out x d_in matrix."""
    with torch.autocast(device_type=A.device.type, enabled=False):
        return norm_from_parts(weight_times_At(base_layer, A), A.detach(), B.detach(), weight_norm_sq,
                               scaling, eps)


def direct_weight_norm(base_layer: nn.Module, A: torch.Tensor, B: torch.Tensor,
                       scaling: float) -> torch.Tensor:
    """Reference: ||W + s·B A||_row by building W' (fp64). Used by tests and export only."""
    with torch.no_grad():
        w = dense_weight(base_layer).double() + scaling * (B.double() @ A.double())
        return w.norm(dim=1)


class DoRALayer(AdapterLayer):
    """y = c ⊙ (W' x) + b with c = m / ||W'||_row (detached norm)."""

    method = "dora"

    def __init__(self, base_layer: nn.Module, config: HyLoRADAConfig, name: str = "") -> None:
        super().__init__(base_layer, config, name)
        self.eps = config.norm_eps
        self.register_buffer("weight_norm_sq", row_norm_sq(dense_weight(base_layer)), persistent=False)
        m0 = self.weight_norm_sq.sqrt().to(self.lora_A.dtype)
        self.magnitude = nn.Parameter(m0.clone())

    @classmethod
    def param_shapes(cls, d_in: int, d_out: int, rank: int, **needed: int | None) -> dict[str, tuple[int, ...]]:
        """LoRA's A and B plus the magnitude m (d_out); ||W||²_row is a buffer."""
        return {**super().param_shapes(d_in, d_out, rank, **needed), "magnitude": (d_out,)}

    def weight_norm(self) -> torch.Tensor:
        """||W'||_row (no gradient), by the factored formula, once per forward of the layer.

        Not cached across forwards (micro-batches of one optimizer step): its cost is a
        d_out x d_in x r product, ~r/tokens of the layer's work (0.2% at r = 16 and 8192 tokens),
        and under torch.compile it is part of the graph; a cache would need a branch on whether
        A or B changed (parameter versions), i.e. a recompile or a graph break per step, and
        would go stale silently after edits through `.data` (tests/test_compile.py)."""
        return factored_weight_norm(self.base_layer, self.weight_norm_sq, self.lora_A, self.lora_B,
                                    self.scaling, self.eps)

    @staticmethod
    def scale_from_norm(n: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
        """c = m / ||W'||_row."""
        return magnitude / n

    def scale_params(self) -> tuple[torch.Tensor, ...]:
        return (self.magnitude,)

    def row_scale(self) -> torch.Tensor:
        return self.scale_from_norm(self.weight_norm(), *self.scale_params())

    def extra_state_names(self) -> tuple[str, ...]:
        return ("magnitude",)

    def _after_unmerge(self) -> None:
        self.weight_norm_sq.copy_(row_norm_sq(dense_weight(self.base_layer)))
