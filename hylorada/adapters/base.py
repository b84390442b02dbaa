"""The shared adapter wrapper: a base layer (wrapped, never copied) plus a low-rank update.

Notation (docs/METHODS.md): W is d_out x d_in, A is r x d_in, B is d_out x r, s the scale,
W' = W + s·B A. Every method is described by two things:

- `row_scale()` -> c, a per-output-row scale (None for plain LoRA), and
- `scale_bias`, whether c also multiplies the bias.

so that one merge rule serves all of them: W_merged = diag(c)·W', b_merged = c ⊙ b (if
`scale_bias`) else b. On a `FactorizedLinear` base (W = up·down) the merge is exact by
concatenation: up' = diag(c)·[up | s·B], down' = [down ; A] (rank grows from k to k + r).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from transformers.pytorch_utils import Conv1D

from ..nn.factorized import FactorizedLinear
from ..config import HyLoRADAConfig
from ..layers import dense_weight, forward_no_bias, in_out_features, set_dense_weight
from .fused import LowRankLinear, dropout_with_mask


def adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """Adapters of half-precision bases are kept in fp32 (as peft does); autocast handles compute."""
    return torch.float32 if base_dtype in (torch.float16, torch.bfloat16) else base_dtype


def init_lora_A(A: torch.Tensor, init: str, rank: int) -> None:
    """kaiming: uniform(a=sqrt 5) as nn.Linear/peft; orthogonal: orthonormal rows; gaussian: N(0, 1/r)."""
    with torch.no_grad():
        if init == "kaiming":
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        elif init == "orthogonal":
            q = torch.empty(A.shape, dtype=torch.float32, device=A.device)
            nn.init.orthogonal_(q)
            A.copy_(q)
        elif init == "gaussian":
            nn.init.normal_(A, std=1.0 / rank)
        else:  # guarded by HyLoRADAConfig
            raise ValueError(f"init_lora_weights={init!r}: allowed 'kaiming', 'orthogonal', 'gaussian'")


class AdapterLayer(nn.Module):
    """y = c ⊙ (W x + s·B A d(x)) + b  (c ⊙ b when `scale_bias`); subclasses define c = `row_scale()`.

    d is inverted dropout on the low-rank path only (as LoRA). The forward runs the fused
    autograd Function (`fused.LowRankLinear`) on dense frozen bases, else `reference_forward`.
    """

    method = "base"
    scale_bias = False

    def __init__(self, base_layer: nn.Module, config: HyLoRADAConfig, name: str = "") -> None:
        super().__init__()
        d_in, d_out = in_out_features(base_layer)
        r = config.lora_rank
        if config.init_lora_weights == "orthogonal" and r > d_in:
            raise ValueError(
                f"HyLoRADAConfig.init_lora_weights='orthogonal' needs lora_rank <= d_in, but layer "
                f"'{name}' has d_in={d_in} < lora_rank={r}; allowed: lora_rank <= {d_in} or "
                f"init_lora_weights in ['kaiming', 'gaussian']")
        if r > min(d_in, d_out):
            raise ValueError(
                f"HyLoRADAConfig.lora_rank={r} is invalid for layer '{name}' ({d_out} x {d_in}): "
                f"allowed 1..{min(d_in, d_out)} (min(d_in, d_out))")
        ref = next(base_layer.parameters())
        dtype, device = adapter_dtype(ref.dtype), ref.device
        self.base_layer = base_layer
        self.name = name
        self.in_features, self.out_features, self.rank = d_in, d_out, r
        self.scaling = config.scaling
        self.lora_A = nn.Parameter(torch.empty(r, d_in, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(d_out, r, dtype=dtype, device=device))
        init_lora_A(self.lora_A, config.init_lora_weights, r)
        self.dropout_p = float(config.lora_dropout)
        self.fused = bool(config.fused)
        self.merged = False
        self._merged_scale: torch.Tensor | None = None
        self._merged_rank: int | None = None

    # ---- what it trains ------------------------------------------------------------------
    @classmethod
    def param_shapes(cls, d_in: int, d_out: int, rank: int, **needed: int | None) -> dict[str, tuple[int, ...]]:
        """{name: shape} of the parameters this method trains on a d_out x d_in layer at `rank`:
        A (r x d_in) and B (d_out x r); subclasses add theirs (`needed`: e.g. LoRaDA's n_heads)."""
        return {"lora_A": (rank, d_in), "lora_B": (d_out, rank)}

    @classmethod
    def n_trainable(cls, d_in: int, d_out: int, rank: int, frozen: tuple[str, ...] = (),
                    **needed: int | None) -> int:
        """Trainable parameters of one wrapped layer, the ones named in `frozen` left out:
        LoRA r·(d_in + d_out); DoRA + d_out; HyLoRADA + d_out + 2; LoRaDA + n_heads on a query."""
        return sum(math.prod(shape) for name, shape in cls.param_shapes(d_in, d_out, rank, **needed).items()
                   if name not in frozen)

    def adapter_params(self) -> dict[str, nn.Parameter]:
        """The parameters this layer trains (its own, not the wrapped base layer's)."""
        return dict(self.named_parameters(recurse=False))

    # ---- the math every method shares -------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        """ΔW = s·B A (d_out x d_in)."""
        return self.scaling * (self.lora_B @ self.lora_A)

    def lora_out(self, x: torch.Tensor) -> torch.Tensor:
        """s·B A x for already-dropped-out x, computed in the adapter's dtype."""
        h = F.linear(F.linear(x.to(self.lora_A.dtype), self.lora_A), self.lora_B)
        return h * self.scaling

    def row_scale(self) -> torch.Tensor | None:
        """c (d_out) such that the layer is c ⊙ (W' x) (+ b); None means c = 1."""
        return None

    def dropout(self, x: torch.Tensor) -> torch.Tensor:
        """Inverted dropout (the same kernel and random stream as the fused path)."""
        if not self.training or self.dropout_p == 0:
            return x
        return dropout_with_mask(x, self.dropout_p)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        base = self.base_layer
        if self.fused and isinstance(base, (nn.Linear, Conv1D)) and not base.weight.requires_grad:
            return self.fused_forward(x)
        return self.reference_forward(x)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Plain autograd: z = W x + s·B A d(x); y = c ⊙ z + b, or c ⊙ (z + b) with `scale_bias`."""
        z = forward_no_bias(self.base_layer, x)
        z = z + self.lora_out(self.dropout(x)).to(z.dtype)
        c, bias = self.row_scale(), self.base_layer.bias
        if c is None:
            return z if bias is None else z + bias
        if self.scale_bias and bias is not None:
            return (c * (z + bias)).to(z.dtype)
        y = (c * z).to(z.dtype)
        return y if bias is None else y + bias

    def fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The same function through `LowRankLinear` in the autocast dtype (if any) or x's dtype."""
        dev = x.device.type
        dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        base = self.base_layer
        w = dense_weight(base)
        bias = base.bias
        c = self.row_scale()
        # dL/dc is recovered from the saved output y = c ⊙ z (+ b); keeping an unscaled bias out
        # of y avoids the cancellation in (y - b) / c when |b| >> |c ⊙ z|.
        late_bias = bias if (c is not None and not self.scale_bias) else None
        with torch.autocast(dev, enabled=False):
            y = LowRankLinear.apply(
                x.to(dt), w.to(dt), None if (bias is None or late_bias is not None) else bias.to(dt),
                self.lora_A, self.lora_B, None if c is None else c.to(_acc(dt)),
                self.scaling, self.dropout_p if self.training else 0.0, self.scale_bias)
            return y if late_bias is None else y + late_bias.to(dt)

    def extra_state_names(self) -> tuple[str, ...]:
        """Names of this layer's trainable or saved tensors besides lora_A/lora_B."""
        return ()

    # ---- merge / unmerge --------------------------------------------------------------
    @torch.no_grad()
    def merge(self) -> None:
        """W <- diag(c)·(W + s·B A) (and b <- c ⊙ b when `scale_bias`), computed in W's dtype
        promoted to at least fp32 (fp64 stays fp64)."""
        if self.merged:
            return
        c = self.row_scale()
        c = None if c is None else c.detach().clone()
        base = self.base_layer
        if isinstance(base, FactorizedLinear):
            self._merge_factorized(base, c)
        else:
            w = dense_weight(base)
            acc = _acc(w.dtype)
            new = w.to(acc) + self.delta_weight().to(acc)
            if c is not None:
                new = c.to(acc)[:, None] * new
            set_dense_weight(base, new.to(w.dtype))
        if c is not None and self.scale_bias and base.bias is not None:
            base.bias.mul_(c.to(base.bias.dtype))
        self._merged_scale = c
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Inverse of `merge`: W <- W_merged / c - s·B A."""
        if not self.merged:
            return
        c = self._merged_scale
        base = self.base_layer
        if c is not None and self.scale_bias and base.bias is not None:
            base.bias.div_(c.to(base.bias.dtype))
        if isinstance(base, FactorizedLinear):
            k = self._merged_rank
            up = base.up.weight[:, :k]
            if c is not None:
                up = up / c.to(up.dtype)[:, None]
            _set_factors(base, up, base.down.weight[:k])
        else:
            w = dense_weight(base)
            acc = _acc(w.dtype)
            old = w.to(acc)
            if c is not None:
                old = old / c.to(acc)[:, None]
            set_dense_weight(base, (old - self.delta_weight().to(acc)).to(w.dtype))
        self._merged_scale = None
        self.merged = False
        self._after_unmerge()

    def _merge_factorized(self, base: FactorizedLinear, c: torch.Tensor | None) -> None:
        self._merged_rank = base.rank
        B = (self.scaling * self.lora_B).to(base.up.weight.dtype)
        up = torch.cat([base.up.weight, B], dim=1)
        if c is not None:
            up = c.to(up.dtype)[:, None] * up
        down = torch.cat([base.down.weight, self.lora_A.to(base.down.weight.dtype)], dim=0)
        _set_factors(base, up, down)

    def _after_unmerge(self) -> None:
        """Hook for subclasses that cache something derived from W."""

    def extra_repr(self) -> str:
        return f"method={self.method}, r={self.rank}, scaling={self.scaling:g}, merged={self.merged}"


def _acc(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: at least float32."""
    return torch.promote_types(dtype, torch.float32)


def _set_factors(layer: FactorizedLinear, up: torch.Tensor, down: torch.Tensor) -> None:
    """Replace the factors of a FactorizedLinear (the rank may change); the bias is kept."""
    k = up.shape[1]
    bias = layer.up.bias
    new_up = nn.Linear(k, up.shape[0], bias=bias is not None, device=up.device, dtype=up.dtype)
    new_down = nn.Linear(down.shape[1], k, bias=False, device=down.device, dtype=down.dtype)
    new_up.weight.data.copy_(up)
    new_down.weight.data.copy_(down)
    if bias is not None:
        new_up.bias = bias
    for p in (new_up.weight, new_down.weight):
        p.requires_grad_(layer.up.weight.requires_grad)
    layer.up, layer.down = new_up, new_down
