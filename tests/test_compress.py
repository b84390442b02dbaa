"""Compression: truncated / randomized / whitened SVD, rank policies, compress_model, save/load."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from conftest import FACTORIES, VOCAB, tiny_gpt2, tiny_llama, tiny_qwen2
from hylorada.compress import FactorizedLinear
from hylorada.recipes.compress import recover_compressed
from hylorada.compress.api import (CompressReport, compress_model, find_target_layers,
                                   load_compressed, save_compressed,
                                   stored_size)
from hylorada.compress.config import CompressConfig
from hylorada.compress.ranks import (LayerSpec, allocate_budget, decide_ranks, rank_for_energy,
                                     rank_for_ratio)
from hylorada.compress.svd import randomized_svd, truncated_svd
from hylorada.compress.whiten import (GramCollector, collect_grams, whitened_svd,
                                      whitening_factor)
from hylorada.layers import dense_weight


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _calib(n_blocks: int = 6, seq_len: int = 24, seed: int = 7) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n_blocks, seq_len), generator=_gen(seed))


def _correlated_inputs(n_tokens: int, d: int, seed: int = 0) -> torch.Tensor:
    """Inputs with a strongly non-isotropic covariance (scales 10^0 .. 10^-3, random rotation)."""
    g = _gen(seed)
    Q = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64)).Q
    scales = torch.logspace(0, -3, d, dtype=torch.float64)
    return torch.randn(n_tokens, d, generator=g, dtype=torch.float64) * scales @ Q.T


def _capture_inputs(model: nn.Module, name: str, ids: torch.Tensor) -> torch.Tensor:
    """All inputs (tokens x d_in) that reach layer `name` for the blocks `ids`."""
    rows = []
    layer = model.get_submodule(name)
    h = layer.register_forward_pre_hook(lambda m, a: rows.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    h.remove()
    return torch.cat(rows).double()


# ---------------------------------------------------------------------------------------------
# truncated SVD
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,k", [((40, 24), 5), ((24, 40), 11), ((33, 33), 1), ((50, 20), 20)])
def test_truncated_svd_error_is_dropped_singular_values(shape, k):
    W = torch.randn(*shape, generator=_gen(1), dtype=torch.float64)
    s = torch.linalg.svdvals(W)
    f = truncated_svd(W, k)
    err = (W - f.up @ f.down).square().sum()
    dropped = s[k:].square().sum()
    assert f.up.shape == (shape[0], k) and f.down.shape == (k, shape[1])
    torch.testing.assert_close(err, dropped, rtol=1e-10, atol=1e-10)
    assert math.isclose(f.dropped_energy(), float(dropped), rel_tol=1e-9, abs_tol=1e-9)
    assert math.isclose(f.energy_kept(), float(s[:k].square().sum() / s.square().sum()), rel_tol=1e-12)
    # the split is symmetric: upᵀup = downdownᵀ = Σ_k
    torch.testing.assert_close(f.up.T @ f.up, torch.diag(s[:k]), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(f.down @ f.down.T, torch.diag(s[:k]), rtol=1e-9, atol=1e-9)


def test_truncated_svd_casts_back_and_validates():
    W = torch.randn(16, 12, generator=_gen(2)).to(torch.bfloat16)
    f = truncated_svd(W, 4)
    assert f.up.dtype == torch.bfloat16 and f.down.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="k must be"):
        truncated_svd(W, 13)
    with pytest.raises(ValueError, match="solver"):
        truncated_svd(W, 4, solver="lanczos")


@pytest.mark.parametrize("shape", [(120, 80), (80, 120)])
def test_randomized_and_full_agree_on_top_singular_values(shape):
    g = _gen(3)
    m, n = shape
    U = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q
    s = 0.85 ** torch.arange(min(m, n), dtype=torch.float64)  # decaying spectrum
    W = (U[:, : len(s)] * s) @ V[:, : len(s)].T
    k = 10
    full = truncated_svd(W, k, solver="full")
    rnd = truncated_svd(W, k, solver="randomized", oversample=10, n_iter=2)
    torch.testing.assert_close(rnd.s[:k], full.s[:k], rtol=1e-6, atol=0)
    err_full = (W - full.up @ full.down).square().sum()
    err_rnd = (W - rnd.up @ rnd.down).square().sum()
    assert err_rnd <= err_full * (1 + 1e-6)
    U2, S2, Vh2 = randomized_svd(W, k + 5, n_iter=3)
    assert U2.shape == (m, k + 5) and Vh2.shape == (k + 5, n)
    torch.testing.assert_close(U2.T @ U2, torch.eye(k + 5, dtype=W.dtype), atol=1e-10, rtol=0)


# ---------------------------------------------------------------------------------------------
# whitening
# ---------------------------------------------------------------------------------------------
def test_whitened_error_on_outputs_is_dropped_whitened_singular_values_and_beats_plain_svd():
    d_in, d_out, N, k = 48, 40, 2000, 8
    X = _correlated_inputs(N, d_in)
    W = torch.randn(d_out, d_in, generator=_gen(4), dtype=torch.float64)
    G = X.T @ X / N
    wh = whitening_factor(G, "cholesky")
    assert wh.jitter == 0.0
    f = whitened_svd(W, wh, k)
    out_err = lambda Wk: float(((W - Wk) @ X.T).square().sum() / N)  # noqa: E731
    s = torch.linalg.svdvals(W @ wh.L)
    assert math.isclose(out_err(f.up @ f.down), float(s[k:].square().sum()), rel_tol=1e-8)
    assert math.isclose(f.dropped_energy(), float(s[k:].square().sum()), rel_tol=1e-8)
    plain = truncated_svd(W, k)
    assert out_err(f.up @ f.down) < 0.5 * out_err(plain.up @ plain.down)


def test_cholesky_and_eigh_give_the_same_factorisation_on_a_regular_gram():
    X = _correlated_inputs(500, 24, seed=5)
    W = torch.randn(20, 24, generator=_gen(5), dtype=torch.float64)
    G = X.T @ X / 500
    a = whitened_svd(W, whitening_factor(G, "cholesky"), 6)
    b = whitened_svd(W, whitening_factor(G, "eigh"), 6)
    torch.testing.assert_close(a.up @ a.down, b.up @ b.down, rtol=1e-7, atol=1e-9)


def test_singular_gram_cholesky_jitter_and_eigh_pseudo_inverse():
    d_in, d_out, k, N = 32, 24, 6, 40
    X = _correlated_inputs(N, d_in, seed=6)
    X[:, [3, 7, 11]] = 0.0                      # three dead features: G has rank 29
    G = X.T @ X / N
    W = torch.randn(d_out, d_in, generator=_gen(6), dtype=torch.float64)
    out_err = lambda Wk: float(((W - Wk) @ X.T).square().sum() / N)  # noqa: E731

    chol = whitening_factor(G, "cholesky", jitter=1e-8)
    assert chol.jitter > 0 and chol.method == "cholesky"
    torch.testing.assert_close(chol.L @ chol.L.T, G + chol.jitter * torch.eye(d_in, dtype=G.dtype),
                               rtol=1e-9, atol=1e-12)
    fc = whitened_svd(W, chol, k)
    assert torch.isfinite(fc.up).all() and torch.isfinite(fc.down).all()
    # exact for G + λI; on X itself within the (tiny) ridge
    assert math.isclose(out_err(fc.up @ fc.down), fc.dropped_energy(), rel_tol=1e-3)

    eig = whitening_factor(G, "eigh")
    assert eig.rank == 29
    fe = whitened_svd(W, eig, k)
    assert math.isclose(out_err(fe.up @ fe.down), fe.dropped_energy(), rel_tol=1e-8)
    plain = truncated_svd(W, k)
    assert out_err(fe.up @ fe.down) < out_err(plain.up @ plain.down)
    with pytest.raises(ValueError, match="whiten_method"):
        whitening_factor(G, "qr")


def test_gram_hooks_match_captured_inputs_share_qkv_and_skip_padding():
    model = tiny_llama()
    ids = _calib(3, 16)
    targets = find_target_layers(model)
    grams = collect_grams(model, targets, ids, batch_size=2)
    name = "model.layers.1.self_attn.q_proj"
    X = _capture_inputs(model, name, ids)
    torch.testing.assert_close(grams[name].G, X.T @ X / X.shape[0], rtol=1e-10, atol=1e-12)
    assert grams[name].n_tokens == 3 * 16
    assert grams[name] is grams["model.layers.1.self_attn.k_proj"] is grams["model.layers.1.self_attn.v_proj"]
    assert grams["model.layers.1.mlp.gate_proj"] is grams["model.layers.1.mlp.up_proj"]
    assert grams[name] is not grams["model.layers.1.self_attn.o_proj"]
    assert grams["model.layers.1.mlp.down_proj"].G.shape == (64, 64)
    # right padding with attention_mask 0 leaves the statistics unchanged
    pad = torch.cat([ids, torch.zeros(3, 5, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(3, 16), torch.zeros(3, 5)], dim=1).long()
    padded = collect_grams(model, targets, {"input_ids": pad, "attention_mask": mask}, batch_size=2)
    assert padded[name].n_tokens == 3 * 16
    torch.testing.assert_close(padded[name].G, grams[name].G, rtol=1e-5, atol=1e-7)


def test_gram_hooks_on_gpt2_conv1d():
    model = tiny_gpt2()
    ids = _calib(2, 16)
    targets = find_target_layers(model)
    assert all(isinstance(m, Conv1D) for m in targets.values())
    grams = collect_grams(model, targets, ids)
    name = "transformer.h.0.mlp.c_proj"
    X = _capture_inputs(model, name, ids)
    assert grams[name].G.shape == (128, 128)
    torch.testing.assert_close(grams[name].G, X.T @ X / X.shape[0], rtol=1e-10, atol=1e-12)


def test_gram_collector_can_keep_groups_apart():
    model = tiny_llama()
    targets = find_target_layers(model, ["self_attn"])
    with GramCollector(targets, share_inputs=False) as c:
        with torch.no_grad():
            model(input_ids=_calib(1, 8))
    g = c.grams()
    assert g["model.layers.0.self_attn.q_proj"] is not g["model.layers.0.self_attn.k_proj"]
    torch.testing.assert_close(g["model.layers.0.self_attn.q_proj"].G, g["model.layers.0.self_attn.k_proj"].G)


# ---------------------------------------------------------------------------------------------
# rank policies
# ---------------------------------------------------------------------------------------------
def test_ratio_rank_formula_is_svd_llm_convention():
    # 0.8·m·n/(m+n) exactly: 0.8·1024/64 = 12.8 -> 12; 0.8·576·576/1152 = 230.4 -> 230
    assert rank_for_ratio(32, 32, 0.2) == 12
    assert rank_for_ratio(576, 576, 0.2) == 230
    assert rank_for_ratio(1536, 576, 0.4) == math.floor(0.6 * 1536 * 576 / 2112)
    assert rank_for_ratio(10, 10, 0.5) == 2  # 0.5·100/20 = 2.5; exact arithmetic, no 2.4999
    assert rank_for_ratio(8, 8, 0.99) == 1  # never below 1


def test_energy_rank():
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])  # energies 9, 4, 1 of 14
    assert rank_for_energy(s, 0.5) == 1
    assert rank_for_energy(s, 9 / 14) == 1
    assert rank_for_energy(s, 0.9) == 2
    assert rank_for_energy(s, 1.0) == 3


def test_budget_allocation_follows_energy_per_parameter():
    specs = [LayerSpec("flat", 40, 40, False), LayerSpec("steep", 40, 40, False)]
    flat = torch.ones(40)
    steep = 0.5 ** torch.arange(40, dtype=torch.float64)
    budget = 20 * 80  # rank 20 in total
    ranks = allocate_budget(specs, [flat, steep], budget)
    assert sum(ranks) * 80 <= budget
    assert ranks[0] > ranks[1] and ranks[1] >= 1
    # more budget than every layer at break-even: leftover makes layers dense
    ranks = allocate_budget(specs, [flat, steep], 2 * 1600)
    assert ranks == [None, None]
    with pytest.raises(ValueError, match="budget"):
        allocate_budget(specs, [flat, steep], 100)


def test_factorized_param_count_and_break_even_guard():
    model = tiny_llama()
    # o_proj is 32 x 32: break-even 16. rank 16 saves nothing -> dense; 15 saves.
    cfg = CompressConfig(method="svd", ratio=0.2, target_modules=["o_proj", "q_proj"],
                         overrides={"o_proj": 16, "q_proj": 15})
    rep = compress_model(model, cfg)
    o = model.get_submodule("model.layers.0.self_attn.o_proj")
    q = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(o, nn.Linear) and isinstance(q, FactorizedLinear) and q.rank == 15
    r_o = next(r for r in rep.layers if r.name == "model.layers.0.self_attn.o_proj")
    assert r_o.dense and "break-even" in r_o.reason and r_o.params_after == 32 * 32
    assert sum(p.numel() for p in q.parameters()) == 15 * (32 + 32)
    md = rep.to_markdown()
    assert "break-even" in md and "dense" in md
    # forced: factorised even though it saves nothing
    model = tiny_llama()
    compress_model(model, CompressConfig(method="svd", ratio=0.2, target_modules=["o_proj"],
                                         overrides={"o_proj": 16}, force=True))
    assert isinstance(model.get_submodule("model.layers.0.self_attn.o_proj"), FactorizedLinear)
    # alpha·min(m, n) breaks even at alpha = max(m, n)/(m + n): 1/2 for square layers, 2/3 for
    # 2:1 ones. alpha = 0.6 keeps the square ones dense; 0.7 (the original HyLoRA default) all.
    model = tiny_llama()
    rep = compress_model(model, CompressConfig(method="svd", alpha=0.6))
    assert {r.name.split(".")[-1] for r in rep.layers if r.dense} == {"q_proj", "o_proj"}
    rep = compress_model(tiny_llama(), CompressConfig(method="svd", alpha=0.7))
    assert rep.n_factorized == 0 and rep.target_params_after == rep.target_params_before


def _rank_map(md: str) -> dict[str, dict[int, str]]:
    """The rank map table of a report.md: row label -> {column header (layer index) -> cell}."""
    lines = md.split("Rank per decoder layer", 1)[1].split("\n\n")[1].splitlines()
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    head = [int(c) for c in cells[0][1:]]
    return {row[0]: dict(zip(head, row[1:])) for row in cells[2:]}


def test_rank_map_and_plot_show_each_layers_rank(tmp_path):
    model = tiny_llama(num_hidden_layers=3)
    rep = compress_model(model, CompressConfig(method="svd", ratio=0.2, overrides={
        "layers.0.self_attn.q_proj": 5, "layers.1.mlp": 0.5, "layers.2.self_attn.v_proj": "dense"}))
    # reference from the model: model.layers.<i>.<block>.<kind>, FactorizedLinear.rank or dense
    expected: dict[str, dict[int, str]] = {}
    for name, m in model.named_modules():
        parent = model.get_submodule(name.rsplit(".", 1)[0])
        if isinstance(m, (FactorizedLinear, nn.Linear)) and not isinstance(parent, FactorizedLinear) \
                and name.startswith("model.layers."):
            i, kind = int(name.split(".")[2]), name.split(".")[-1]
            expected.setdefault(kind, {})[i] = str(m.rank) if isinstance(m, FactorizedLinear) else "dense"
    got = _rank_map(rep.to_markdown())
    assert got == expected and list(got) == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                             "up_proj", "down_proj"]
    assert got["q_proj"] == {0: "5", 1: "12", 2: "12"} and got["v_proj"][2] == "dense"  # ranks differ
    assert rep.to_markdown().count("| model.layers.") == 21  # the per-layer table stays
    assert rep.plot_ranks(tmp_path / "ranks.png") is True
    assert (tmp_path / "ranks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ranks.png"]  # no temporary left
    # names without a layer index: no map, no plot
    from dataclasses import replace
    flat = replace(rep, layers=[replace(r, name=f"l_{r.name.replace('.', '_')}") for r in rep.layers])
    assert "Rank per decoder layer" not in flat.to_markdown()
    assert flat.plot_ranks(tmp_path / "flat.png") is False and not (tmp_path / "flat.png").exists()


def test_rank_map_tells_gpt2s_two_c_proj_apart():
    model = tiny_gpt2()
    rep = compress_model(model, CompressConfig(method="svd", ratio=0.2, overrides={"h.1.mlp.c_proj": 7}))
    expected = {}
    for name, m in model.named_modules():
        if isinstance(m, FactorizedLinear):  # transformer.h.<i>.<attn|mlp>.<kind>
            parts = name.split(".")
            expected.setdefault(".".join(parts[3:]), {})[int(parts[2])] = str(m.rank)
    got = _rank_map(rep.to_markdown())
    assert got == expected and set(got) == {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}
    assert got["mlp.c_proj"][1] == "7"


def test_factorized_count_includes_bias():
    model = tiny_qwen2()
    rep = compress_model(model, CompressConfig(method="svd", ratio=0.3))
    for r in rep.layers:
        layer = model.get_submodule(r.name)
        n = sum(p.numel() for p in layer.parameters())
        assert n == r.params_after == r.rank * (r.d_in + r.d_out) + (r.d_out if r.bias else 0)
    assert any(r.bias for r in rep.layers)
    n_params, _ = stored_size(model)
    assert n_params == sum(p.numel() for p in model.parameters())  # tied embedding counted once
    assert rep.model_params_after == n_params


@pytest.mark.parametrize("ratio", [0.2, 0.4])
def test_ratio_removes_that_fraction_of_target_linears(ratio):
    model = tiny_llama(hidden_size=128, intermediate_size=256)
    before = sum(p.numel() for m in find_target_layers(model).values() for p in m.parameters())
    rep = compress_model(model, CompressConfig(method="svd", ratio=ratio))
    after = sum(p.numel() for n, m in model.named_modules() if isinstance(m, FactorizedLinear)
                for p in m.parameters())
    assert rep.n_dense == 0 and rep.target_params_before == before
    assert rep.target_params_after == after
    assert abs(1 - after / before - ratio) <= 0.01
    assert abs(rep.target_ratio - ratio) <= 0.01
    # the whole-model ratio is smaller (embeddings, norms untouched) and reported
    assert 0 < rep.model_ratio < rep.target_ratio


def test_budget_policy_in_compress_model():
    model = tiny_llama(hidden_size=64, intermediate_size=128)
    targets = find_target_layers(model)
    total = sum(p.numel() for m in targets.values() for p in m.parameters())
    rep = compress_model(model, CompressConfig(method="whiten", budget=0.75,
                                               overrides={"mlp.down_proj": "dense"}),
                         calibration=_calib(4, 24))
    assert rep.target_params_after <= 0.75 * total
    assert rep.target_params_after >= 0.75 * total - 2 * (64 + 128)
    downs = [r for r in rep.layers if r.name.endswith("down_proj")]
    assert downs and all(r.dense and "override" in r.reason for r in downs)
    assert all(r.rank < r.break_even for r in rep.layers if not r.dense)
    assert len({r.rank for r in rep.layers if not r.dense}) > 1  # not uniform


# ---------------------------------------------------------------------------------------------
# compress_model on tiny models
# ---------------------------------------------------------------------------------------------
def test_whitened_model_layer_error_matches_report():
    model = tiny_llama()
    ids = _calib(4, 24)
    name = "model.layers.1.mlp.down_proj"
    X = _capture_inputs(model, name, ids)
    W = dense_weight(model.get_submodule(name)).detach().double().clone()
    rep = compress_model(model, CompressConfig(method="whiten", ratio=0.3), calibration=ids)
    Wk = model.get_submodule(name).dense_weight().detach().double()
    err = float(((W - Wk) @ X.T).square().sum() / X.shape[0])
    r = next(r for r in rep.layers if r.name == name)
    assert r.whitening == "cholesky"
    assert math.isclose(err, r.dropped_energy, rel_tol=1e-4)
    # plain SVD of the same layer does worse on these inputs
    plain = truncated_svd(W, r.rank)
    assert err < float(((W - plain.up @ plain.down) @ X.T).square().sum() / X.shape[0])


def test_full_rank_factorisation_reproduces_the_model(arch):
    model = FACTORIES[arch]()
    ids = _calib(2, 12)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    rep = compress_model(model, CompressConfig(method="svd", alpha=1.0, force=True))
    assert rep.n_factorized == len(rep.layers) > 0
    with torch.no_grad():
        out = model(input_ids=ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_compress_keeps_bias_dtype_and_never_touches_lm_head():
    model = tiny_qwen2().to(torch.bfloat16)
    q_bias = model.model.layers[0].self_attn.q_proj.bias.detach().clone()
    emb = model.model.embed_tokens.weight
    compress_model(model, CompressConfig(method="whiten", ratio=0.2), calibration=_calib(2, 16))
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, FactorizedLinear) and q.up.weight.dtype == torch.bfloat16
    assert torch.equal(q.bias, q_bias)
    assert model.lm_head.weight is emb and isinstance(model.lm_head, nn.Linear)


def test_randomized_solver_in_compress_model_close_to_full():
    ids = _calib(3, 16)
    outs = []
    for solver in ("full", "randomized"):
        model = tiny_llama()
        compress_model(model, CompressConfig(method="whiten", ratio=0.2, svd_solver=solver,
                                             n_iter=4), calibration=ids)
        with torch.no_grad():
            outs.append(model(input_ids=ids).logits)
    torch.testing.assert_close(outs[1], outs[0], rtol=2e-2, atol=2e-2)


def test_report_serialises():
    model = tiny_gpt2()
    rep = compress_model(model, CompressConfig(method="whiten", energy=0.9), calibration=_calib(2, 16))
    d = json.loads(json.dumps(rep.to_dict()))
    assert d["target_params_after"] == rep.target_params_after and len(d["layers"]) == 8
    back = CompressReport.from_dict(d)
    assert back.layers[0] == rep.layers[0]
    assert all(r.energy_kept >= 0.9 - 1e-9 for r in rep.layers)


# ---------------------------------------------------------------------------------------------
# save / load
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_save_load_round_trip_is_bit_exact(arch, dtype, tmp_path, input_ids):
    model = FACTORIES[arch]()
    rep = compress_model(model, CompressConfig(method="whiten", ratio=0.25, dtype=dtype,
                                               overrides={"layers.1": 0.5}),
                         calibration=_calib(3, 16))
    with torch.no_grad():
        ref = model(input_ids=input_ids).logits
    out_dir = save_compressed(model, tmp_path / "c", report=rep)
    assert sorted(p.name for p in out_dir.iterdir()) == [".hylorada", "base_config.json", "compress.json",
                                                          "config.json", "model.safetensors"]
    assert not list(tmp_path.glob(".c.*"))  # no temporary left behind
    loaded = load_compressed(out_dir)
    with torch.no_grad():
        got = loaded(input_ids=input_ids).logits
    assert torch.equal(got, ref)
    for name, m in model.named_modules():
        if isinstance(m, FactorizedLinear):
            lm = loaded.get_submodule(name)
            assert isinstance(lm, FactorizedLinear) and lm.rank == m.rank
            assert lm.up.weight.dtype == m.up.weight.dtype
    if model.config.tie_word_embeddings:
        assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight
    assert stored_size(loaded) == stored_size(model)
    # saving again replaces the directory atomically (only when asked to)
    save_compressed(loaded, out_dir, overwrite=True)
    assert json.loads((out_dir / "compress.json").read_text())["report"] is None


def test_load_compressed_casts_on_request(tmp_path):
    model = tiny_llama()
    compress_model(model, CompressConfig(method="svd", ratio=0.2))
    save_compressed(model, tmp_path / "m")
    loaded = load_compressed(tmp_path / "m", dtype=torch.bfloat16, device="cpu")
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())


def test_load_rejects_foreign_directory(tmp_path):
    (tmp_path / "compress.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not a hylorada compressed model"):
        load_compressed(tmp_path)


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,field", [
    (dict(ratio=0.0), "ratio"), (dict(ratio=1.0), "ratio"), (dict(ratio=-0.2), "ratio"),
    (dict(ratio=1.5), "ratio"), (dict(energy=0.0), "energy"), (dict(energy=1.01), "energy"),
    (dict(alpha=0.0), "alpha"), (dict(alpha=2.0), "alpha"), (dict(budget=0), "budget"),
    (dict(budget=-5), "budget"), (dict(ratio=0.2, method="pca"), "method"),
    (dict(ratio=0.2, energy=0.9), "exactly one"), (dict(), "exactly one"),
    (dict(ratio=0.2, svd_solver="lanczos"), "svd_solver"),
    (dict(ratio=0.2, whiten_method="qr"), "whiten_method"),
    (dict(ratio=0.2, overrides={"mlp": 1.2}), "overrides"),
    (dict(ratio=0.2, overrides={"mlp": "sparse"}), "overrides"),
    (dict(ratio=0.2, overrides={"mlp": 0}), "overrides"),
    (dict(ratio=0.2, target_modules=[]), "target_modules"),
    (dict(ratio=0.2, dtype="int8"), "dtype"), (dict(ratio="0.2"), "ratio"),
    (dict(ratio=0.2, calib_batch_size=0), "calib_batch_size"),
])
def test_bad_config_raises_value_error_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        CompressConfig(**kwargs)


def test_whiten_without_calibration_and_unmatched_targets_raise():
    with pytest.raises(ValueError, match="calibration"):
        compress_model(tiny_llama(), CompressConfig(method="whiten", ratio=0.2))
    with pytest.raises(ValueError, match="target_modules"):
        compress_model(tiny_llama(), CompressConfig(method="svd", ratio=0.2, target_modules=["lm_head"]))
    with pytest.raises(ValueError, match="calibration"):
        compress_model(tiny_llama(), CompressConfig(method="whiten", ratio=0.2),
                       calibration=torch.rand(2, 8))


def test_decide_ranks_override_precedence():
    specs = [LayerSpec("model.layers.0.mlp.up_proj", 64, 32, False),
             LayerSpec("model.layers.0.self_attn.q_proj", 32, 32, False)]
    d = decide_ranks(specs, "ratio", 0.2, {"mlp": 0.5, "mlp.up_proj": 3, "proj": "dense"})
    assert d["model.layers.0.mlp.up_proj"].rank == 3                      # longest key wins
    assert d["model.layers.0.self_attn.q_proj"].rank == rank_for_ratio(32, 32, 0.2)  # "proj" is no piece


# ---------------------------------------------------------------------------------------------
# recovery: adapters on the factors
# ---------------------------------------------------------------------------------------------
def _blocks(n: int = 8, seq_len: int = 16) -> dict[str, torch.Tensor]:
    ids = torch.randint(1, VOCAB, (n, seq_len), generator=_gen(11))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


_TRAIN = dict(batch_size=4, lr=5e-3, progress=False, log_every=0, mixed_precision="no",
              warmup_steps=0)


@pytest.mark.parametrize("method", ["lora", "dora", "hylorada"])
def test_adapters_on_factors_are_identity_at_init_and_merge_exactly_keeping_rank(method):
    from hylorada.config import HyLoRADAConfig
    from hylorada.model import HyLoRADAModel

    model = tiny_qwen2()
    compress_model(model, CompressConfig(method="svd", ratio=0.3))
    ids = _calib(2, 12)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    ranks = {n: m.rank for n, m in model.named_modules() if isinstance(m, FactorizedLinear)}
    names = [f"{n}.{c}" for n in ranks for c in ("up", "down")]
    wrapped = HyLoRADAModel(model, HyLoRADAConfig(method=method, lora_rank=4, lora_dropout=0.0),
                            target_names=names)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(input_ids=ids).logits, ref, rtol=0, atol=1e-6)
        for p in wrapped.trainable_parameters():  # a non-trivial adapter
            p.add_(0.05 * torch.randn(p.shape, generator=_gen(12)))
        adapted = wrapped(input_ids=ids).logits
    assert not torch.allclose(adapted, ref, atol=1e-3)
    merged = wrapped.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted, rtol=1e-4, atol=1e-4)
    assert {n: m.rank for n, m in merged.named_modules() if isinstance(m, FactorizedLinear)} == ranks


def test_recover_compressed_keeps_rank_and_size_on_factors_grows_on_layers():
    model = tiny_llama()
    compress_model(model, CompressConfig(method="svd", ratio=0.3))
    ranks = {n: m.rank for n, m in model.named_modules() if isinstance(m, FactorizedLinear)}
    size = stored_size(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    summary = recover_compressed(model, _blocks(), method="hylorada", steps=2, lora_rank=4,
                                 train_config=_TRAIN)
    assert [p["phase"] for p in summary["phases"]] == ["up", "down"]
    assert summary["ranks_after"] == ranks and stored_size(model) == size
    assert summary["bytes_after"] == summary["bytes_before"]
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.endswith(".up.weight") for k in changed) and any(k.endswith(".down.weight") for k in changed)
    assert all(".up." in k or ".down." in k for k in changed)  # embeddings, norms untouched
    assert all(p.requires_grad for p in model.parameters())    # flags restored

    model = tiny_llama()
    compress_model(model, CompressConfig(method="svd", ratio=0.3))
    summary = recover_compressed(model, _blocks(), method="lora", steps=1, lora_rank=4,
                                 targets="layers", train_config=_TRAIN)
    assert summary["ranks_after"] == {n: k + 4 for n, k in ranks.items()}
    assert summary["bytes_after"] > summary["bytes_before"]
    with pytest.raises(ValueError, match="schedule"):
        recover_compressed(model, _blocks(), steps=1, schedule="random")
    with pytest.raises(ValueError, match="no FactorizedLinear"):
        recover_compressed(tiny_llama(), _blocks(), steps=1)


def test_precomputed_grams_give_the_same_compression():
    ids = _calib(3, 16)
    a, b = tiny_llama(), tiny_llama()
    grams = collect_grams(b, find_target_layers(b), ids)
    rep_a = compress_model(a, CompressConfig(method="whiten", ratio=0.3), calibration=ids)
    rep_b = compress_model(b, CompressConfig(method="whiten", ratio=0.3), grams=grams)
    assert rep_a.calib_tokens == rep_b.calib_tokens == 48
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb)


# ---------------------------------------------------------------- fast paths vs their references
@pytest.mark.parametrize("shape", [(48, 20), (20, 48), (32, 32)])
def test_gram_solver_matches_full_svd(shape):
    from hylorada.compress.svd import svd as _svd
    torch.manual_seed(0)
    M = torch.randn(*shape, dtype=torch.float64) @ torch.diag(torch.logspace(0, -3, shape[1], dtype=torch.float64))
    U, S, Vh = _svd(M, 7, "gram")
    U2, S2, Vh2 = _svd(M, 7, "full")
    assert torch.allclose(S, S2, rtol=1e-8, atol=1e-12)
    assert torch.allclose((U * S[:7]) @ Vh, (U2[:, :7] * S2[:7]) @ Vh2[:7], atol=1e-10)


def test_mixed_precision_grams_match_exact():
    from hylorada.compress.api import find_target_layers
    from hylorada.compress.whiten import collect_grams
    model = tiny_llama()
    calib = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    targets = find_target_layers(model)
    exact = collect_grams(model, targets, calib, batch_size=2)
    mixed = collect_grams(model, targets, calib, batch_size=2, precision="mixed")
    for name in targets:
        assert exact[name].n_tokens == mixed[name].n_tokens
        assert torch.allclose(mixed[name].G, exact[name].G, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="calib_precision"):
        CompressConfig(method="whiten", ratio=0.2, calib_precision="half")


def test_whiten_with_gram_solver_equals_full_solver():
    calib = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    reports = []
    for solver in ("full", "gram"):
        model = tiny_llama()
        reports.append(compress_model(model, CompressConfig(method="whiten", ratio=0.3, svd_solver=solver), calib))
    for a, b in zip(reports[0].layers, reports[1].layers):
        assert a.rank == b.rank and abs(a.energy_kept - b.energy_kept) < 1e-9


def test_analyze_spectra_ranks_and_plot(tmp_path):
    from hylorada.compress.analyze import analyze_model

    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = analyze_model(model, _calib(3, 16), model_name="tiny")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # untouched
    assert len(res.layers) == 14 and res.calib_tokens == 48
    q = res.layers[0]
    W = model.model.layers[0].self_attn.q_proj.weight.detach().double()
    torch.testing.assert_close(q.plain, torch.linalg.svdvals(W))
    assert q.ranks()[0.9] == rank_for_energy(q.plain, 0.9)
    assert q.whitened is not None and q.ranks(True)[0.99] <= 32
    md = res.to_markdown()
    assert md.count("| model.layers.") == 14 and "break-even" in md
    res.plot(tmp_path / "s.png")
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    json.dumps(res.to_dict())


# tiny Llama with hidden 64, intermediate 128, 4 heads / 2 kv heads (head_dim 16):
#   q/o 64x64: break-even 32,    ratio 0.5 -> floor(0.5*4096/128) = 16
#   k/v 32x64: break-even 21.33, ratio 0.5 -> floor(0.5*2048/96)  = 10
#   gate/up 128x64, down 64x128: break-even 42.67, ratio 0.5 -> floor(0.5*8192/192) = 21
# expected ranks by hand (None = dense): multiple 8 rounds down; 24 rounds q up to 24 (saves),
# k up to 24 (24*96 = 2304 >= 2048: dense); 40 rounds q up past break-even (40*128 = 5120 >= 4096),
# k past its size (40 > 32), gate/up/down up to 40 (40*192 = 7680 < 8192).
RANK_MULTIPLE_CASES = {
    1: {"q_proj": 16, "k_proj": 10, "v_proj": 10, "o_proj": 16, "gate_proj": 21, "up_proj": 21, "down_proj": 21},
    8: {"q_proj": 16, "k_proj": 8, "v_proj": 8, "o_proj": 16, "gate_proj": 16, "up_proj": 16, "down_proj": 16},
    24: {"q_proj": 24, "k_proj": None, "v_proj": None, "o_proj": 24, "gate_proj": 24, "up_proj": 24, "down_proj": 24},
    40: {"q_proj": None, "k_proj": None, "v_proj": None, "o_proj": None, "gate_proj": 40, "up_proj": 40, "down_proj": 40},
    48: {"q_proj": None, "k_proj": None, "v_proj": None, "o_proj": None, "gate_proj": None, "up_proj": None, "down_proj": None},
}


@pytest.mark.parametrize("multiple", sorted(RANK_MULTIPLE_CASES))
def test_rank_multiple_against_hand_computed_ranks(multiple, input_ids):
    model = tiny_llama(hidden_size=64, intermediate_size=128)
    report = compress_model(model, CompressConfig(method="svd", ratio=0.5, rank_multiple=multiple))
    got = {r.name.rsplit(".", 1)[1]: r.rank for r in report.layers if ".0." in r.name}
    assert got == RANK_MULTIPLE_CASES[multiple]
    for r in report.layers:
        assert r.params_after <= r.params_before, r.name  # never bigger than dense
        plain = RANK_MULTIPLE_CASES[1][r.name.rsplit(".", 1)[1]]
        if r.dense:
            assert "rank_multiple" in r.reason and "dense" in r.reason
        elif r.rank < plain:
            assert "rounded down" in r.policy
        elif r.rank > plain:
            assert "rounded up" in r.policy
        else:
            assert "rounded" not in r.policy
    assert torch.isfinite(model(input_ids=input_ids).logits).all()


def test_rank_multiple_with_force():
    from hylorada.compress.ranks import round_to_multiple
    # force: q 64x64 rank 16 -> 48 (bigger than dense, but forced); k 32x64 rank 10: 48 > 32 cannot be
    assert round_to_multiple(16, 48, 64, 64, force=True) == (48, "rounded up to a multiple of 48")
    assert round_to_multiple(10, 48, 32, 64, force=True)[0] == 10
    assert round_to_multiple(10, 48, 32, 64, force=False)[0] is None
    assert round_to_multiple(21, 8, 128, 64) == (16, "rounded down to a multiple of 8")
    assert round_to_multiple(16, 8, 64, 64) == (16, "")
    with pytest.raises(ValueError, match="rank_multiple"):
        CompressConfig(method="svd", ratio=0.2, rank_multiple=0)


def test_load_model_recognises_a_compressed_folder(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from hylorada.loading import load_model
    vocab = {f"w{i}": i for i in range(VOCAB)}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="w0", pad_token="w1", eos_token="w2")
    model = tiny_llama()
    compress_model(model, CompressConfig(method="svd", ratio=0.3))
    save_compressed(model, tmp_path / "c", tokenizer=tok)
    loaded, tok2 = load_model(tmp_path / "c")
    assert any(isinstance(m, FactorizedLinear) for m in loaded.modules())
    ids = torch.tensor([tok2("w5 w6 w7")["input_ids"]])
    assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


# ---- dtype on load: RoPE's inv_freq stays float32 (as transformers keeps it) -------------------
def _rope_buffers(model) -> dict[str, torch.Tensor]:
    return {n: b for n, b in model.named_buffers() if "inv_freq" in n}


def test_bf16_load_keeps_inv_freq_fp32_and_matches_transformers(tiny_assets, tmp_path):
    from transformers import AutoModelForCausalLM

    from hylorada.compress.api import load_compressed
    from hylorada.loading import load_model
    folder, _ = tiny_assets
    ids = torch.randint(0, 100, (1, 256), generator=torch.Generator().manual_seed(0))
    model, _ = load_model(folder, dtype="bf16")
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    assert next(model.parameters()).dtype == torch.bfloat16
    rope = _rope_buffers(model)
    assert rope and all(b.dtype == torch.float32 for b in rope.values())
    ref_rope = _rope_buffers(ref)
    assert all(torch.equal(rope[n], ref_rope[n]) for n in ref_rope)
    with torch.no_grad():
        dense_bf16 = model(input_ids=ids).logits
        assert torch.equal(dense_bf16, ref(input_ids=ids).logits)
    # compressed in bf16 -> save -> load (saved dtype, and dtype=bf16 asked): bit-exact at 256 tokens
    compress_model(model, CompressConfig(method="svd", ratio=0.3))
    save_compressed(model, tmp_path / "c")
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        for dt in (None, torch.bfloat16):
            loaded = load_compressed(tmp_path / "c", dtype=dt)
            assert all(b.dtype == torch.float32 for b in _rope_buffers(loaded).values())
            assert torch.equal(loaded(input_ids=ids).logits, expected)
    # an fp32 compressed folder loaded as bf16 equals the fp32 model cast the way transformers casts
    fp32, _ = load_model(folder)
    compress_model(fp32, CompressConfig(method="svd", ratio=0.3))
    save_compressed(fp32, tmp_path / "c32")
    loaded = load_compressed(tmp_path / "c32", dtype="bfloat16")
    assert all(b.dtype == torch.float32 for b in _rope_buffers(loaded).values())
    with torch.no_grad():
        for n, p in fp32.named_parameters():
            assert torch.equal(loaded.get_parameter(n), p.to(torch.bfloat16)), n


def test_recovery_skips_factors_of_rank_below_the_adapter_rank():
    """A loss/sensitivity allocation can leave a factor of rank 1; HyLoRADA's orthogonal A
    cannot have more rows than that factor's input (up: d_in = rank), which crashed recovery
    (measured on SmolLM2, allocate='loss' at 20%). Such factors are skipped and listed."""
    model = tiny_llama()
    compress_model(model, CompressConfig(method="svd", ratio=0.3,
                                         overrides={"layers.0.self_attn.q_proj": 2}))
    assert model.model.layers[0].self_attn.q_proj.rank == 2
    summary = recover_compressed(model, _blocks(), method="hylorada", steps=2, lora_rank=4,
                                 train_config=_TRAIN)
    assert summary["skipped_small_factors"] == ["model.layers.0.self_attn.q_proj.up",
                                                "model.layers.0.self_attn.q_proj.down"]
    assert [p["phase"] for p in summary["phases"]] == ["up", "down"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("factory", [tiny_llama, tiny_qwen2], ids=["no-bias", "bias"])
def test_factorized_forward_is_two_gemms_on_the_stored_factors_without_copies(factory, dtype):
    """Decode-shaped call (one token): y = (x Vᵀ) Uᵀ + b is exactly two matrix products, of
    shapes [1, d_in]·[d_in, k] and [1, k]·[k, d_out], on the stored factors (contiguous, ranks a
    multiple of rank_multiple), with no copy or dtype cast per call (aten ops seen by the profiler)."""
    model = factory()
    compress_model(model, CompressConfig(method="svd", ratio=0.4, rank_multiple=8))
    model.to(dtype)
    layers = [m for m in model.modules() if isinstance(m, FactorizedLinear)]
    assert layers and all(f.rank % 8 == 0 for f in layers)
    assert all(f.up.weight.is_contiguous() and f.down.weight.is_contiguous() for f in layers)
    f = layers[0]
    x = torch.randn(1, 1, f.in_features, dtype=dtype)
    with torch.no_grad(), torch.profiler.profile(record_shapes=True) as prof:
        y = f(x)
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    gemms = [[list(s) for s in e.input_shapes[e.name == "aten::addmm":][:2]]  # addmm: bias first
             for e in events if e.name in ("aten::mm", "aten::addmm")]
    assert gemms == [[[1, f.in_features], [f.in_features, f.rank]], [[1, f.rank], [f.rank, f.out_features]]]
    copies = [e for e in events if e.name in ("aten::copy_", "aten::_to_copy", "aten::clone")]
    # addmm writes the bias into its output before the product (as any nn.Linear with a bias)
    assert not [e.name for e in copies if getattr(e.cpu_parent, "name", None) != "aten::addmm"]
    with torch.no_grad():
        expected = (x.reshape(1, -1) @ f.down.weight.t()) @ f.up.weight.t()
        expected = expected if f.bias is None else expected + f.bias
    torch.testing.assert_close(y.reshape(1, -1), expected, rtol=2e-2 if dtype == torch.bfloat16 else 1e-6,
                               atol=1e-2 if dtype == torch.bfloat16 else 1e-6)


def test_recovery_depends_on_its_seed_not_on_what_ran_before():
    """The adapters' initial values come from the recovery's seed: the same recovery after
    other draws from torch's RNG gives the same model (it did not: A was drawn from whatever
    state the RNG was in, so an ablation's rows depended on their order)."""
    import copy as _copy
    base = tiny_llama()
    compress_model(base, CompressConfig(method="svd", ratio=0.3))
    cfg = {**_TRAIN, "seed": 3}

    def recovered() -> dict:
        m = _copy.deepcopy(base)
        recover_compressed(m, _blocks(), method="hylorada", steps=2, lora_rank=4, train_config=cfg)
        return m.state_dict()

    torch.manual_seed(0)
    first = recovered()
    torch.rand(1000)  # anything else drawing from the RNG in between
    second = recovered()
    assert all(torch.equal(first[k], second[k]) for k in first)
