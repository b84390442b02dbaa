"""Each adapter class states what it trains (`n_trainable`, `adapter_params`); the benchmark's
budgets read that. The reference is torch's own count of the requires_grad parameters of a
really wrapped model."""
from __future__ import annotations

import pytest

from conftest import tiny_gpt2, tiny_llama
from hylorada import HyLoRADAConfig, HyLoRADAModel
from hylorada.adapters import ADAPTER_CLASSES
from hylorada.model import lorada_query_slice


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("method", sorted(ADAPTER_CLASSES))
@pytest.mark.parametrize("rank", [1, 4])
def test_n_trainable_is_what_a_wrapped_layer_trains(factory, method, rank):
    model = factory()
    wrapped = HyLoRADAModel(model, HyLoRADAConfig(method=method, lora_rank=rank, target_modules="all-linear"))
    total = 0
    for name, layer in wrapped.adapter_layers():
        torch_count = sum(p.numel() for p in layer.parameters() if p.requires_grad)
        needed = {}
        if method == "lorada":
            query = lorada_query_slice(model, name, layer.base_layer)
            needed["n_heads"] = query["n_heads"] if query else None
        n = type(layer).n_trainable(layer.in_features, layer.out_features, rank, **needed)
        assert n == torch_count, (name, n, torch_count)
        assert sum(p.numel() for p in layer.adapter_params().values()) == torch_count
        total += n
    assert total == sum(p.numel() for p in wrapped.trainable_parameters())


def test_frozen_parameters_are_left_out():
    cls = ADAPTER_CLASSES["hylorada"]
    assert cls.n_trainable(6, 5, 2) - cls.n_trainable(6, 5, 2, frozen=("gate",)) == 1
    assert cls.n_trainable(6, 5, 2, frozen=("gate", "residual")) == ADAPTER_CLASSES["dora"].n_trainable(6, 5, 2)
