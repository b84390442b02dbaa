"""What users notice: one note (not one per layer) for thin whitening calibration in `compress`,
one warning in `analyze` when calibration tokens < input features, sizes labelled MiB."""
from __future__ import annotations

import re

import pytest
import torch

from conftest import tiny_llama
from hylorada.compress import CompressConfig, compress_model
from hylorada.compress.analyze import analyze_model
from hylorada.compress.api import find_target_layers
from hylorada.layers import in_out_features

pytestmark = pytest.mark.usefixtures("one_thread")


def _calib(n_blocks: int, seq_len: int = 16) -> torch.Tensor:
    return torch.randint(0, 100, (n_blocks, seq_len), generator=torch.Generator().manual_seed(0))


def test_compress_says_thin_calibration_once_with_the_layer_count():
    model = tiny_llama()  # hidden 32, intermediate 64: 14 target layers
    targets = find_target_layers(model)
    thin = sum(1 for m in targets.values() if 2 * 16 < 4 * in_out_features(m)[0])
    report = compress_model(model, CompressConfig(method="whiten", ratio=0.2), calibration=_calib(2))
    said = [n for n in report.notes if "calibration tokens" in n]
    assert thin == len(targets) == 14
    assert len(said) == 1 and said[0].startswith(f"{thin} of {len(targets)} layers")
    assert "12 layer(s) with 32 tokens for 32 input features" in said[0]
    assert "2 layer(s) with 32 tokens for 64 input features" in said[0]
    assert report.to_markdown().count("calibration tokens than") == 1
    # enough tokens (4 x 64 = 256 <= 16 x 16): no note at all
    ok = compress_model(tiny_llama(), CompressConfig(method="whiten", ratio=0.2), calibration=_calib(16))
    assert not [n for n in ok.notes if "calibration tokens" in n]


def test_analyze_warns_once_when_calibration_tokens_are_fewer_than_input_features():
    few = analyze_model(tiny_llama(), _calib(1, 20))  # 20 tokens < 32 and < 64 input features
    warned = [n for n in few.notes if n.startswith("WARNING")]
    assert len(warned) == 1 and warned[0].startswith("WARNING: 14 of 14 layers saw fewer calibration tokens (20)")
    assert few.to_markdown().count("WARNING") == 1
    # the reason: a whitened spectrum then has at most 20 non-zero values (up to the Cholesky jitter)
    assert all(float(l.whitened[20:].square().sum() / l.whitened.square().sum()) < 1e-3 for l in few.layers)
    mid = analyze_model(tiny_llama(), _calib(3, 16))  # 48 tokens: < 64 (down_proj) only
    warned = [n for n in mid.notes if n.startswith("WARNING")]
    assert len(warned) == 1 and warned[0].startswith("WARNING: 2 of 14 layers") and "down_proj" in warned[0]
    assert not [n for n in analyze_model(tiny_llama(), _calib(5, 16)).notes if n.startswith("WARNING")]


def test_printed_sizes_say_mib_not_mb():
    report = compress_model(tiny_llama(), CompressConfig(method="svd", ratio=0.2))
    text = report.summary() + "\n" + report.to_markdown()
    assert "MiB" in text and not re.search(r"\bMB\b", text)
