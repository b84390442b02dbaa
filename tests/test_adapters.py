"""The four adapter methods against independent references (peft, direct formulas)."""
from __future__ import annotations

import dataclasses
import json
import logging
import math

import pytest
import torch
from conftest import FACTORIES, VOCAB, copy_adapters_into_peft, tiny_gpt2, tiny_llama, tiny_qwen2
from torch import nn
from transformers import AutoModelForCausalLM, Gemma3TextConfig, Qwen3Config

from hylorada import HyLoRADAConfig, HyLoRADAModel
from hylorada.adapters import DoRALayer, HyLoRADALayer
from hylorada.adapters.dora import direct_weight_norm, factored_weight_norm
from hylorada.compress.factorized import FactorizedLinear
from hylorada.layers import dense_weight

peft = pytest.importorskip("peft")

METHODS = ["lora", "dora", "hylorada", "lorada"]


def wrap(arch: str, method: str, **kw) -> HyLoRADAModel:
    kw.setdefault("lora_dropout", 0.0)
    kw.setdefault("lora_rank", 4)
    return HyLoRADAModel(FACTORIES[arch](), HyLoRADAConfig(method=method, **kw))


@torch.no_grad()
def randomize(model: HyLoRADAModel, seed: int = 7) -> None:
    """Every trainable parameter to random non-zero values (B included)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_trainable_parameters():
        noise = torch.randn(p.shape, generator=g) * 0.2
        if name.endswith(("lora_A", "lora_B")):
            p.copy_(noise)
        else:
            p.add_(noise)


def logits(model, ids):
    return model(input_ids=ids).logits


def tiny_qwen3(seed: int = 0) -> nn.Module:
    """Qwen3: per-head RMSNorm q_norm/k_norm on [b, s, h, d] (before the transpose); GQA 4/2.
    initializer_range 0.2 so that attention is far from uniform (a temperature matters)."""
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(Qwen3Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
        tie_word_embeddings=True, initializer_range=0.2)).eval()


def tiny_gemma3(seed: int = 0) -> nn.Module:
    """Gemma-3: q_norm (weight 1 + w) on [b, h, s, d] (after the transpose), scaled embeddings."""
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
        sliding_window=8, query_pre_attn_scalar=8, initializer_range=0.2)).eval()


QNORM_FACTORIES = {"qwen3": tiny_qwen3, "gemma3": tiny_gemma3}


# ---------------------------------------------------------------------------------- identity
@pytest.mark.parametrize("method", METHODS)
def test_identity_at_init(arch, method, input_ids):
    base = FACTORIES[arch]()
    ref = logits(base, input_ids)
    model = wrap(arch, method, target_modules="all-linear")
    assert (logits(model, input_ids) - ref).abs().max().item() <= 1e-6


def test_default_targets_are_attention_projections():
    assert {n.rsplit(".", 1)[1] for n in wrap("llama", "lora").target_names} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert {n.split(".", 3)[3] for n in wrap("gpt2", "lora").target_names} == {"attn.c_attn", "attn.c_proj"}


def test_only_adapter_parameters_train():
    model = wrap("qwen2", "hylorada")
    names = [n for n, _ in model.named_trainable_parameters()]
    assert names and all(n.rsplit(".", 1)[1] in {"lora_A", "lora_B", "magnitude", "gate", "residual"} for n in names)


# ---------------------------------------------------------------------------- peft reference
def _peft_pair(arch: str, method: str, rslora: bool = False):
    ours = wrap(arch, method, lora_rank=4, lora_alpha=8.0, use_rslora=rslora, target_modules="all-linear")
    randomize(ours)
    cfg = peft.LoraConfig(r=4, lora_alpha=8.0, lora_dropout=0.0, use_rslora=rslora,
                          target_modules=list(ours.target_names), use_dora=method == "dora",
                          fan_in_fan_out=arch == "gpt2", init_lora_weights=True)
    theirs = peft.get_peft_model(FACTORIES[arch](), cfg)
    copy_adapters_into_peft(ours, theirs)
    return ours, theirs


@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("rslora", [False, True])
def test_matches_peft_forward_and_gradients(arch, method, rslora, input_ids):
    ours, theirs = _peft_pair(arch, method, rslora)
    ours.train(), theirs.train()  # dropout is 0: train mode must not change anything
    a, b = logits(ours, input_ids), logits(theirs, input_ids)
    assert (a - b).abs().max().item() <= 1e-5
    w = torch.randn(a.shape, generator=torch.Generator().manual_seed(1))
    (a * w).sum().backward()
    (b * w).sum().backward()
    checked = 0
    for name, layer in ours.adapter_layers():
        pl = theirs.base_model.model.get_submodule(name)
        pairs = [(layer.lora_A, pl.lora_A["default"].weight), (layer.lora_B, pl.lora_B["default"].weight)]
        if method == "dora":
            pairs.append((layer.magnitude, pl.lora_magnitude_vector["default"].weight))
        for p, q in pairs:
            scale = max(q.grad.abs().max().item(), 1e-3)
            assert (p.grad - q.grad).abs().max().item() <= 1e-5 * max(1.0, scale), name
            checked += 1
    assert checked >= 2 * len(ours.target_names)


@pytest.mark.parametrize("method", ["lora", "dora", "hylorada"])
def test_export_peft_reproduces_outputs(arch, method, tmp_path, input_ids):
    ours = wrap(arch, method, target_modules="all-linear")
    randomize(ours)
    expected = logits(ours, input_ids)
    ours.export_peft(tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["use_dora"] == (method != "lora")
    loaded = peft.PeftModel.from_pretrained(FACTORIES[arch](), str(tmp_path / "peft")).eval()
    assert (logits(loaded, input_ids) - expected).abs().max().item() <= 1e-5


def test_export_peft_refuses_lorada(tmp_path):
    with pytest.raises(ValueError, match="lorada"):
        wrap("llama", "lorada").export_peft(tmp_path)


# ------------------------------------------------------------------------------------ norms
@pytest.mark.parametrize("kind", ["linear", "conv1d", "factorized"])
def test_factored_norm_equals_direct_norm(kind):
    model = {"linear": tiny_llama, "conv1d": tiny_gpt2, "factorized": tiny_llama}[kind]()
    layer = model.get_submodule("model.layers.0.mlp.up_proj" if kind != "conv1d" else "transformer.h.0.mlp.c_fc")
    if kind == "factorized":
        W = dense_weight(layer).detach()
        layer = FactorizedLinear.from_factors(W[:, :16].clone(), torch.randn(16, W.shape[1]))
    g = torch.Generator().manual_seed(0)
    d_out = dense_weight(layer).shape[0]
    A, B = torch.randn(6, dense_weight(layer).shape[1], generator=g), torch.randn(d_out, 6, generator=g)
    norm_sq = dense_weight(layer).detach().double().pow(2).sum(1).float()
    fast = factored_weight_norm(layer, norm_sq, A, B, 0.7, 1e-6)
    ref = direct_weight_norm(layer, A, B, 0.7)
    assert torch.allclose(fast.double(), ref, rtol=1e-5, atol=1e-6)


def test_zero_norm_row_gives_no_nan(input_ids):
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[3].zero_()
    ref = logits(model, input_ids)
    wrapped = HyLoRADAModel(model, HyLoRADAConfig(method="dora", lora_dropout=0.0))
    out = logits(wrapped, input_ids)
    assert torch.isfinite(out).all() and (out - ref).abs().max() <= 1e-6


def test_dropout_formula_in_training_mode():
    """DoRA with dropout d on the low-rank path: y = c ⊙ (W x + s·B A d(x)) + b."""
    model = HyLoRADAModel(tiny_qwen2(), HyLoRADAConfig(method="dora", lora_dropout=0.3, lora_rank=4))
    randomize(model)
    model.train()
    name, layer = next(model.adapter_layers())
    x = torch.randn(3, 5, layer.in_features)
    for fused in (True, False):
        layer.fused = fused
        torch.manual_seed(11)
        y = layer(x)
        torch.manual_seed(11)
        keep = torch.native_dropout(x, 0.3, True)[1].float()
        xd = x * keep / 0.7
        W, b = dense_weight(layer.base_layer), layer.base_layer.bias
        c = layer.magnitude / direct_weight_norm(layer.base_layer, layer.lora_A, layer.lora_B, layer.scaling).float()
        ref = c * (x @ W.T + layer.scaling * (xd @ layer.lora_A.T @ layer.lora_B.T)) + b
        assert (y - ref).abs().max().item() <= 1e-5, fused
        assert 0.1 < (keep == 0).float().mean() < 0.5


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_fused_path_equals_reference_path(arch, method, dropout, input_ids):
    """The fused autograd Function against plain autograd: outputs and every gradient (float64,
    so that any difference is the math, not rounding; float32 is covered by the peft tests)."""
    results = []
    for fused in (True, False):
        model = wrap(arch, method, lora_dropout=dropout, fused=fused, target_modules="all-linear")
        randomize(model)
        model.double()
        model.train()
        emb = model.model.get_input_embeddings()
        emb.weight.requires_grad_(True)  # so that the gradient w.r.t. the layers' inputs is checked too
        torch.manual_seed(5)
        out = logits(model, input_ids)
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        (out * w).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.model.named_parameters() if p.grad is not None}
        results.append((out.detach(), grads))
    (a, ga), (b, gb) = results
    assert (a - b).abs().max().item() <= 1e-10
    assert ga.keys() == gb.keys() and len(ga) > 2 * len(model.target_names)
    for k in ga:
        scale = max(1.0, gb[k].abs().max().item())
        assert (ga[k] - gb[k]).abs().max().item() <= 1e-10 * scale, k


class _OneLinear(nn.Module):
    """A single fp32 layer, so that peft and ours wrap the same thing."""

    def __init__(self, d_in: int = 64, d_out: int = 128) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(d_in, d_out, bias=False).requires_grad_(False)  # frozen: fused path


def _scaled_outputs(layer: DoRALayer, x: torch.Tensor, c_minus_1: float, peft_layer=None) -> torch.Tensor:
    """Set m = (1 + c_minus_1)·||W'||_row (so c = 1 + c_minus_1 exactly in fp32) and return the
    layer's output under bf16 autocast."""
    n = direct_weight_norm(layer.base_layer, layer.lora_A, layer.lora_B, layer.scaling).float()
    with torch.no_grad():
        layer.magnitude.copy_((1 + c_minus_1) * n)
        if peft_layer is not None:
            peft_layer.lora_magnitude_vector["default"].weight.copy_(layer.magnitude)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return (peft_layer if peft_layer is not None else layer)(x).float()


