"""Casting a model's weights without touching the buffers transformers keeps in float32."""
from __future__ import annotations

import torch


def cast_weights(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast every floating parameter and persistent buffer to `dtype`, in place; non-persistent
    floating buffers keep their dtype. transformers builds RoPE's `inv_freq` in float32 whatever
    the model dtype (`from_pretrained(dtype=bf16)` keeps it so); `model.to(bf16)` would round it
    to bf16 and shift every rotary angle (by ~1 radian at position 1000)."""
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
        keep = module._non_persistent_buffers_set
        for name, b in module.named_buffers(recurse=False):
            if b.is_floating_point() and b.dtype != dtype and name not in keep:
                setattr(module, name, b.to(dtype))
    return model
