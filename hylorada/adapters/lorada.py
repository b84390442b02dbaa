"""LoRaDA: LoRA on the attention projections + a learned per-head attention temperature.

The original "direct attention adapter" α_h·scores + β_h: β_h cancels in the softmax, α_h is a
per-head temperature of the logits q_h·k / sqrt(d). We apply it as a per-query-head scale τ_h of
q (RoPE is linear per head, so it commutes). τ = 1 at init (identity). Two placements:

- no q-norm (Llama, Qwen2, GPT-2, ...): q_h <- τ_h ⊙ (W'_q x + b_q)_h, a row scale of q_proj with
  `scale_bias`, so it merges exactly into q_proj (weights and bias). With grouped-query attention
  τ is per query head; on a fused qkv layer (GPT-2 c_attn) only the query slice is scaled.
- a norm on q after q_proj (Qwen3 and Gemma-3: a per-head RMSNorm `self_attn.q_norm`; OLMo-2:
  one over the whole q). Such a norm cancels any per-head scale of q_proj's output
  (RMS(τ z) = τ RMS(z)), so τ acts after it: `QueryNormTemperature` wraps the norm,
  q_h <- τ_h ⊙ norm(W'_q x)_h, and q_proj keeps plain LoRA. The norm's weight is shared by the
  heads, so τ does not fold into it: merging keeps the wrapper (exact; the merged model is then
  not a plain transformers model, which `HyLoRADAModel.merge_and_unload` says).
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import HyLoRADAConfig
from ..errors import HyloradaError
from .lora import LoRALayer

QUERY_NORM_NAMES = ("q_norm", "query_norm", "q_layernorm", "q_ln")


class LoRaDALayer(LoRALayer):
    """LoRA; on the query projection y <- t ⊙ (W' x + b), t = τ_head inside the query slice, 1
    elsewhere — unless `after_norm`, where a `QueryNormTemperature` applies τ instead."""

    method = "lorada"
    scale_bias = True

    def __init__(self, base_layer: nn.Module, config: HyLoRADAConfig, name: str = "",
                 n_heads: int | None = None, q_offset: int = 0, q_size: int | None = None) -> None:
        super().__init__(base_layer, config, name)
        self.n_heads = n_heads
        self.after_norm = False
        if n_heads is None:
            self.temperature = None
            return
        q_size = self.out_features - q_offset if q_size is None else q_size
        if q_size % n_heads:
            raise ValueError(f"LoRaDA: query size {q_size} of '{name}' is not a multiple of n_heads={n_heads}")
        self.q_offset, self.q_size, self.head_dim = q_offset, q_size, q_size // n_heads
        self.temperature = nn.Parameter(torch.full((n_heads,), float(config.temperature_init),
                                                   dtype=self.lora_A.dtype, device=self.lora_A.device))

    @classmethod
    def param_shapes(cls, d_in: int, d_out: int, rank: int, n_heads: int | None = None,
                     **needed: int | None) -> dict[str, tuple[int, ...]]:
        """LoRA's A and B plus, on a query projection (n_heads given), one temperature per head."""
        shapes = super().param_shapes(d_in, d_out, rank, **needed)
        return shapes if n_heads is None else {**shapes, "temperature": (n_heads,)}

    def row_scale(self) -> torch.Tensor | None:
        """t (d_out): τ_h repeated over each head's dims inside the query slice, 1 elsewhere."""
        if self.temperature is None or self.after_norm:
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


def find_query_norm(attention: nn.Module) -> str | None:
    """Name of the child of `attention` that normalises q after q_proj: one named in
    QUERY_NORM_NAMES, else the one whose name starts with 'q' and whose class name contains
    'Norm'; None if there is none (an `nn.Identity` placeholder does not count)."""
    children = dict(attention.named_children())
    named = [n for n in QUERY_NORM_NAMES if n in children]
    guessed = [n for n, m in children.items() if n.startswith("q") and "norm" in type(m).__name__.lower()]
    for name in named + guessed:
        if not isinstance(children[name], (nn.Identity, QueryNormTemperature)):
            return name
    return None


class QueryNormTemperature(nn.Module):
    """out = τ_h ⊙ norm(q)_h: the LoRaDA temperature applied after a norm on q.

    The head of each vector: a norm over the whole q (last dim n_heads·head_dim) is split into
    heads; a per-head norm (last dim head_dim) sees a view of q_proj's contiguous output,
    [b, s, h, d] (Qwen3) or its transpose [b, h, s, d] (Gemma-3), and the head axis is the one
    of size n_heads — if two have that size, the one whose stride is head_dim.
    τ is the parameter of the query `LoRaDALayer` (`source`) while the adapter is attached; after
    `detach_temperature` it is a frozen buffer copy of it (merged model).
    """

    def __init__(self, norm: nn.Module, source: LoRaDALayer) -> None:
        super().__init__()
        self.norm = norm
        self.n_heads, self.head_dim = source.n_heads, source.head_dim
        self._source = [source]  # a list: not registered, the parameter stays the q layer's

    def tau(self) -> torch.Tensor:
        return self._source[0].temperature if self._source else self.temperature

    @torch.no_grad()
    def detach_temperature(self) -> None:
        """Keep τ as this module's own buffer `temperature` and forget the adapter layer."""
        self.register_buffer("temperature", self.tau().detach().clone())
        self._source = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """τ is applied in its own dtype (at least fp32) and the result rounded once to the
        norm's output dtype: a bf16 τ would erase changes below 2^-8 (as the fused path's c)."""
        out = self.norm(x)
        tau = self.tau()
        wide = out.to(torch.promote_types(out.dtype, tau.dtype))
        h, d = self.n_heads, self.head_dim
        if h == 1:
            return (wide * tau).to(out.dtype)
        if out.shape[-1] == h * d:
            return (wide.unflatten(-1, (h, d)) * tau[:, None]).flatten(-2).to(out.dtype)
        if out.shape[-1] == d:
            shape = [1] * out.dim()
            shape[head_axis(x, h, d)] = h
            return (wide * tau.view(shape)).to(out.dtype)
        raise HyloradaError(f"LoRaDA: the query norm's output has last dim {out.shape[-1]}, neither "
                            f"head_dim={d} nor n_heads*head_dim={h * d}; this attention layout is "
                            "not supported with method='lorada'")


def head_axis(x: torch.Tensor, n_heads: int, head_dim: int) -> int:
    """The axis of x (..., head_dim) that indexes the heads (see `QueryNormTemperature`)."""
    axes = [i for i in range(x.dim() - 1) if x.shape[i] == n_heads]
    if len(axes) > 1:
        axes = [i for i in axes if x.stride(i) == head_dim]
    if len(axes) != 1:
        raise HyloradaError(f"LoRaDA: cannot tell the head axis of the query norm's input of shape "
                            f"{tuple(x.shape)}, strides {x.stride()} (n_heads={n_heads}, "
                            f"head_dim={head_dim}); this attention layout is not supported with "
                            "method='lorada'")
    return axes[0]
