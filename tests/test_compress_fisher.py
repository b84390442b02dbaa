"""method="fisher" (hylorada/compress/curvature.py): each formula against an independent reference.

- the output-gradient Gram against gradients taken by autograd at leaf outputs;
- the sampled-label loss: its gradient covariance is the softmax Fisher diag(p) - p pᵀ;
- the factors: the optimum of ||Rᵀ (W - Ŵ) L||² against the symmetric-root closed form;
- compress_model: its K-FAC objective is below SVD-LLM's at the same ranks, computed from the weights;
- allocation in loss units (absolute), and the combinations that are refused.
"""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import VOCAB, tiny_gpt2, tiny_llama
from hylorada.compress import CompressConfig, compress_model, find_target_layers
from hylorada.compress.allocate import allocate_by_loss
from hylorada.compress.curvature import OutputGramCollector, collect_output_grams, sampled_label_loss
from hylorada.compress.ranks import LayerSpec
from hylorada.compress.whiten import collect_grams, whitened_svd, whitening_factor
from hylorada.errors import UsageError
from hylorada.layers import dense_weight


def _spd(n: int, gen: torch.Generator, cond: float = 1e3) -> torch.Tensor:
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return (Q * torch.logspace(0, torch.log10(torch.tensor(cond)).item(), n, dtype=torch.float64)) @ Q.T


def _sym_root(A: torch.Tensor, power: float) -> torch.Tensor:
    ev, Q = torch.linalg.eigh(A)
    return (Q * ev.clamp_min(0).pow(power)) @ Q.T


def test_output_gram_matches_autograd_at_leaf_outputs():
    torch.manual_seed(0)
    model = tiny_llama().double().eval()
    targets = find_target_layers(model)
    ids = torch.randint(0, VOCAB, (3, 10))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    c = torch.randn(VOCAB, dtype=torch.float64)

    def loss_of(logits):  # any scalar function of the logits; masked positions contribute nothing
        return (logits * c).sum(-1).sin().mul(mask).sum()

    model.get_input_embeddings().register_forward_hook(lambda m, a, out: out.detach().requires_grad_(True))
    with OutputGramCollector(targets) as col, torch.enable_grad():
        col.set_mask(mask)
        loss_of(model(input_ids=ids, attention_mask=mask).logits).backward()
    ours = col.grams()

    leaves = {}
    for name, mod in targets.items():  # reference: a zero leaf added to each output, d loss / d leaf by autograd.grad
        def add_leaf(m, a, out, name=name):
            leaves[name] = torch.zeros_like(out, requires_grad=True)
            return out + leaves[name]
        mod.register_forward_hook(add_leaf)
    with torch.enable_grad():
        loss = loss_of(model(input_ids=ids, attention_mask=mask).logits)
        grads = torch.autograd.grad(loss, [leaves[n] for n in targets])
    for name, g in zip(targets, grads):
        d = g.reshape(-1, g.shape[-1])[mask.reshape(-1).bool()]
        assert ours[name].n_tokens == int(mask.sum())
        torch.testing.assert_close(ours[name].G, d.T @ d / d.shape[0], rtol=1e-10, atol=1e-14)


