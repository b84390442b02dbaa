"""Issue 15's options, each against an independent reference: rank allocation under one budget
(brute force), sequential calibration (Grams by hand), the least-squares update
(torch.linalg.lstsq), distillation loss (a hand-written KL)."""
from __future__ import annotations

import copy
import itertools
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import VOCAB, tiny_gpt2, tiny_llama, tiny_qwen2
from hylorada.compress import factorize
from hylorada.compress.allocate import (allocate_by_loss, allocate_by_sensitivity,
                                        choose_options, uniform_budget)
from hylorada.compress.api import compress_model, find_target_layers
from hylorada.compress.config import CompressConfig
from hylorada.compress.ranks import LayerSpec, factorized_params, max_saving_rank
from hylorada.compress.sequential import forward_groups
from hylorada.compress.update import lstsq_up
from hylorada.layers import dense_weight
from hylorada.losses import kd_loss_sum

ROOT = Path(__file__).resolve().parents[1]


def _calib(n_blocks: int = 6, seq_len: int = 24, seed: int = 7) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n_blocks, seq_len), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------
# allocation: brute force over every rank combination
# --------------------------------------------------------------------------------------------
def _rel_loss(s: torch.Tensor, k: int) -> float:
    e = s.double().square()
    return float(e[k:].sum() / e.sum())


def _brute_force(specs, losses_of, max_cost):
    """min Σ loss over all rank combinations k_i in 1..kmax_i costing <= max_cost."""
    best = None
    for ks in itertools.product(*[range(1, max_saving_rank(s.m, s.n) + 1) for s in specs]):
        cost = sum(factorized_params(k, s.m, s.n, s.bias) for k, s in zip(ks, specs))
        if cost <= max_cost:
            val = sum(losses_of(s, k) for s, k in zip(specs, ks))
            if best is None or val < best[0] - 1e-15:
                best = (val, ks)
    return best


