"""GPU fast paths against their PyTorch references (the CUDA cases run where a GPU exists)."""
from __future__ import annotations

import pytest
import torch

from hylorada.adapters.kernels import column_dot, column_dot_reference, triton


@pytest.mark.parametrize("shape", [(1, 1), (37, 5), (300, 130), (1024, 257)])
def test_column_dot_cpu_matches_definition(shape):
    g = torch.randn(shape, dtype=torch.float64)
    y = torch.randn(shape, dtype=torch.float64)
    ref = torch.stack([g[:, j] @ y[:, j] for j in range(shape[1])])
    assert torch.allclose(column_dot(g, y, torch.float64), ref)
    assert torch.allclose(column_dot_reference(g.float(), y.float()).double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available() or triton is None, reason="needs CUDA and Triton")
@pytest.mark.parametrize("shape", [(1, 1), (37, 5), (8192, 2048), (5000, 5632), (3, 70000)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_column_dot_triton_matches_reference(shape, dtype):
    g = torch.randn(shape, device="cuda", dtype=dtype)
    y = torch.randn(shape, device="cuda", dtype=dtype)
    fast = column_dot(g, y)
    ref = (g.double() * y.double()).sum(0)
    assert torch.allclose(fast.double(), ref, rtol=1e-4, atol=1e-3 * shape[0] ** 0.5)
