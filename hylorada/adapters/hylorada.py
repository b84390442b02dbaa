"""HyLoRADA: DoRA with orthogonal A, a gated magnitude and a learned DoRA/LoRA blend.

    y = [(1-β)·m_eff / ||W'||_row + β] ⊙ (W' x) + b,
    m_eff = g·m + (1-g)·m0,  g = σ(gate),  β = σ(residual),

i.e. y = (1-β)·DoRA(x) + β·LoRA(x). At init m = m0 = ||W||_row and B = 0, so the bracket is 1
(identity). It is a row scale c of W'x, so it merges exactly (W_merged = diag(c)·W') and
exports as plain DoRA with m_dora = c·||W'||_row.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import HyLoRADAConfig
from .dora import DoRALayer


class HyLoRADALayer(DoRALayer):
    """DoRA-family layer with c = (1-β)·(g·m + (1-g)·m0)/||W'||_row + β."""

    method = "hylorada"

    def __init__(self, base_layer: nn.Module, config: HyLoRADAConfig, name: str = "") -> None:
        super().__init__(base_layer, config, name)
        dt, dev = self.lora_A.dtype, self.lora_A.device
        self.register_buffer("magnitude_init", self.magnitude.detach().clone())  # m0, saved
        self.gate = nn.Parameter(torch.full((1,), float(config.gate_init), dtype=dt, device=dev))
        self.residual = nn.Parameter(torch.full((1,), float(config.residual_init), dtype=dt, device=dev))

    @classmethod
    def param_shapes(cls, d_in: int, d_out: int, rank: int, **needed: int | None) -> dict[str, tuple[int, ...]]:
        """DoRA's A, B and m plus the gate and the blend (one each); m0 is a buffer."""
        return {**super().param_shapes(d_in, d_out, rank, **needed), "gate": (1,), "residual": (1,)}

    @staticmethod
    def scale_from_norm(n: torch.Tensor, magnitude: torch.Tensor, magnitude_init: torch.Tensor,
                        gate: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """c = (1-β)·m_eff/||W'||_row + β, m_eff = m0 + σ(gate)·(m - m0), β = σ(residual)."""
        beta = torch.sigmoid(residual)
        m_eff = torch.lerp(magnitude_init, magnitude, torch.sigmoid(gate))
        return torch.addcdiv(beta, m_eff, n / (1 - beta))

    def scale_params(self) -> tuple[torch.Tensor, ...]:
        return (self.magnitude, self.magnitude_init, self.gate, self.residual)

    def effective_magnitude(self) -> torch.Tensor:
        """m_eff = g·m + (1-g)·m0."""
        return torch.lerp(self.magnitude_init, self.magnitude, torch.sigmoid(self.gate))

    def extra_state_names(self) -> tuple[str, ...]:
        return ("magnitude", "magnitude_init", "gate", "residual")
