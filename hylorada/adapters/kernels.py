"""GPU fast paths with their plain PyTorch references (the tests compare the two on CUDA; CI,
which has no GPU, runs the references).

- `column_dot(g, y)`: Σ_t g[t, j]·y[t, j] for each column j, accumulated in float32. The
  reference `(g * y).sum(0)` writes a tokens x d temporary; the Triton kernel reads g and y once.
"""
from __future__ import annotations

import torch

try:  # Triton ships with CUDA builds of torch; CPU builds have none.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


def column_dot_reference(g: torch.Tensor, y: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (g * y).sum(0, dtype=dtype)


if triton is not None:
    @triton.jit
    def _column_dot_kernel(G, Y, OUT, T, D, stride_g, stride_y, ROWS_PER_PROG,
                           BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        pid_d = tl.program_id(0)
        pid_t = tl.program_id(1)
        cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        start = pid_t * ROWS_PER_PROG
        for t0 in range(start, start + ROWS_PER_PROG, BLOCK_T):
            rows = t0 + tl.arange(0, BLOCK_T)
            ok = (rows[:, None] < T) & (rows[:, None] < start + ROWS_PER_PROG) & col_ok[None, :]
            gv = tl.load(G + rows[:, None] * stride_g + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            yv = tl.load(Y + rows[:, None] * stride_y + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            acc += tl.sum(gv * yv, axis=0)
        tl.store(OUT + pid_t * D + cols, acc, mask=col_ok)


def column_dot(g: torch.Tensor, y: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Σ_t g[t, j]·y[t, j] for 2-D g, y of the same shape; Triton on CUDA, else the reference."""
    if (triton is None or not g.is_cuda or dtype != torch.float32 or g.dim() != 2
            or g.stride(1) != 1 or y.stride(1) != 1 or g.shape != y.shape):
        return column_dot_reference(g, y, dtype)
    T, D = g.shape
    BLOCK_T, BLOCK_D = 32, 128
    n_col = triton.cdiv(D, BLOCK_D)
    splits = max(1, min(triton.cdiv(T, BLOCK_T), triton.cdiv(4 * 132, n_col)))
    rows_per_prog = triton.cdiv(triton.cdiv(T, splits), BLOCK_T) * BLOCK_T
    splits = triton.cdiv(T, rows_per_prog)
    partial = torch.empty((splits, D), device=g.device, dtype=torch.float32)
    _column_dot_kernel[(n_col, splits)](g, y, partial, T, D, g.stride(0), y.stride(0), rows_per_prog,
                                        BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D)
    return partial.sum(0)