def _spectra(specs, seed=0):
    """Hand-made spectra: different decay rates and scales 100x apart (so a normalisation
    other than each matrix's own Σσ² picks other ranks)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, s in enumerate(specs):
        n = min(s.m, s.n)
        decay = torch.linspace(0, 1, n, dtype=torch.float64) * (0.05, 2.0, 30.0)[i % 3]
        out[s.name] = (10.0 ** (2 * (i % 2))) * torch.exp(-decay) * (1 + 0.01 * torch.rand(n, generator=g,
                                                                                              dtype=torch.float64))
        out[s.name] = out[s.name].sort(descending=True).values
    return out


def test_loss_allocation_is_brute_force_optimum_equal_shapes():
    specs = [LayerSpec(f"l{i}", 12, 10, False) for i in range(3)]
    spectra = _spectra(specs)
    ratio = 0.5
    budget = uniform_budget(specs, ratio, {}, False)
    dec = allocate_by_loss(specs, ratio, spectra, {}, False)
    ks = tuple(dec[s.name].rank for s in specs)
    spent = sum(factorized_params(k, s.m, s.n, False) for k, s in zip(ks, specs))
    assert spent == budget  # equal costs: the budget is met exactly
    best = _brute_force(specs, lambda s, k: _rel_loss(spectra[s.name], k), budget)
    ours = sum(_rel_loss(spectra[s.name], k) for s, k in zip(specs, ks))
    assert ours == pytest.approx(best[0], abs=1e-12)
    assert ks == best[1]
    assert len(set(ks)) > 1  # not the uniform answer


def test_loss_allocation_mixed_shapes_optimal_for_what_it_spends_and_meets_budget():
    specs = [LayerSpec("a", 12, 10, False), LayerSpec("b", 16, 8, False), LayerSpec("c", 20, 6, True)]
    spectra = _spectra(specs, seed=1)
    for ratio in (0.3, 0.5, 0.7):
        budget = uniform_budget(specs, ratio, {}, False)
        dec = allocate_by_loss(specs, ratio, spectra, {}, False)
        ks = [dec[s.name].rank for s in specs]
        spent = sum(factorized_params(k, s.m, s.n, s.bias) for k, s in zip(ks, specs))
        assert budget - max(s.m + s.n for s in specs) < spent <= budget
        best = _brute_force(specs, lambda s, k: _rel_loss(spectra[s.name], k), spent)
        ours = sum(_rel_loss(spectra[s.name], k) for s, k in zip(specs, ks))
        assert ours == pytest.approx(best[0], abs=1e-12)


def _brute_choice(costs, losses, budget):
    best = None
    for pick in itertools.product(*[range(len(c)) for c in costs]):
        cost = sum(c[j] for c, j in zip(costs, pick))
        if cost <= budget:
            val = sum(l[j] for l, j in zip(losses, pick))
            best = val if best is None else min(best, val)
    return best


@pytest.mark.parametrize("seed", range(12))
def test_choose_options_is_brute_force_optimum_for_what_it_spends(seed):
    g = torch.Generator().manual_seed(seed)
    n_items = 3 + seed % 2
    costs, losses = [], []
    for _ in range(n_items):  # arbitrary (non-convex, even non-monotone) measured losses
        c = sorted(set(int(x) for x in torch.randint(5, 60, (4,), generator=g)))
        costs.append(c)
        losses.append([float(x) for x in torch.rand(len(c), generator=g) * 3])
    budget = sum(c[0] for c in costs) + int(torch.randint(0, 80, (1,), generator=g))
    spend = choose_options(costs, losses, budget)
    pick = [min((j for j in range(len(c)) if c[j] == x), key=lambda j: l[j])
            for c, l, x in zip(costs, losses, spend)]
    spent = sum(spend)
    ours = sum(l[j] for l, j in zip(losses, pick))
    assert spent <= budget
    assert ours == pytest.approx(_brute_choice(costs, losses, spent), abs=1e-12)


def test_choose_options_convex_equal_steps_is_optimum_at_the_budget():
    costs = [[10, 20, 30, 40]] * 3
    losses = [[9.0, 5.0, 3.0, 2.5], [4.0, 3.0, 2.2, 2.0], [20.0, 8.0, 1.0, 0.5]]
    for budget in range(30, 121, 10):
        spend = choose_options(costs, losses, budget)
        ours = sum(l[c.index(x)] for c, l, x in zip(costs, losses, spend))
        assert ours == pytest.approx(_brute_choice(costs, losses, budget))
        assert sum(spend) == budget


def test_choose_options_with_granules_is_the_optimum_of_the_interpolated_losses():
    """Convex measured points, interpolated linearly: brute force over every unit step."""
    import numpy as np
    costs = [[10, 30, 70], [20, 40, 60], [10, 50, 90]]
    losses = [[9.0, 3.0, 1.0], [4.0, 2.5, 2.0], [20.0, 4.0, 1.0]]
    for budget in range(40, 221, 7):
        spend = choose_options(costs, losses, budget, granules=[10, 10, 10])
        grid = [range(c[0], c[-1] + 1, 10) for c in costs]
        best = min(sum(float(np.interp(x, c, l)) for x, c, l in zip(xs, costs, losses))
                   for xs in itertools.product(*grid) if sum(xs) <= budget)
        ours = sum(float(np.interp(x, c, l)) for x, c, l in zip(spend, costs, losses))
        assert ours == pytest.approx(best)
        assert budget - 10 < sum(spend) <= budget or sum(spend) == sum(c[-1] for c in costs)


def test_sensitivity_allocation_uses_table_and_uniform_budget():
    specs = [LayerSpec("a", 12, 10, False), LayerSpec("b", 12, 10, False)]
    table = {"a": [(1, 5.0), (2, 1.0), (4, 0.5)], "b": [(1, 0.2), (2, 0.1), (4, 0.05)]}
    dec = allocate_by_sensitivity(specs, 0.5, table, {}, False)  # uniform: rank 2 each (88)
    # a: 1->2 saves 4.0 per 22 params, 2->4 0.25 per rank step; b: 0.1, then 0.025 per step
    assert (dec["a"].rank, dec["b"].rank) == (3, 1)


@pytest.mark.parametrize("allocate", ["loss", "sensitivity"])
def test_allocation_in_compress_model_keeps_the_uniform_size(allocate):
    calib = _calib()
    uniform = compress_model(tiny_llama(), CompressConfig(ratio=0.4), calibration=calib)
    rep = compress_model(tiny_llama(), CompressConfig(ratio=0.4, allocate=allocate, sensitivity_blocks=2),
                         calibration=calib)
    slack = max(r.d_in + r.d_out for r in rep.layers)
    assert uniform.target_params_after - slack < rep.target_params_after <= uniform.target_params_after
    assert len({r.rank for r in rep.layers if r.d_in == r.d_out == 32}) > 1  # ranks differ
    assert f"allocate={allocate}" in rep.layers[0].policy
    assert rep.timings["allocation_s"] > 0


@pytest.mark.parametrize("kw,device,has_calib,expected", [
    (dict(ratio=0.2), "cuda", True, "sensitivity"),
    (dict(ratio=0.2), "cpu", True, "uniform"),
    (dict(ratio=0.2), "cuda", False, "uniform"),
    (dict(ratio=0.2, method="svd"), "cuda", True, "uniform"),
    (dict(energy=0.9), "cuda", True, "uniform"),
    (dict(ratio=0.2, allocate="loss"), "cpu", True, "loss"),
    (dict(ratio=0.2, allocate="uniform"), "cuda", True, "uniform"),
])
def test_allocate_auto_resolves_by_method_policy_data_and_device(kw, device, has_calib, expected):
    """The default: sensitivity (the best measured) where it runs and costs about a minute
    (whiten + ratio + calibration on CUDA), uniform elsewhere; explicit values pass through."""
    from hylorada.compress.allocate import resolve_allocate
    cfg = CompressConfig(**kw)
    assert CompressConfig(ratio=0.2).allocate == "auto"
    got, why = resolve_allocate(cfg.allocate, cfg.method, cfg.policy, has_calib, torch.device(device))
    assert got == expected
    assert (why != "") == (cfg.allocate == "auto")


def test_allocate_auto_on_cpu_is_uniform_and_the_report_says_so():
    calib = _calib()
    auto = compress_model(tiny_llama(), CompressConfig(ratio=0.4), calibration=calib)
    uniform = compress_model(tiny_llama(), CompressConfig(ratio=0.4, allocate="uniform"), calibration=calib)
    assert auto.config["allocate"] == "uniform"
    assert [r.rank for r in auto.layers] == [r.rank for r in uniform.layers]
    assert any("allocate='auto' -> 'uniform' on cpu" in n for n in auto.notes)


# --------------------------------------------------------------------------------------------
# sequential calibration
# --------------------------------------------------------------------------------------------
def _inputs(model, name: str, ids: torch.Tensor) -> torch.Tensor:
    box = []
    h = model.get_submodule(name).register_forward_pre_hook(lambda m, a: box.append(a[0].detach()))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    h.remove()
    return box[0].reshape(-1, box[0].shape[-1]).double()


def test_forward_groups_follow_the_forward_pass():
    model = tiny_llama()
    groups = forward_groups(model, find_target_layers(model), _calib())
    a, m = "self_attn", "mlp"
    expect = []
    for i in range(2):
        p = f"model.layers.{i}."
        expect += [[p + f"{a}.q_proj", p + f"{a}.k_proj", p + f"{a}.v_proj"], [p + f"{a}.o_proj"],
                   [p + f"{m}.gate_proj", p + f"{m}.up_proj"], [p + f"{m}.down_proj"]]
    assert groups == expect


def test_sequential_grams_are_those_of_the_model_compressed_below(monkeypatch):
    model, calib = tiny_llama(), _calib()
    dense = copy.deepcopy(model)
    used = []
    real = factorize.whitening_factor
    monkeypatch.setattr(factorize, "whitening_factor", lambda G, *a: used.append(G.clone()) or real(G, *a))
    compress_model(model, CompressConfig(ratio=0.4, calibrate="sequential", calib_batch_size=4),
                   calibration=calib)
    leaders = [g[0] for g in forward_groups(dense, find_target_layers(dense), calib)]
    assert len(used) == len(leaders) == 8
    # by hand: layer 2's q/k/v inputs from a forward of the dense model with layer 1 compressed
    half = copy.deepcopy(dense)
    half.model.layers[0] = copy.deepcopy(model.model.layers[0])
    X = _inputs(half, leaders[4], calib)
    torch.testing.assert_close(used[4], X.mT @ X / X.shape[0], rtol=1e-10, atol=1e-12)
    # every group: a layer's input depends only on what runs before it, all compressed by then,
    # so the finished model reproduces each Gram
    for G, name in zip(used, leaders):
        X = _inputs(model, name, calib)
        torch.testing.assert_close(G, X.mT @ X / X.shape[0], rtol=1e-10, atol=1e-12)
    Xd = _inputs(dense, leaders[4], calib)  # the dense Gram of layer 2's q/k/v differs
    assert (used[4] - Xd.mT @ Xd / Xd.shape[0]).abs().max() > 1e-3 * used[4].abs().max()
    Xd = _inputs(dense, leaders[0], calib)  # layer 1's q/k/v: nothing below is compressed
    torch.testing.assert_close(used[0], Xd.mT @ Xd / Xd.shape[0], rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------------
# least-squares update
# --------------------------------------------------------------------------------------------
def test_lstsq_up_matches_torch_lstsq_on_explicit_activations():
    g = torch.Generator().manual_seed(0)
    m, n, k, N = 7, 9, 3, 200
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    D = torch.randn(k, n, generator=g, dtype=torch.float64)
    Xd = torch.randn(N, n, generator=g, dtype=torch.float64) @ torch.randn(n, n, generator=g, dtype=torch.float64)
    Xc = Xd + 0.3 * torch.randn(N, n, generator=g, dtype=torch.float64)  # compressed-model inputs
    up = lstsq_up(W, D, Xd.mT @ Xc / N, Xc.mT @ Xc / N, ridge=0.0)
    ref = torch.linalg.lstsq(Xc @ D.mT, Xd @ W.mT).solution.mT  # min ||Xd Wᵀ - Xc Dᵀ upᵀ||
    torch.testing.assert_close(up, ref, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("n_blocks,seq_len", [(6, 24), (2, 6)])  # (2, 6): 12 tokens, jitter
def test_whitened_plus_lstsq_equals_whitened_under_dense_calibration(n_blocks, seq_len):
    calib = _calib(n_blocks, seq_len)
    a, b = tiny_llama(), tiny_llama()
    compress_model(a, CompressConfig(ratio=0.4), calibration=calib)
    rep = compress_model(b, CompressConfig(ratio=0.4, update="lstsq"), calibration=calib)
    for (na, ma), (nb, mb) in zip(a.named_modules(), b.named_modules()):
        if hasattr(ma, "dense_weight") and hasattr(ma, "rank"):
            Wa, Wb = ma.dense_weight().double(), mb.dense_weight().double()
            assert (Wa - Wb).abs().max() <= 1e-6 * Wa.abs().max(), na
    assert all(abs(r.update_gain) < 1e-6 for r in rep.layers)
    assert ("jitter" in rep.layers[0].whitening) == (n_blocks == 2)


def test_svd_plus_lstsq_is_the_least_squares_up_on_the_calibration_inputs():
    calib = _calib()
    model = tiny_llama()
    dense = copy.deepcopy(model)
    name = "model.layers.1.mlp.down_proj"
    rep = compress_model(model, CompressConfig(method="svd", ratio=0.4, update="lstsq"), calibration=calib)
    X = _inputs(dense, name, calib)  # dense calibration: every layer sees the dense inputs
    layer = model.get_submodule(name)
    D = layer.down.weight.double()
    W = dense_weight(dense.get_submodule(name)).double()
    ref = torch.linalg.lstsq(X @ D.mT, X @ W.mT).solution.mT
    torch.testing.assert_close(layer.up.weight.double(), ref, rtol=1e-4, atol=1e-6)
    assert min(r.update_gain for r in rep.layers) > 0.0


def test_sequential_lstsq_fits_the_dense_outputs_from_the_compressed_inputs():
    calib = _calib()
    model = tiny_llama()
    dense = copy.deepcopy(model)
    compress_model(model, CompressConfig(ratio=0.4, calibrate="sequential", update="lstsq"),
                   calibration=calib)
    name = "model.layers.1.mlp.down_proj"
    Xd, Xc = _inputs(dense, name, calib), _inputs(model, name, calib)
    layer = model.get_submodule(name)
    D = layer.down.weight.double()
    W = dense_weight(dense.get_submodule(name)).double()
    ref = torch.linalg.lstsq(Xc @ D.mT, Xd @ W.mT).solution.mT
    torch.testing.assert_close(layer.up.weight.double(), ref, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------
# distillation loss
# --------------------------------------------------------------------------------------------
def _hand_kd(s, t, labels, T):
    total, n = 0.0, 0
    for b in range(s.shape[0]):
        for i in range(s.shape[1] - 1):
            if labels[b, i + 1] == -100:
                continue
            p = torch.softmax(t[b, i].double() / T, -1)
            q = torch.softmax(s[b, i].double() / T, -1)
            total += T * T * float((p * (p.log() - q.log())).sum())
            n += 1
    return total, n


@pytest.mark.parametrize("T", [1.0, 2.5])
def test_kd_loss_is_the_hand_written_kl_and_skips_masked_positions(T):
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 6, 11, generator=g), torch.randn(2, 6, 11, generator=g)
    labels = torch.randint(0, 11, (2, 6), generator=g)
    labels[0, 3] = labels[1, 1] = -100
    got, n = kd_loss_sum(s, t, labels, None, T)
    ref, n_ref = _hand_kd(s, t, labels, T)
    assert n == n_ref == 8
    assert float(got) == pytest.approx(ref, rel=1e-5)
    s2 = s.clone()
    s2[0, 2] += 5 * torch.randn(11, generator=g)  # logits at 2 score the masked label 3
    assert float(kd_loss_sum(s2, t, labels, None, T)[0]) == pytest.approx(float(got), rel=1e-6)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4] = 0  # padding counts like -100
    assert kd_loss_sum(s, t, labels, mask, T)[1] == 7


def test_kd_loss_with_teacher_equal_student_is_zero_with_zero_gradient():
    s = torch.randn(2, 5, 13, requires_grad=True)
    loss, _ = kd_loss_sum(s, s.detach().clone(), torch.zeros(2, 5, dtype=torch.long), None, 2.0)
    loss.backward()
    assert abs(float(loss.detach())) < 1e-6
    assert s.grad.abs().max() < 1e-6


def test_recovery_with_kd_trains_and_starts_at_zero_loss():
    from hylorada.recipes.compress import recover_compressed
    model = tiny_llama()
    teacher = copy.deepcopy(model)
    ids = _calib(8, 16, seed=3)
    blocks = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    # a dense-rank factorisation: the student equals the teacher, so KD starts at ~0
    compress_model(model, CompressConfig(method="svd", alpha=1.0, force=True))
    out = recover_compressed(model, blocks, steps=2, loss="kd", kd_temperature=2.0, teacher=teacher,
                             train_config={"batch_size": 4, "progress": False, "mixed_precision": "no"})
    assert out["loss"] == "kd"
    assert abs(out["phases"][0]["first_loss"]) < 1e-4
    with pytest.raises(ValueError, match="teacher"):
        recover_compressed(model, blocks, steps=1, loss="kd")


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,field", [
    (dict(ratio=0.2, allocate="best"), "allocate"),
    (dict(energy=0.9, allocate="loss"), "allocate"),
    (dict(ratio=0.2, calibrate="layerwise"), "calibrate"),
    (dict(ratio=0.2, method="svd", calibrate="sequential"), "calibrate"),
    (dict(ratio=0.2, update="ridge"), "update"),
    (dict(ratio=0.2, recover_loss="kl"), "recover_loss"),
    (dict(ratio=0.2, kd_temperature=0), "kd_temperature"),
    (dict(ratio=0.2, sensitivity_blocks=0), "sensitivity_blocks"),
])
def test_bad_option_raises_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"CompressConfig.{field}"):
        CompressConfig(**kwargs)


def test_options_needing_data_refuse_to_run_without_calibration():
    for kw in (dict(calibrate="sequential"), dict(allocate="sensitivity"),
               dict(method="svd", update="lstsq")):
        with pytest.raises(ValueError, match="calibration"):
            compress_model(tiny_llama(), CompressConfig(ratio=0.2, **kw))


# --------------------------------------------------------------------------------------------
# the GPU command's CPU smoke
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ablation_command_quick_smoke(tmp_path):
    out = tmp_path / "ABLATION.md"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compress_results.py"), "--ablation",
                           "--device", "cpu", "--quick", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json
    data = json.loads(out.with_suffix(".json").read_text())
    names = {r["row"] for r in data["rows"]}
    assert {"baseline", "allocate=loss", "allocate=sensitivity", "calibrate=sequential",
            "update=lstsq", "recover_loss=kd", "all"} <= names
    assert data["env"]["versions"]["torch"] and "compress_results.py" in data["command"]
    assert "| ratio |" in out.read_text()


def test_ablation_child_argv_replaces_the_cell_flags():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from compress_results import _child_argv
    argv = ["--ablation", "--jobs", "4", "--ratios=0.2,0.4", "--rows", "default,all", "--seeds", "0", "1",
            "--out", "x.md", "--tf32"]
    assert _child_argv(argv, 0.4, "allocate=sensitivity&calibrate=sequential", Path("c.md")) == [
        "--ablation", "--seeds", "0", "1", "--tf32", "--ratios", "0.4", "--rows",
        "allocate=sensitivity&calibrate=sequential", "--out", "c.md", "--resume"]


@pytest.mark.slow
def test_ablation_jobs_merge_and_resume_per_seed(tmp_path):
    """--jobs 2 runs each cell in a child and merges; --resume with one more seed runs only it."""
    import json
    out = tmp_path / "A.md"
    base = [sys.executable, str(ROOT / "benchmarks" / "compress_results.py"), "--ablation", "--device", "cpu",
            "--quick", "--out", str(out), "--jobs", "2", "--rows", "baseline,recover_loss=kd"]
    proc = subprocess.run(base + ["--seeds", "0"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    first = json.loads(out.with_suffix(".json").read_text())
    assert [r["row"] for r in first["rows"]] == ["baseline", "recover_loss=kd"]
    proc = subprocess.run(base + ["--seeds", "0", "1", "--resume"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    second = json.loads(out.with_suffix(".json").read_text())
    for a, b in zip(first["rows"], second["rows"]):
        assert [x["seed"] for x in b["recovery"]] == [0, 1]
        assert b["recovery"][0] == a["recovery"][0]  # seed 0 kept, not re-run
    assert second["args"]["seeds"] == [0, 1]


# --------------------------------------------------------------------------------------------
# sensitivity: replaying the blocks below a matrix (hylorada/compress/replay.py)
# --------------------------------------------------------------------------------------------
def _sensitivity(model, monkeypatch, replay: bool):
    from hylorada.compress import factorize
    monkeypatch.setattr(factorize, "REPLAY_MAX_BYTES", 4 * 2**30 if replay else 0)
    return compress_model(model, CompressConfig(ratio=0.4, allocate="sensitivity", sensitivity_blocks=4,
                                                calib_batch_size=2), calibration=_calib())


@pytest.mark.parametrize("make", [lambda: tiny_llama(num_hidden_layers=3), tiny_qwen2, tiny_gpt2])
def test_sensitivity_replay_measures_what_the_full_forward_measures(make, monkeypatch):
    """Same ranks and the same measured losses as running every block for every measurement
    (the reference: the replay switched off)."""
    from hylorada.compress import allocate
    seen = {}
    real = allocate.allocate_by_sensitivity

    def spy(specs, ratio, table, overrides, force):
        seen.setdefault("tables", []).append(table)
        return real(specs, ratio, table, overrides, force)
    monkeypatch.setattr("hylorada.compress.factorize.allocate_by_sensitivity", spy)
    fast = _sensitivity(make(), monkeypatch, replay=True)
    slow = _sensitivity(make(), monkeypatch, replay=False)
    t_fast, t_slow = seen["tables"]
    assert t_fast.keys() == t_slow.keys()
    for name in t_slow:
        assert [k for k, _ in t_fast[name]] == [k for k, _ in t_slow[name]]
        assert [d for _, d in t_fast[name]] == pytest.approx([d for _, d in t_slow[name]], abs=1e-6)
    assert [r.rank for r in fast.layers] == [r.rank for r in slow.layers]
    assert not any("replaying" in n for n in fast.notes)


def test_sensitivity_replay_skips_the_blocks_below(monkeypatch):
    """Block 0 runs for the recording and for its own matrices only; the last block every time."""
    model = tiny_llama(num_hidden_layers=3)
    calls = [0, 0, 0]
    for i, block in enumerate(model.model.layers):
        block.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1))
    _sensitivity(model, monkeypatch, replay=True)
    grams, batches, per_block = 3, 2, 7 * 4  # Gram pass: 6 blocks / batch 2; the loss: 4 blocks / 2;
    # 7 matrices x 4 candidate ranks per block. Block 0: Gram pass, recording, its own matrices
    assert calls[0] == grams + batches + per_block * batches
    # the last block: Gram pass, recording, the check, and every block's matrices
    assert calls[2] == grams + batches + batches + 3 * per_block * batches


def test_sensitivity_replay_switches_off_when_blocks_talk_outside_their_outputs(monkeypatch):
    """A block that reads state left by a block below it cannot be replayed: the check sees the
    loss change, measures the slow way and says so."""
    model = tiny_llama(num_hidden_layers=3)
    side = {"v": 0.0}
    model.model.layers[0].register_forward_hook(lambda m, a, out: side.__setitem__("v", side["v"] + 1.0))
    model.model.layers[2].register_forward_hook(lambda m, a, out: out + 1e-2 * side["v"])
    rep = _sensitivity(model, monkeypatch, replay=True)
    assert any("replaying the blocks below a matrix changed the loss" in n for n in rep.notes)


def test_sensitivity_replay_stand_ins_answer_for_their_block(monkeypatch):
    """A decoder loop that reads an attribute of each block (as some families read
    `layer.attention_type`) still works with the stand-ins in place."""
    model = tiny_llama(num_hidden_layers=3)
    for block in model.model.layers:
        block.kind_of_attention = "full"
    real = type(model.model).forward

    def forward(self, *args, **kwargs):
        assert all(layer.kind_of_attention == "full" for layer in self.layers)
        return real(self, *args, **kwargs)
    monkeypatch.setattr(type(model.model), "forward", forward)
    rep = _sensitivity(model, monkeypatch, replay=True)
    assert not any("replaying" in n for n in rep.notes)