@pytest.mark.parametrize("c_minus_1, tol", [(0.003, 1e-4), (0.01, 3e-4)])
def test_fused_row_scale_is_not_rounded_to_bf16(c_minus_1, tol):
    """Under bf16 autocast (fp32 base) a change of c below bf16's step at 1 (2^-7) must reach the
    output: the least-squares slope of y(c) against y(c = 1) (same path) is c - 1 on the fused
    path, the reference path and peft's DoRA alike. Tolerance: rounding round(c ⊙ z) of a bf16 z
    moves the slope by ~3e-5 at 0.003 and 2.5e-4 at 0.01 (reference path too; peft returns fp32
    there). Folding c into bf16 weights (the old fused path) gave 0 and 0.0069."""
    model = _OneLinear()
    layer = DoRALayer(model.proj, HyLoRADAConfig(method="dora", lora_rank=4, lora_alpha=8.0, lora_dropout=0.0))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * 0.1)
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)
    x = torch.randn(1024, 64, generator=g)
    cfg = peft.LoraConfig(r=4, lora_alpha=8.0, lora_dropout=0.0, target_modules=["proj"], use_dora=True)
    theirs = peft.get_peft_model(_OneLinear(), cfg)
    pl = theirs.base_model.model.proj
    with torch.no_grad():
        pl.lora_A["default"].weight.copy_(layer.lora_A)
        pl.lora_B["default"].weight.copy_(layer.lora_B)
    slopes = {}
    for path in ("fused", "reference", "peft"):
        layer.fused = path == "fused"
        with torch.no_grad():
            y1 = _scaled_outputs(layer, x, 0.0, pl if path == "peft" else None).double()
            y = _scaled_outputs(layer, x, c_minus_1, pl if path == "peft" else None).double()
        slopes[path] = ((y * y1).sum() / (y1 * y1).sum()).item() - 1
    assert abs(slopes["reference"] - c_minus_1) <= tol, slopes
    assert abs(slopes["peft"] - c_minus_1) <= tol, slopes
    assert abs(slopes["fused"] - slopes["reference"]) <= 1e-4, slopes
    assert abs(slopes["fused"] - slopes["peft"]) <= tol, slopes


