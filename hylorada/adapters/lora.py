"""LoRA (Hu et al. 2021): y = W x + b + s·B A dropout(x); A kaiming-uniform, B = 0 (identity at init)."""
from __future__ import annotations

import torch

from .base import AdapterLayer


class LoRALayer(AdapterLayer):
    """y = base(x) + s·B A dropout(x)."""

    method = "lora"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged:
            return out
        return out + self.lora_out(self.dropout(x)).to(out.dtype)
