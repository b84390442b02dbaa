"""One autograd Function for every adapter method on a dense frozen base:

    y = c ⊙ z + b,   z = W x + s·B A d(x)        (y = c ⊙ (z + b) when `scale_bias`)

c = 1 (LoRA), m/||W'|| (DoRA), (1-β)·m_eff/||W'|| + β (HyLoRADA), τ per query head (LoRaDA).
d is inverted dropout with a Bernoulli mask. Precision contract: z is computed in the compute
dtype (the autocast dtype, else x's), c stays in its own dtype (at least fp32) and is applied
to z in that precision, y = round(c ⊙ z) — the same rounding as the reference path. (Folding c
into bf16 weights, W_c = round(diag(c)·W), would erase every change of c below bf16's step
~2^-8, i.e. most of what magnitude learning does near c = 1.) Compared with composing autograd
ops it

- accumulates the low-rank term into the base GEMM (addmm) and applies c in one in-place
  elementwise pass over the tokens x d_out output (computed in c's dtype, stored in z's);
- saves for backward only x (an input, alive anyway), h = A d(x) (tokens x r), the dropout
  mask as bool, and for c the output y itself (which its consumer usually keeps anyway);
- backward: g_c = c ⊙ g (one elementwise pass, in c's precision), dL/dx = g_c W + (g_c s·B) A
  (masked), dL/dA = (g_c s·B)ᵀ d(x), dL/dB = s·c ⊙ (gᵀ h), and dL/dc_j = Σ_t g_tj y_tj / c_j
  (y includes c ⊙ b with `scale_bias`; an unscaled bias is added by the caller outside y);
- uses torch's fused dropout kernel (output and bool mask in one pass).
  A row with c_j = 0 exactly (a zero weight row under DoRA) gets dL/dc_j = 0 here; the
  reference path (`fused=False`) is exact there.

The reference is `AdapterLayer.reference_forward` (plain autograd); tests compare the two.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F



def dropout_with_mask(x: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverted dropout d(x) = x ⊙ mask / (1-p) and its bool mask, in one fused kernel; shared by
    the fused and the reference path (same random stream)."""
    return torch.native_dropout(x, p, True)


def apply_mask(x: torch.Tensor, mask: torch.Tensor, p: float) -> torch.Tensor:
    """x ⊙ mask / (1-p), one kernel (recomputes d(x) in backward instead of saving it)."""
    return torch.ops.aten.native_dropout_backward(x, mask, 1.0 / (1.0 - p))


class LowRankLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, A, B, c, scaling: float, p: float, scale_bias: bool):
        """x, weight, bias in the compute dtype; A, B, c in their own (master) dtype."""
        ctx.master_dtypes = (A.dtype, B.dtype)
        A, B = A.to(x.dtype), B.to(x.dtype)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if p > 0:
            xd, mask = dropout_with_mask(x2, p)
        else:
            mask, xd = None, x2
        h = xd @ A.t()
        y = F.linear(x2, weight, bias)  # bias is None here unless it is part of z (see callers)
        y.addmm_(h, B.t(), alpha=scaling)
        if c is not None:
            y.mul_(c)  # computed in c's dtype (type promotion), stored in the compute dtype
        ctx.scaling, ctx.p, ctx.scale_bias, ctx.shape = scaling, p, scale_bias, shape
        ctx.save_for_backward(x2, weight, bias, A, B, c, h, mask, y if c is not None else None)
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x2, weight, bias, A, B, c, h, mask, y = ctx.saved_tensors
        s, p = ctx.scaling, ctx.p
        g = grad_out.reshape(-1, grad_out.shape[-1])
        gc = g if c is None else torch.mul(g, c, out=torch.empty_like(g))  # c ⊙ g, c's precision
        u = (gc @ B).mul_(s)  # tokens x r
        grad_x = grad_A = grad_B = grad_c = None
        if ctx.needs_input_grad[0]:
            grad_x = gc @ weight
            if mask is None:
                grad_x.addmm_(u, A)
            else:
                grad_x.add_(apply_mask(u @ A, mask, p))
            grad_x = grad_x.view(ctx.shape)
        if ctx.needs_input_grad[3]:
            xd = x2 if mask is None else apply_mask(x2, mask, p)
            grad_A = u.t() @ xd
        if ctx.needs_input_grad[4]:
            gh = g.t() @ h
            grad_B = gh * s if c is None else gh.to(c.dtype) * (c * s)[:, None]
        if c is not None and ctx.needs_input_grad[5]:
            gy = (g * y).sum(0, dtype=c.dtype)
            if bias is not None and not ctx.scale_bias:  # callers pass such a bias outside instead
                gy = gy - bias.to(c.dtype) * g.sum(0, dtype=c.dtype)
            grad_c = (gy / c).where(c != 0, torch.zeros_like(gy))
        if grad_A is not None:
            grad_A = grad_A.to(ctx.master_dtypes[0])
        if grad_B is not None:
            grad_B = grad_B.to(ctx.master_dtypes[1])
        return grad_x, None, None, grad_A, grad_B, grad_c, None, None, None