def test_fused_gradients_match_reference_under_bf16_autocast():
    """dL/dx, dL/dA, dL/dB, dL/dm of the fused path against plain autograd, bf16 autocast, with
    c - 1 = 0.003 and a bias (which stays outside c): within bf16 rounding (2e-2 of the norm)."""
    results = {}
    for fused in (True, False):
        torch.manual_seed(0)
        base = nn.Linear(64, 128).requires_grad_(False)  # frozen base: the fused path applies
        layer = DoRALayer(base, HyLoRADAConfig(method="dora", lora_rank=4, lora_dropout=0.0, fused=fused))
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * 0.1)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)
            layer.magnitude.mul_(1.003)
        x = torch.randn(256, 64, generator=g, requires_grad=True)
        w = torch.randn(256, 128, generator=g)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
        (y.float() * w).sum().backward()
        results[fused] = {"y": y.detach().float(), "x": x.grad, "A": layer.lora_A.grad,
                          "B": layer.lora_B.grad, "m": layer.magnitude.grad}
    for k in results[True]:
        a, b = results[True][k], results[False][k]
        assert a is not None and b.abs().max() > 0, k
        assert ((a - b).norm() / b.norm()).item() <= 2e-2, k


# ------------------------------------------------------------------------------- HyLoRADA math
def _hylorada_by_hand(m, m0, gate, residual, W, b, A, B, s, x):
    """y = [(1-β)·(m0 + σ(gate)·(m - m0))/||W'||_row + β] ⊙ (W' x) + b, W' = W + s·B A,
    ||W'||_row treated as a constant in backward (DoRA §4.3), β = σ(residual)."""
    Wp = W + s * B @ A
    n = Wp.detach().pow(2).sum(1).sqrt()
    g, beta = 1 / (1 + torch.exp(-gate)), 1 / (1 + torch.exp(-residual))
    c = (1 - beta) * (m0 + g * (m - m0)) / n + beta
    return c * (x @ Wp.T) + b


def _fp64_hylorada_layer(fused: bool) -> HyLoRADALayer:
    torch.manual_seed(0)
    base = nn.Linear(12, 10).double().requires_grad_(False)
    layer = HyLoRADALayer(base, HyLoRADAConfig(method="hylorada", lora_rank=3, lora_dropout=0.0, fused=fused))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g, dtype=torch.float64) * 0.3)
        layer.magnitude.add_(torch.randn(10, generator=g, dtype=torch.float64) * 0.3)
        layer.gate.fill_(0.7)
        layer.residual.fill_(-0.4)
    return layer


