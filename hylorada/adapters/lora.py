"""LoRA (Hu et al. 2021): y = W x + b + s·B A dropout(x); A kaiming-uniform, B = 0 (identity at init).

It is the shared `AdapterLayer` forward with c = 1; merge: W <- W + s·B A.
"""
from __future__ import annotations

from .base import AdapterLayer


class LoRALayer(AdapterLayer):
    """y = base(x) + s·B A dropout(x)."""

    method = "lora"
