"""LoRaDA: LoRA on the attention projections + a learned per-head attention temperature.

The original "direct attention adapter" α_h·scores + β_h: β_h cancels in the softmax, α_h is a
per-head temperature of the logits q_h·k / sqrt(d). We apply it as a per-query-head scale τ_h of
q_proj's output (RoPE is linear per head, so it commutes): q_h <- τ_h ⊙ (W'_q x + b_q)_h.
That is a row scale with `scale_bias`, so it merges into q_proj (weights and bias). With
grouped-query attention τ is per query head. τ = 1 at init (identity).
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import HyLoRADAConfig
from .lora import LoRALayer


class LoRaDALayer(LoRALayer):
    """LoRA; on the query projection y <- t ⊙ (W' x + b), t = τ_head inside the query slice, 1 elsewhere."""

    method = "lorada"
    scale_bias = True

    def __init__(self, base_layer: nn.Module, config: HyLoRADAConfig, name: str = "",
                 n_heads: int | None = None, q_offset: int = 0, q_size: int | None = None) -> None:
        super().__init__(base_layer, config, name)
        self.n_heads = n_heads
        if n_heads is None:
            self.temperature = None
            return
        q_size = self.out_features - q_offset if q_size is None else q_size
        if q_size % n_heads:
            raise ValueError(f"LoRaDA: query size {q_size} of '{name}' is not a multiple of n_heads={n_heads}")
        self.q_offset, self.q_size, self.head_dim = q_offset, q_size, q_size // n_heads
        self.temperature = nn.Parameter(torch.full((n_heads,), float(config.temperature_init),
                                                   dtype=self.lora_A.dtype, device=self.lora_A.device))

    def row_scale(self) -> torch.Tensor | None:
        """t (d_out): τ_h repeated over each head's dims inside the query slice, 1 elsewhere."""
        if self.temperature is None:
            return None
        t = self.temperature.repeat_interleave(self.head_dim)
        before = self.q_offset
        after = self.out_features - self.q_offset - self.q_size
        if before or after:
            one = t.new_ones(())
            t = torch.cat([one.expand(before), t, one.expand(after)])
        return t

    def extra_state_names(self) -> tuple[str, ...]:
        return ("temperature",) if self.temperature is not None else ()