@pytest.mark.parametrize("fused", [True, False])
def test_hylorada_forward_and_gradients_against_hand_formula(fused):
    """Output and dL/d(m, gate, residual, A, B, x) of the layer (fp64, fused and reference path)
    against autograd of the hand-written formula, which shares no code with the library."""
    layer = _fp64_hylorada_layer(fused)
    x = torch.randn(7, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(2), requires_grad=True)
    w = torch.randn(7, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    y = layer(x)
    (y * w).sum().backward()
    params = [layer.magnitude, layer.gate, layer.residual, layer.lora_A, layer.lora_B]
    ours = [p.grad for p in params] + [x.grad]
    leaves = [p.detach().clone().requires_grad_(True) for p in params]
    xr = x.detach().clone().requires_grad_(True)
    m, gate, residual, A, B = leaves
    ref = _hylorada_by_hand(m, layer.magnitude_init, gate, residual, layer.base_layer.weight,
                            layer.base_layer.bias, A, B, layer.scaling, xr)
    (ref * w).sum().backward()
    assert (y - ref).abs().max().item() <= 1e-12
    for name, a, b in zip(["m", "gate", "residual", "A", "B", "x"], ours, [p.grad for p in leaves] + [xr.grad]):
        assert b.abs().max() > 0 and (a - b).abs().max().item() <= 1e-10 * b.abs().max().item(), name


@pytest.mark.parametrize("fused", [True, False])
def test_hylorada_scale_parameters_gradcheck(fused):
    """Finite differences (torch.autograd.gradcheck, fp64) of the layer as a function of
    magnitude, gate and residual (on which ||W'|| does not depend, so the analytic gradient must
    be the true one) — checks the fused backward's dL/dc and the chain rule through c."""
    layer = _fp64_hylorada_layer(fused)
    x = torch.randn(5, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    def f(m, gate, residual):
        return torch.func.functional_call(layer, {"magnitude": m, "gate": gate, "residual": residual}, (x,))

    inputs = tuple(p.detach().clone().requires_grad_(True) for p in (layer.magnitude, layer.gate, layer.residual))
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


def test_dora_norm_is_a_constant_in_backward():
    """DoRA's ||W'||_row is detached (DoRA §4.3, as peft): dL/dA and dL/dB equal the hand formula
    with a detached norm and differ from the one that differentiates through it."""
    torch.manual_seed(0)
    base = nn.Linear(12, 10, bias=False).double().requires_grad_(False)
    layer = DoRALayer(base, HyLoRADAConfig(method="dora", lora_rank=3, lora_dropout=0.0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g, dtype=torch.float64) * 0.3)
        layer.magnitude.mul_(1.5)
    x = torch.randn(7, 12, dtype=torch.float64, generator=g)
    for fused in (True, False):
        layer.fused = fused
        layer.zero_grad()
        layer(x).pow(2).sum().backward()
        for detach in (True, False):
            A, B = (layer.lora_A.detach().clone().requires_grad_(True), layer.lora_B.detach().clone().requires_grad_(True))
            Wp = base.weight + layer.scaling * B @ A
            n = Wp.norm(dim=1)
            ((layer.magnitude.detach() / (n.detach() if detach else n))[None] * (x @ Wp.T)).pow(2).sum().backward()
            err = max((layer.lora_A.grad - A.grad).abs().max().item(), (layer.lora_B.grad - B.grad).abs().max().item())
            assert (err <= 1e-10) if detach else (err > 1e-3), (fused, detach, err)


def test_hylorada_init_orthonormal_rows():
    model = wrap("llama", "hylorada", lora_rank=8)
    for _, layer in model.adapter_layers():
        A = layer.lora_A.double()
        assert torch.allclose(A @ A.T, torch.eye(A.shape[0], dtype=torch.float64), atol=1e-5)
        assert layer.gate.item() == 0.0 and math.isclose(layer.residual.item(), 0.1, rel_tol=1e-6)
        assert torch.equal(layer.magnitude, layer.magnitude_init)


def test_hylorada_gate_and_blend_receive_gradients():
    model = wrap("llama", "hylorada")
    randomize(model)
    ids = torch.randint(0, VOCAB, (2, 8))
    logits(model, ids).pow(2).mean().backward()
    _, layer = next(model.adapter_layers())
    assert layer.gate.grad.abs().item() > 0 and layer.residual.grad.abs().item() > 0


def test_lorada_temperature_is_a_per_head_query_scale(input_ids):
    model = wrap("llama", "lorada")
    q = model.model.get_submodule("model.layers.0.self_attn.q_proj")
    assert q.temperature.shape == (4,)  # 4 query heads (2 kv heads: grouped-query attention)
    assert model.model.get_submodule("model.layers.0.self_attn.k_proj").temperature is None
    with torch.no_grad():
        q.temperature.copy_(torch.tensor([1.0, 2.0, 0.5, 3.0]))
    x = torch.randn(3, 32)
    ref = (q.base_layer(x) + q.lora_out(x)).view(3, 4, 8) * torch.tensor([1.0, 2.0, 0.5, 3.0])[:, None]
    assert torch.allclose(q(x), ref.view(3, 32), atol=1e-6)


def test_lorada_on_gpt2_scales_only_the_query_slice():
    model = wrap("gpt2", "lorada")
    layer = model.model.get_submodule("transformer.h.0.attn.c_attn")
    with torch.no_grad():
        layer.temperature.fill_(2.0)
    t = layer.row_scale()
    assert t.shape == (96,) and torch.all(t[:32] == 2.0) and torch.all(t[32:] == 1.0)


# ------------------------------------------------------------------------------- float64
def _peft_dora_fp64(ours: HyLoRADAModel) -> nn.Module:
    """peft DoRA on an fp64 tiny Llama carrying our A, B and m (DoRA), or for HyLoRADA
    m = c·||W'||_row with c = (1-β)·(m0 + σ(gate)·(m - m0))/||W'||_row + β from the direct norm."""
    cfg = peft.LoraConfig(r=4, lora_alpha=8.0, lora_dropout=0.0, target_modules=list(ours.target_names),
                          use_dora=True, init_lora_weights=True)
    theirs = peft.get_peft_model(tiny_llama().double(), cfg)
    with torch.no_grad():
        for name, layer in ours.adapter_layers():
            pl = theirs.base_model.model.get_submodule(name)
            pl.lora_A["default"].weight.copy_(layer.lora_A)
            pl.lora_B["default"].weight.copy_(layer.lora_B)
            m = layer.magnitude
            if isinstance(layer, HyLoRADALayer):
                n = direct_weight_norm(layer.base_layer, layer.lora_A, layer.lora_B, layer.scaling)
                g, beta = 1 / (1 + torch.exp(-layer.gate)), 1 / (1 + torch.exp(-layer.residual))
                m = ((1 - beta) * (layer.magnitude_init + g * (m - layer.magnitude_init)) / n + beta) * n
            pl.lora_magnitude_vector["default"].weight.copy_(m)
    return theirs


@pytest.mark.parametrize("method", ["dora", "hylorada"])
def test_dora_family_is_exact_in_float64(method, input_ids):
    """An fp64 model stays fp64: c = 1 at init to 1e-12, merge -> unmerge restores W to 1e-12,
    outputs equal peft's DoRA (fp64) to 1e-10. (Norms and merge in fp32 gave 6e-8 and 2e-7.)"""
    model = HyLoRADAModel(tiny_llama().double(), HyLoRADAConfig(
        method=method, lora_rank=4, lora_alpha=8.0, lora_dropout=0.0, target_modules="all-linear"))
    for _, layer in model.adapter_layers():
        assert layer.row_scale().dtype == torch.float64
        assert (layer.row_scale() - 1).abs().max().item() < 1e-12
    randomize(model)
    before = {n: dense_weight(l.base_layer).detach().clone() for n, l in model.adapter_layers()}
    expected = logits(model, input_ids)
    model.merge()
    model.unmerge()
    for n, l in model.adapter_layers():
        assert (dense_weight(l.base_layer) - before[n]).abs().max().item() < 1e-12, n
    theirs = _peft_dora_fp64(model)
    assert (logits(theirs, input_ids) - expected).abs().max().item() < 1e-10


# ------------------------------------------------------------------------------- LoRaDA
def _query_bias_reference(arch: str, model: HyLoRADAModel, ids: torch.Tensor) -> torch.Tensor:
    """Independent LoRaDA: the plain model with hooks that add s·B A x to each query projection
    and multiply each query head's slice (bias included) by its temperature."""
    base = FACTORIES[arch]()
    for name, layer in model.adapter_layers():
        tau, d, q_size = layer.temperature.detach(), layer.head_dim, layer.q_size
        A, B, s = layer.lora_A.detach(), layer.lora_B.detach(), layer.scaling

        def hook(module, args, out, tau=tau, d=d, q_size=q_size, A=A, B=B, s=s):
            out = out + s * args[0] @ A.T @ B.T
            q = out[..., :q_size].unflatten(-1, (-1, d)) * tau[:, None]
            return torch.cat([q.flatten(-2), out[..., q_size:]], dim=-1)

        base.get_submodule(name).register_forward_hook(hook)
    return logits(base, ids)


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_lorada_with_query_bias_and_trained_temperature(arch, input_ids):
    """Models with q biases (Qwen2; GPT-2's fused c_attn), τ != 1: the output equals the hook
    reference, τ changes it, and merge scales weights and bias of the query slice exactly."""
    target = "c_attn" if arch == "gpt2" else "q_proj"
    model = wrap(arch, "lorada", lora_rank=4, target_modules=[target])
    g = torch.Generator().manual_seed(0)
    layers = [l for _, l in model.adapter_layers()]
    with torch.no_grad():
        for l in layers:
            l.lora_B.copy_(torch.randn(l.lora_B.shape, generator=g) * 0.2)
            l.temperature.copy_(torch.tensor([1.7, 0.4, 2.5, 0.8]))
    out = logits(model, input_ids)
    layer = layers[0]
    assert (out - _query_bias_reference(arch, model, input_ids)).abs().max().item() <= 1e-5
    with torch.no_grad():
        for l in layers:
            l.temperature.fill_(1.0)
        untempered = logits(model, input_ids)
        for l in layers:
            l.temperature.copy_(torch.tensor([1.7, 0.4, 2.5, 0.8]))
    assert ((out - untempered).norm() / untempered.norm()).item() > 1e-2
    b0 = layer.base_layer.bias.detach().clone()
    model.merge()
    t = torch.ones_like(b0)
    t[:layer.q_size] = torch.tensor([1.7, 0.4, 2.5, 0.8]).repeat_interleave(layer.head_dim)
    assert torch.allclose(layer.base_layer.bias, t * b0, rtol=1e-6, atol=0)
    assert (logits(model, input_ids) - out).abs().max().item() <= 1e-5
    plain = model.merge_and_unload()
    assert (logits(plain, input_ids) - out).abs().max().item() <= 1e-5


def _qnorm_reference(family: str, model: HyLoRADAModel, ids: torch.Tensor) -> torch.Tensor:
    """Independent: the plain model, every adapted layer plus s·B A x by a hook, and q_norm's
    output times τ_h by a hook that knows the family's layout ([b, s, h, d] for Qwen3,
    [b, h, s, d] for Gemma-3)."""
    base = QNORM_FACTORIES[family]()
    for name, layer in model.adapter_layers():
        A, B, s = layer.lora_A.detach(), layer.lora_B.detach(), layer.scaling
        base.get_submodule(name).register_forward_hook(lambda m, a, o, A=A, B=B, s=s: o + s * a[0] @ A.T @ B.T)
        if layer.temperature is not None:
            tau = layer.temperature.detach()
            tau = tau[:, None] if family == "qwen3" else tau[:, None, None]
            norm = base.get_submodule(name.rpartition(".")[0] + ".q_norm")
            norm.register_forward_hook(lambda m, a, o, tau=tau: o * tau)
    return logits(base, ids)


@pytest.mark.parametrize("family", sorted(QNORM_FACTORIES))
def test_lorada_temperature_acts_after_the_query_norm(family, caplog):
    """Qwen3 / Gemma-3 normalise q per head after q_proj, which cancels a scale folded into
    q_proj. τ must act after the norm: identity at init; with τ != 1 the logits equal the hook
    reference (also with seq = n_heads = batch, where only strides tell the head axis), change
    materially, and τ's gradient is of the order of lora_B's (folded: 1e-5 and 1e-6 of it)."""
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    square = torch.randint(0, VOCAB, (4, 4), generator=torch.Generator().manual_seed(2))
    ref = logits(QNORM_FACTORIES[family](), ids)
    model = HyLoRADAModel(QNORM_FACTORIES[family](), HyLoRADAConfig(method="lorada", lora_rank=4, lora_dropout=0.0))
    assert (logits(model, ids) - ref).abs().max().item() <= 1e-6
    randomize(model)
    for x in (ids, square):
        assert (logits(model, x) - _qnorm_reference(family, model, x)).abs().max().item() <= 1e-5
    q = model.model.get_submodule("model.layers.0.self_attn.q_proj")
    with torch.no_grad():
        tau = q.temperature.detach().clone()
        q.temperature.fill_(1.0)
        untempered = logits(model, ids)
        q.temperature.copy_(tau)
    out = logits(model, ids)
    assert ((out - untempered).norm() / untempered.norm()).item() > 1e-2
    torch.nn.functional.cross_entropy(out[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    assert q.temperature.grad.abs().max() >= 0.05 * q.lora_B.grad.abs().max() > 0


@pytest.mark.parametrize("family", sorted(QNORM_FACTORIES))
def test_lorada_on_query_norm_models_merges_saves_and_unloads_exactly(family, tmp_path, caplog, input_ids):
    """merge and merge_and_unload keep the outputs (τ stays behind the norm, with a warning that
    the merged model is not a plain transformers model); save -> load is bit-exact; unload gives
    the original model back; export_peft refuses, naming the temperature."""
    model = HyLoRADAModel(QNORM_FACTORIES[family](), HyLoRADAConfig(method="lorada", lora_rank=4, lora_dropout=0.0))
    randomize(model)
    expected = logits(model, input_ids)
    model.save_adapter(tmp_path / "a")
    loaded = HyLoRADAModel.from_pretrained(QNORM_FACTORIES[family](), tmp_path / "a")
    assert torch.equal(logits(loaded, input_ids), expected)
    with pytest.raises(ValueError, match="temperature"):
        model.export_peft(tmp_path / "peft")
    model.merge()
    assert (logits(model, input_ids) - expected).abs().max().item() <= 1e-5
    with caplog.at_level(logging.WARNING, logger="hylorada.model"):
        plain = model.merge_and_unload()
    assert "not a plain transformers model" in caplog.text.lower()
    assert (logits(plain, input_ids) - expected).abs().max().item() <= 1e-5
    norm = plain.get_submodule("model.layers.0.self_attn.q_norm")
    assert "temperature" in dict(norm.named_buffers())
    original = loaded.unload()
    assert not any(type(m).__module__.startswith("hylorada") for m in original.modules())
    assert torch.equal(logits(original, input_ids), logits(QNORM_FACTORIES[family](), input_ids))


# ------------------------------------------------------------------------------------- merge
@pytest.mark.parametrize("method", METHODS)
def test_merge_unmerge_and_unload(arch, method, input_ids):
    model = wrap(arch, method, target_modules="all-linear")
    randomize(model)
    before = {n: dense_weight(l.base_layer).detach().clone() for n, l in model.adapter_layers()}
    bias_before = {n: l.base_layer.bias.detach().clone() for n, l in model.adapter_layers()
                   if l.base_layer.bias is not None}
    adapted = logits(model, input_ids)
    model.merge()
    assert (logits(model, input_ids) - adapted).abs().max().item() <= 1e-5
    model.unmerge()
    for n, l in model.adapter_layers():
        assert (dense_weight(l.base_layer) - before[n]).abs().max().item() <= 1e-6
        if n in bias_before:
            assert (l.base_layer.bias - bias_before[n]).abs().max().item() <= 1e-6
    assert (logits(model, input_ids) - adapted).abs().max().item() <= 1e-6
    restored = wrap(arch, method, target_modules="all-linear")
    randomize(restored)
    restored.merge()
    base = restored.unload()
    assert (logits(base, input_ids) - logits(FACTORIES[arch](), input_ids)).abs().max().item() <= 1e-5
    plain = model.merge_and_unload()
    assert not any("lora" in n or "magnitude" in n for n, _ in plain.named_parameters())
    assert not any(type(m).__module__.startswith("hylorada") for m in plain.modules())
    assert (logits(plain, input_ids) - adapted).abs().max().item() <= 1e-5


# ---------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("method", METHODS)
def test_save_load_round_trip_is_bit_exact(arch, method, tmp_path, input_ids):
    model = wrap(arch, method, target_modules="all-linear")
    randomize(model)
    expected = logits(model, input_ids)
    model.save_adapter(tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [".hylorada", "hylorada_adapter.json",
                                                                  "hylorada_adapter.safetensors"]
    loaded = HyLoRADAModel.from_pretrained(FACTORIES[arch](), tmp_path / "a")
    assert loaded.adapter_config == model.adapter_config
    sd_a, sd_b = model.adapter_state_dict(), loaded.adapter_state_dict()
    assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    if method == "hylorada":
        assert any(k.endswith(".gate") for k in sd_a) and any(k.endswith(".magnitude_init") for k in sd_a)
    assert torch.equal(logits(loaded, input_ids), expected)


def test_load_rejects_mismatched_state(tmp_path):
    model = wrap("llama", "lora")
    model.save_adapter(tmp_path)
    with pytest.raises(ValueError, match="does not fit"):
        HyLoRADAModel(tiny_llama(), HyLoRADAConfig(method="dora")).load_adapter_state_dict(
            model.adapter_state_dict())


# ------------------------------------------------------------------------------ LoRA+ groups
def test_lora_plus_groups():
    model = wrap("llama", "hylorada", lora_plus_enabled=True, lora_plus_ratio=16.0)
    groups = {g["name"]: g for g in model.parameter_groups(lr=1e-4, weight_decay=0.01)}
    assert groups["lora_A"]["lr"] == 1e-4 and groups["lora_A"]["weight_decay"] == 0.01
    assert groups["lora_B"]["lr"] == pytest.approx(1.6e-3) and groups["lora_B"]["weight_decay"] == 0.01
    assert groups["scalars"]["lr"] == 1e-4 and groups["scalars"]["weight_decay"] == 0.0
    n = len(model.target_names)
    assert len(groups["lora_A"]["params"]) == n and len(groups["lora_B"]["params"]) == n
    assert len(groups["scalars"]["params"]) == 3 * n  # magnitude, gate, residual
    assert sum(len(g["params"]) for g in groups.values()) == len(model.trainable_parameters())
    off = {g["name"]: g for g in wrap("llama", "lora").parameter_groups(lr=1e-4)}
    assert off["lora_B"]["lr"] == 1e-4 and "scalars" not in off
    torch.optim.AdamW(model.parameter_groups(1e-4, 0.01))  # accepted by the optimizer


# ------------------------------------------------------------------------- factorized bases
@pytest.mark.parametrize("method", METHODS)
def test_adapters_on_factorized_layers(method, input_ids):
    base = tiny_llama()
    for layer in base.model.layers:
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            lin = getattr(layer.self_attn, proj)
            U, S, Vh = torch.linalg.svd(lin.weight.detach(), full_matrices=False)
            k = 8
            setattr(layer.self_attn, proj, FactorizedLinear.from_factors(U[:, :k] * S[:k].sqrt(), S[:k, None].sqrt() * Vh[:k]))
    ref = logits(base, input_ids)
    model = HyLoRADAModel(base, HyLoRADAConfig(method=method, lora_rank=4, lora_dropout=0.0))
    assert all(isinstance(l.base_layer, FactorizedLinear) for _, l in model.adapter_layers())
    assert (logits(model, input_ids) - ref).abs().max().item() <= 1e-6
    randomize(model)
    adapted = logits(model, input_ids)
    model.merge()
    assert all(l.base_layer.rank == 12 for _, l in model.adapter_layers())  # k + r
    assert (logits(model, input_ids) - adapted).abs().max().item() <= 1e-5
    model.unmerge()
    assert all(l.base_layer.rank == 8 for _, l in model.adapter_layers())
    assert (logits(model, input_ids) - adapted).abs().max().item() <= 1e-5


# ------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, field", [
    (dict(lora_rank=0), "lora_rank"),
    (dict(lora_rank=-2), "lora_rank"),
    (dict(lora_alpha=0.0), "lora_alpha"),
    (dict(lora_alpha=-1.0), "lora_alpha"),
    (dict(lora_dropout=1.0), "lora_dropout"),
    (dict(lora_dropout=-0.1), "lora_dropout"),
    (dict(method="qlora"), "method"),
    (dict(init_lora_weights="xavier"), "init_lora_weights"),
    (dict(target_modules=[]), "target_modules"),
])
def test_config_rejects_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=field) as err:
        HyLoRADAConfig(**kwargs)
    assert "allowed" in str(err.value)


def test_rank_larger_than_layer_is_rejected():
    with pytest.raises(ValueError, match=r"lora_rank=40.*allowed 1\.\.32"):
        wrap("llama", "lora", lora_rank=40, init_lora_weights="kaiming")


def test_orthogonal_rank_above_d_in_is_rejected():
    # up_proj of tiny llama is 64 x 32: r = 33 > d_in (checked before the min(d_in, d_out) rule)
    with pytest.raises(ValueError, match="init_lora_weights='orthogonal'"):
        HyLoRADAModel(tiny_llama(), HyLoRADAConfig(method="hylorada", lora_rank=33, target_modules=["up_proj"]))


def test_unknown_targets_list_existing_layers():
    with pytest.raises(ValueError, match="target_modules") as err:
        wrap("llama", "lora", target_modules=["query_key_value"])
    assert "self_attn.q_proj" in str(err.value) and "mlp.down_proj" in str(err.value)


def test_lorada_needs_a_query_projection():
    with pytest.raises(ValueError, match="query projection"):
        wrap("llama", "lorada", target_modules=["v_proj"])


def test_config_round_trip(tmp_path):
    cfg = HyLoRADAConfig(method="dora", lora_rank=16, target_modules=["q_proj", "v_proj"], use_rslora=True)
    assert HyLoRADAConfig.from_dict(cfg.to_dict()) == cfg
    cfg.to_json(tmp_path / "c.json")
    assert HyLoRADAConfig.from_json(tmp_path / "c.json") == cfg
    assert HyLoRADAConfig.from_json(cfg.to_json()) == cfg
    assert HyLoRADAConfig().method == "hylorada" and HyLoRADAConfig(use_hylorada=False).method == "lora"
    assert HyLoRADAConfig(method="lora").use_hylorada is False
    assert HyLoRADAConfig().init_lora_weights == "orthogonal" and HyLoRADAConfig(method="dora").init_lora_weights == "kaiming"
    with pytest.raises(ValueError, match="unknown fields"):
        HyLoRADAConfig.from_dict({"lora_rnk": 4})


def test_method_is_the_one_source_and_old_saved_configs_load():
    """`use_hylorada` is read-only (derived from `method`); a config saved before (with both keys,
    as docs/runs/*.json hold) loads, and to_dict keeps the key where it was."""
    saved = {"lora_rank": 8, "lora_alpha": 16.0, "lora_dropout": 0.05, "use_hylorada": True, "method": "hylorada"}
    assert HyLoRADAConfig.from_dict(saved).method == "hylorada"
    assert HyLoRADAConfig.from_dict({**saved, "use_hylorada": False, "method": None}).method == "lora"
    assert HyLoRADAConfig(use_hylorada=True, method="dora").method == "dora"  # an explicit method wins
    cfg = HyLoRADAConfig(method="lora")
    with pytest.raises(AttributeError):
        cfg.use_hylorada = True
    cfg.method = "hylorada"
    assert cfg.use_hylorada is True
    assert list(cfg.to_dict())[:5] == ["lora_rank", "lora_alpha", "lora_dropout", "use_hylorada", "method"]
    assert "use_hylorada" not in {f.name for f in dataclasses.fields(HyLoRADAConfig)}


def test_query_norm_temperature_is_applied_in_fp32_on_bf16_activations():
    """bf16 model (fp32 τ, as adapters of half-precision bases): τ - 1 = 0.003 (below bf16's
    step at 1) must show in the bf16 output of the wrapped q_norm: the slope
    of out(τ) against out(τ = 1) is 0.003 to 1e-4 (a τ cast to bf16 first gives 0)."""
    model = HyLoRADAModel(tiny_qwen3().to(torch.bfloat16),
                          HyLoRADAConfig(method="lorada", lora_rank=4, lora_dropout=0.0))
    wrapper = model.model.get_submodule("model.layers.0.self_attn.q_norm")
    q = model.model.get_submodule("model.layers.0.self_attn.q_proj")
    x = torch.randn(8, 64, 4, 8, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    with torch.no_grad():
        one = wrapper(x).double()
        q.temperature.fill_(1.003)
        out = wrapper(x)
    assert out.dtype == torch.bfloat16
    slope = ((out.double() * one).sum() / (one * one).sum()).item() - 1
    assert abs(slope - 0.003) <= 1e-4, slope