def test_sampled_label_gradients_have_the_softmax_fisher_as_covariance():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 1, 5, dtype=torch.float64) * 1.5
    p = logits.softmax(-1)[0, 0]
    n, acc = 40000, torch.zeros(5, 5, dtype=torch.float64)
    for _ in range(n // 1000):
        z = logits.expand(1, 1000, 5).clone().requires_grad_(True)
        sampled_label_loss(z, None, gen).backward()
        g = z.grad[0].double()
        acc += g.T @ g
    torch.testing.assert_close(acc / n, torch.diag(p) - torch.outer(p, p), rtol=0, atol=0.01)


@pytest.mark.parametrize("shape", [(12, 20), (20, 12)])
def test_fisher_factors_are_the_kfac_optimum(shape):
    m, n = shape
    gen = torch.Generator().manual_seed(1)
    W = torch.randn(m, n, generator=gen, dtype=torch.float64)
    F, G = _spd(m, gen), _spd(n, gen)
    wh = whitening_factor(G)
    wh.left = whitening_factor(F)
    k = 5
    f = whitened_svd(W, wh, k, dtype=torch.float64)
    ours = f.up @ f.down
    # reference: Ŵ = F^{-1/2} [F^{1/2} W G^{1/2}]_k G^{-1/2} (symmetric roots by eigh, not Cholesky)
    A = _sym_root(F, 0.5) @ W @ _sym_root(G, 0.5)
    U, S, Vh = torch.linalg.svd(A)
    ref = _sym_root(F, -0.5) @ (U[:, :k] * S[:k]) @ Vh[:k] @ _sym_root(G, -0.5)
    torch.testing.assert_close(ours, ref, rtol=1e-7, atol=1e-9)
    E = W - ours
    assert f.dropped_energy() == pytest.approx(float(torch.trace(F @ E @ G @ E.T)), rel=1e-8)
    assert f.dropped_energy() == pytest.approx(float(S[k:].square().sum()), rel=1e-8)


def _kfac_objective(dense, compressed, grams, out_grams) -> float:
    total = 0.0
    for name in grams:
        W = dense_weight(dense.get_submodule(name)).double()
        new = compressed.get_submodule(name)
        What = (new.up.weight @ new.down.weight).double() if hasattr(new, "up") else dense_weight(new).double()
        E = W - What
        total += float(torch.trace(out_grams[name].G @ E.detach() @ grams[name].G @ E.detach().T))
    return total


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2])
def test_compress_fisher_beats_whiten_on_the_kfac_objective(factory):
    torch.manual_seed(0)
    dense = factory().double()
    ids = torch.randint(0, VOCAB, (16, 24))
    targets = find_target_layers(dense)
    grams = collect_grams(dense, targets, ids)
    out_grams = collect_output_grams(dense, targets, ids)
    assert all(p.grad is None and p.requires_grad for p in dense.parameters())  # parameters untouched
    objective, sizes = {}, {}
    for method, allocate in (("whiten", "uniform"), ("fisher", "uniform"), ("fisher", "auto")):
        model = copy.deepcopy(dense)
        report = compress_model(model, CompressConfig(method=method, ratio=0.3, allocate=allocate), calibration=ids)
        objective[method, allocate] = _kfac_objective(dense, model, grams, out_grams)
        sizes[method, allocate] = report.target_params_after
        if allocate == "auto":
            assert report.config["allocate"] == "loss" and any("'loss'" in n for n in report.notes)
            # the ranks: loss allocation of the spectra of F^½ W G^½ (symmetric roots), in absolute units
            spectra = {n: torch.linalg.svdvals(_sym_root(out_grams[n].G, 0.5) @ dense_weight(t).double()
                                               @ _sym_root(grams[n].G, 0.5)) for n, t in targets.items()}
            specs = [LayerSpec(r.name, r.d_out, r.d_in, r.bias) for r in report.layers]
            expected = allocate_by_loss(specs, 0.3, spectra, {}, False, "absolute")
            assert {r.name: r.rank for r in report.layers} == {n: d.rank for n, d in expected.items()}
    assert objective["fisher", "uniform"] < objective["whiten", "uniform"]
    assert objective["fisher", "auto"] < objective["fisher", "uniform"]
    assert sizes["fisher", "uniform"] == sizes["whiten", "uniform"]
    assert sizes["fisher", "auto"] <= sizes["fisher", "uniform"]


def test_fisher_spectra_are_allocated_in_absolute_units():
    specs = [LayerSpec("a", 16, 16, False), LayerSpec("b", 16, 16, False)]
    s = torch.linspace(16, 1, 16, dtype=torch.float64)
    spectra = {"a": s, "b": s * 1e-3}  # same shape of spectrum, b's losses 1e6 times smaller
    relative = allocate_by_loss(specs, 0.5, spectra, {}, False, "relative")
    absolute = allocate_by_loss(specs, 0.5, spectra, {}, False, "absolute")
    assert relative["a"].rank == relative["b"].rank
    assert absolute["a"].rank > absolute["b"].rank
    assert absolute["a"].rank + absolute["b"].rank <= relative["a"].rank + relative["b"].rank


@pytest.mark.parametrize("field,value", [("calibrate", "sequential"), ("allocate", "sensitivity"),
                                         ("update", "lstsq")])
def test_fisher_refuses_options_it_does_not_optimise(field, value):
    with pytest.raises(UsageError, match=f"CompressConfig.{field}='{value}' does not combine with method='fisher'"):
        CompressConfig(method="fisher", ratio=0.2, **{field: value})


def test_fisher_needs_calibration():
    with pytest.raises(ValueError, match="method='fisher' needs calibration"):
        compress_model(tiny_llama(), CompressConfig(method="fisher", ratio=0.2))


def test_cli_compress_method_fisher_saves_what_it_reports(tiny_assets, tmp_path, capsys):
    import json

    from hylorada.cli import main
    from hylorada.loading import load_model

    model_dir, corpus = tiny_assets
    out = tmp_path / "c"
    assert main(["compress", "--model", model_dir, "--ratio", "0.3", "--method", "fisher", "--calib", corpus,
                 "--calib-blocks", "8", "--calib-seq-len", "16", "--no-eval", "--no-progress", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "allocate='auto' -> 'loss'" in printed
    report = json.loads((out / "results.json").read_text())["report"]
    assert report["config"]["method"] == "fisher" and report["config"]["allocate"] == "loss"
    model, _ = load_model(str(out))
    assert report["model_params_after"] == sum(p.numel() for p in model.parameters())
    assert all("output cholesky" in r["whitening"] for r in report["layers"] if not r["dense"])
    # a refused combination stops before any work, in one line
    assert main(["compress", "--model", model_dir, "--ratio", "0.3", "--method", "fisher", "--update", "lstsq",
                 "--calib", corpus, "--no-eval", "--out", str(tmp_path / "d")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "update='lstsq' does not combine with method='fisher'" in err[0]
    assert not (tmp_path / "d").exists()
