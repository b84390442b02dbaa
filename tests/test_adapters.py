"""The four adapter methods against independent references (peft, direct formulas)."""
from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import FACTORIES, VOCAB, tiny_gpt2, tiny_llama, tiny_qwen2

from hylorada import HyLoRADAConfig, HyLoRADAModel
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
    with torch.no_grad():
        for name, layer in ours.adapter_layers():
            pl = theirs.base_model.model.get_submodule(name)
            pl.lora_A["default"].weight.copy_(layer.lora_A)
            pl.lora_B["default"].weight.copy_(layer.lora_B)
            if method == "dora":
                pl.lora_magnitude_vector["default"].weight.copy_(layer.magnitude)
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


def test_dora_norm_is_detached():
    model = wrap("llama", "dora")
    randomize(model)
    _, layer = next(model.adapter_layers())
    assert not layer.weight_norm().requires_grad


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


# ------------------------------------------------------------------------------- HyLoRADA math
def test_hylorada_formula_against_direct_computation():
    model = wrap("qwen2", "hylorada")
    randomize(model)
    _, layer = next(model.adapter_layers())
    x = torch.randn(4, layer.in_features)
    W = dense_weight(layer.base_layer).double()
    Wp = W + layer.scaling * (layer.lora_B.double() @ layer.lora_A.double())
    g, beta = torch.sigmoid(layer.gate.double()), torch.sigmoid(layer.residual.double())
    m_eff = g * layer.magnitude.double() + (1 - g) * layer.magnitude_init.double()
    c = (1 - beta) * m_eff / Wp.norm(dim=1) + beta
    dora = (m_eff / Wp.norm(dim=1)) * (x.double() @ Wp.T)
    lora = x.double() @ Wp.T
    ref = (1 - beta) * dora + beta * lora + layer.base_layer.bias.double()
    assert torch.allclose(layer(x).double(), ref, atol=1e-5)
    assert torch.allclose(c * (x.double() @ Wp.T) + layer.base_layer.bias.double(), ref, atol=1e-10)


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
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [".hylorada", "adapter_config.json",
                                                                  "adapter_model.safetensors"]
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
