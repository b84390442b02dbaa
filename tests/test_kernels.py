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


def _dora_layers(device: str):
    from conftest import tiny_qwen2

    from hylorada import HyLoRADAConfig, HyLoRADAModel
    out = []
    for method in ("dora", "hylorada"):
        model = HyLoRADAModel(tiny_qwen2().to(device), HyLoRADAConfig(method=method, lora_dropout=0.0))
        with torch.no_grad():
            for n, p in model.named_trainable_parameters():
                p.add_(torch.randn_like(p) * 0.1)
        out.extend(layer for _, layer in model.adapter_layers())
    return out


def test_scale_from_parts_equals_row_scale_cpu():
    """The function that the CUDA path compiles, run eagerly, equals the layers' row_scale."""
    from hylorada.adapters.dora import _scale_from_parts, weight_times_At
    for layer in _dora_layers("cpu"):
        WAt = weight_times_At(layer.base_layer, layer.lora_A)
        c = _scale_from_parts(type(layer).scale_from_norm, WAt, layer.lora_A, layer.lora_B,
                              layer.weight_norm_sq, layer.scaling, layer.eps, *layer.scale_params())
        assert torch.allclose(c, layer.row_scale(), rtol=1e-6, atol=1e-7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (torch.compile path)")
def test_compiled_row_scale_matches_eager_cuda():
    for layer in _dora_layers("cuda"):
        fast, ref = layer.fast_row_scale(), layer.row_scale()
        assert torch.allclose(fast, ref, rtol=1e-5, atol=1e-6)
        g = torch.randn_like(ref)
        (ga,) = torch.autograd.grad((fast * g).sum(), layer.magnitude)
        (gb,) = torch.autograd.grad((ref * g).sum(), layer.magnitude)
        assert torch.allclose(ga, gb, rtol=1e-5, atol=1e-6)
