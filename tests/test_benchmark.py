"""hylorada benchmark: matched budgets, ablations, results.json schema, resume, --only, CLI."""
from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import tiny_gpt2, tiny_llama
from hylorada.recipes import benchmark as bm
from hylorada.recipes.benchmark import (ABLATIONS, KAIMING_ROW_NORM, BenchConfig, Cell, CellRunner, matched_ranks,
                                        plan_cells, run_benchmark, trainable_count)
from hylorada.recipes.benchmark.config import base_method

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(model: str, data: str, **kw) -> BenchConfig:
    base = dict(preset="cpu-quick", model=model, data=data, seeds=1, steps=3, batch_size=2, seq_len=16, lr=1e-2,
                warmup_steps=0, mixed_precision="no", target_rank=8, eval_seq_len=32, eval_max_tokens=None,
                eval_batch_size=4, methods=["lora", "hylorada"], peft=True, ablations=["hylorada-gate-frozen"],
                ratios=[0.4], calib_blocks=8, calib_seq_len=16, recovery_rank=2, caveat=bm.CPU_QUICK_CAVEAT)
    base.update(kw)
    return BenchConfig.from_flat(**base)


# ---------------------------------------------------------------------------------- budgets
@pytest.mark.parametrize("factory,targets", [(tiny_llama, "all-linear"), (tiny_llama, ["q_proj", "v_proj"]),
                                             (tiny_gpt2, "all-linear")])
def test_matched_ranks_within_ten_percent(factory, targets):
    model = factory()
    rows = ["lora", "dora", "lorada", "hylorada", "peft-lora", "peft-dora"]
    ranks = matched_ranks(model, rows, target_rank=8, targets=targets)
    ref = trainable_count(model, "lora", 8, targets)
    counts = {m: trainable_count(model, m, ranks[m], targets) for m in rows}
    print({m: (ranks[m], counts[m]) for m in rows})
    assert ranks["lora"] == 8 and ranks["peft-lora"] == 8
    for m, n in counts.items():
        assert abs(n - ref) <= 0.10 * ref, (m, n, ref)
        # no other rank is closer to LoRA's count
        for r in range(1, 17):
            assert abs(trainable_count(model, m, r, targets) - ref) >= abs(n - ref)


def test_matched_ranks_refuses_an_unreachable_budget():
    with pytest.raises(ValueError, match="cannot get within 10%"):
        matched_ranks(tiny_llama(), ["dora"], target_rank=1)


def _wrap(row: str, rank: int, model=None, targets="all-linear", seed=0):
    spec = {"row": row, "method": base_method(row), "rank": rank, "alpha_ratio": 2.0, "dropout": 0.0,
            "targets": targets, "seed": seed,
            "ablation": {k: v for k, v in ABLATIONS.get(row, {}).items() if k != "desc"}}
    runner = CellRunner(BenchConfig())
    return runner.wrap(model if model is not None else tiny_llama(), spec)


@pytest.mark.parametrize("row", ["lora", "dora", "lorada", "hylorada", "peft-lora", "peft-dora", *ABLATIONS])
def test_counted_budget_equals_the_wrapped_model(row):
    pytest.importorskip("peft")
    model = tiny_llama()
    expected = trainable_count(model, row, 4, "all-linear")
    wrapped = _wrap(row, 4, model)
    assert sum(p.numel() for p in wrapped.trainable_parameters()) == expected


def test_ablations_change_only_what_they_say():
    torch.manual_seed(0)
    full = _wrap("hylorada", 4)
    scaled = _wrap("hylorada-orth-scaled", 4)
    kaiming = _wrap("hylorada-kaiming", 4)
    for (_, a), (_, b), (_, k) in zip(full.adapter_layers(), scaled.adapter_layers(), kaiming.adapter_layers()):
        assert torch.allclose(a.lora_A.norm(dim=1), torch.ones(4), atol=1e-5)  # orthogonal rows, norm 1
        assert torch.allclose(b.lora_A.norm(dim=1), torch.full((4,), KAIMING_ROW_NORM), atol=1e-5)
        assert torch.allclose(b.lora_A, a.lora_A * KAIMING_ROW_NORM)  # same seed: same direction
        assert k.lora_A.abs().max() <= 1 / math.sqrt(k.in_features) + 1e-6  # kaiming-uniform bound
    gate = _wrap("hylorada-gate-frozen", 4)
    blend = _wrap("hylorada-blend-frozen", 4)
    for (_, g), (_, b) in zip(gate.adapter_layers(), blend.adapter_layers()):
        assert not g.gate.requires_grad and g.residual.requires_grad
        assert b.gate.requires_grad and not b.residual.requires_grad
    assert gate.adapter_config.extra == {"ablation": "hylorada-gate-frozen"}
    dora_orth = _wrap("dora-orthogonal", 4)
    assert dora_orth.adapter_config.method == "dora"
    assert dora_orth.adapter_config.init_lora_weights == "orthogonal"


def test_frozen_gate_stays_at_its_init_through_training():
    from hylorada.train import TrainConfig, train

    wrapped = _wrap("hylorada-gate-frozen", 4)
    g0 = {n: l.gate.detach().clone() for n, l in wrapped.adapter_layers()}
    ids = torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(0))
    blocks = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    train(wrapped, blocks, None, TrainConfig(steps=2, batch_size=2, lr=1e-2, progress=False, log_every=0))
    for n, layer in wrapped.adapter_layers():
        assert torch.equal(layer.gate.detach(), g0[n])
        assert not torch.equal(layer.lora_B.detach(), torch.zeros_like(layer.lora_B))


# ---------------------------------------------------------------------------------- cells
def test_plan_cell_ids_and_keys():
    cfg = BenchConfig(seeds=2, methods=["lora"], ablations=[], peft=False, ratios=[0.2, 0.4])
    budget = bm.budget_table(tiny_llama(), ["lora"], 8)
    ids = [c.id for c in plan_cells(cfg, budget, ["lora"])]
    assert ids == ["base", "adapt-lora-s0", "adapt-lora-s1", "frontier-svd-0.2", "frontier-svd-0.2-rec",
                   "frontier-whiten-0.2", "frontier-whiten-0.2-rec", "frontier-svd-0.4", "frontier-svd-0.4-rec",
                   "frontier-whiten-0.4", "frontier-whiten-0.4-rec"]
    assert [c.id for c in bm.select_cells(plan_cells(cfg, budget, ["lora"]), ["frontier-*-rec"])] == [
        "frontier-svd-0.2-rec", "frontier-whiten-0.2-rec", "frontier-svd-0.4-rec", "frontier-whiten-0.4-rec"]
    # a setting that changes a result changes the key of exactly the cells it affects
    cells1 = {c.id: c.key for c in plan_cells(cfg, budget, ["lora"])}
    cfg.train.steps += 1
    cells2 = {c.id: c.key for c in plan_cells(cfg, budget, ["lora"])}
    changed = sorted(i for i in cells1 if cells1[i] != cells2[i])
    assert changed == sorted(i for i in cells1 if i.startswith("adapt-") or i.endswith("-rec"))


def _fake_result(cell: Cell) -> dict:
    h = int(cell.key[:6], 16) % 1000 / 1000
    r = {"test_ppl": 10 + h, "lim_ppl": 11 + h, "test_tokens": 100, "lim_bucket_ppl": [10 + h] * 10,
         "size_mb": 1.0, "n_params": 1000}
    if cell.kind == "adapt":
        r.update(trainable_params=123, seed=cell.spec["seed"], train_time_s=1.0, tokens_per_s=100.0,
                 peak_mem_mb=5.0, last_loss=2.0, row=cell.spec["row"], method=cell.spec["method"],
                 rank=cell.spec["rank"])
    if cell.kind == "frontier":
        r.update(compress_method=cell.spec["compress_method"], ratio=cell.spec["ratio"],
                 recovery=cell.spec["recovery"], target_ratio=cell.spec["ratio"], model_ratio=cell.spec["ratio"] / 2,
                 recovery_method=cell.spec.get("recovery_method"), size_mb=1 - cell.spec["ratio"] / 2)
    return r


class CountingRunner:
    def __init__(self):
        self.calls: list[str] = []

    def __call__(self, cell: Cell) -> dict:
        self.calls.append(cell.id)
        return _fake_result(cell)


def test_resume_skips_finished_cells_and_only_runs_a_subset(tmp_path):
    cfg = BenchConfig(model="unused", seeds=2, methods=["lora", "hylorada"], ablations=["dora-orthogonal"],
                      peft=False, ratios=[0.2])
    kw = dict(budget_model=tiny_llama(), with_peft=False, progress=False, plots=False)
    out = tmp_path / "bench"
    first = CountingRunner()
    res = run_benchmark(cfg, out, only=["base", "adapt-*-s0"], cell_runner=first, **kw)
    assert first.calls == ["base", "adapt-lora-s0", "adapt-hylorada-s0", "adapt-dora-orthogonal-s0"]
    assert len(res["pending"]) == res["n_cells"] - 4
    assert "Incomplete" in (out / "results.md").read_text()

    second = CountingRunner()
    res = run_benchmark(cfg, out, cell_runner=second, **kw)  # the rest
    assert second.calls and not set(second.calls) & set(first.calls)
    assert res["pending"] == []

    lora = next(e for e in res["adaptation"] if e["row"] == "lora")
    vals = [res["cells"][f"adapt-lora-s{s}"]["result"]["test_ppl"] for s in (0, 1)]
    assert lora["n_seeds"] == 2 and lora["test_ppl_mean"] == pytest.approx(sum(vals) / 2)
    assert lora["test_ppl_std"] == pytest.approx(abs(vals[0] - vals[1]) / math.sqrt(2))  # sample std
    assert isinstance(res["verdict"]["exceeds_spread"], bool)

    third = CountingRunner()
    res2 = run_benchmark(cfg, out, cell_runner=third, **kw)  # everything is done: nothing is computed
    assert third.calls == []
    assert res2["cells"].keys() == res["cells"].keys()

    # a lost cell file is recomputed, alone
    (out / "cells" / "adapt-lora-s1.json").unlink()
    fourth = CountingRunner()
    run_benchmark(cfg, out, cell_runner=fourth, **kw)
    assert fourth.calls == ["adapt-lora-s1"]

    # another step count invalidates the training cells only
    cfg.train.steps += 1
    fifth = CountingRunner()
    run_benchmark(cfg, out, cell_runner=fifth, **kw)
    assert sorted(fifth.calls) == sorted(c for c in res["cells"] if c.startswith("adapt-") or c.endswith("-rec"))

    # report-only computes nothing and keeps the numbers
    sixth = CountingRunner()
    res3 = run_benchmark(cfg, out, cell_runner=sixth, report_only=True, **kw)
    assert sixth.calls == [] and res3["pending"] == []


def test_runs_merge_by_copying_cells(tmp_path):
    cfg = BenchConfig(model="unused", methods=["lora"], ablations=[], peft=False, ratios=[0.2])
    kw = dict(budget_model=tiny_llama(), with_peft=False, progress=False, plots=False)
    run_benchmark(cfg, tmp_path / "a", only=["adapt-*", "base"], cell_runner=CountingRunner(), **kw)
    run_benchmark(cfg, tmp_path / "b", only=["frontier-*"], cell_runner=CountingRunner(), **kw)
    for f in (tmp_path / "b" / "cells").glob("*.json"):
        (tmp_path / "a" / "cells" / f.name).write_bytes(f.read_bytes())
    runner = CountingRunner()
    res = run_benchmark(cfg, tmp_path / "a", report_only=True, cell_runner=runner, **kw)
    assert runner.calls == [] and res["pending"] == [] and len(res["frontier"]) == 5


# ---------------------------------------------------------------------------------- a real tiny run
def test_real_tiny_run_results_schema(tiny_assets, tmp_path):
    pytest.importorskip("peft")
    model, data = tiny_assets
    cfg = tiny_config(model, data, seeds=1)
    out = tmp_path / "bench"
    res = run_benchmark(cfg, out, progress=False, command="hylorada benchmark (test)")
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(res))
    for key, typ in [("schema_version", int), ("preset", str), ("config", dict), ("environment", dict),
                     ("budget", dict), ("n_cells", int), ("cells", dict), ("pending", list),
                     ("adaptation", list), ("frontier", list)]:
        assert isinstance(on_disk[key], typ), key
    env = on_disk["environment"]
    for key in ("versions", "device", "device_name", "git_commit", "date"):
        assert key in env
    assert env["versions"]["torch"] == torch.__version__
    assert on_disk["commands"] == ["hylorada benchmark (test)"] and len(on_disk["cell_dates"]) == 2
    assert on_disk["cell_versions"] == [env["versions"]]
    for rec in on_disk["cells"].values():  # every cell records where, when and how it was made
        for key in ("date", "device", "device_name", "git_commit", "command", "versions", "seconds"):
            assert key in rec, key
    assert on_disk["pending"] == [] and on_disk["n_cells"] == len(on_disk["cells"]) == 1 + 5 + 4
    rows = {e["row"]: e for e in on_disk["adaptation"]}
    assert list(rows) == ["base", "lora", "hylorada", "peft-lora", "peft-dora", "hylorada-gate-frozen"]
    for name, e in rows.items():
        assert isinstance(e["test_ppl_mean"], float) and math.isfinite(e["test_ppl_mean"])
        assert isinstance(e["lim_ppl_mean"], float)
        if name != "base":
            assert e["n_seeds"] == 1 and e["test_ppl_std"] is None  # no spread from one seed
            assert isinstance(e["trainable_params"], int) and e["trainable_params"] > 0
            assert e["tokens_per_s_mean"] > 0 and e["train_time_s_mean"] > 0
            assert e["peak_mem_mb_mean"] is None or e["peak_mem_mb_mean"] >= 0
            assert len(e["lim_bucket_ppl"]) == cfg.lim_buckets
            assert abs(e["trainable_params"] - rows["lora"]["trainable_params"]) <= 0.1 * rows["lora"]["trainable_params"]
    # training changed the model: the fine-tuned rows differ from the base
    assert rows["lora"]["test_ppl_mean"] != rows["base"]["test_ppl_mean"]
    fr = on_disk["frontier"]
    assert [f["cell"] for f in fr] == ["base", "frontier-svd-0.4", "frontier-svd-0.4-rec", "frontier-whiten-0.4",
                                       "frontier-whiten-0.4-rec"]
    for f in fr[1:]:
        assert f["size_mb"] < fr[0]["size_mb"] and 0.3 < f["target_ratio"] < 0.5
        assert isinstance(f["test_ppl"], (float, str))
    assert fr[2]["size_mb"] == pytest.approx(fr[1]["size_mb"])  # recovery merged into the factors: same size
    cell = on_disk["cells"]["adapt-hylorada-s0"]
    assert cell["spec"]["rank"] == on_disk["budget"]["rows"]["hylorada"]["rank"] and cell["result"]["seed"] == 0
    assert on_disk["verdict"]["n_seeds"] == 1 and on_disk["verdict"]["exceeds_spread"] is None
    md = (out / "results.md").read_text()
    assert "## Adaptation" in md and "## Size / quality frontier" in md and "CANNOT rank" in md
    assert "## Ablations of HyLoRADA" in md and "## Verdict" in md and "cannot be told apart" in md
    assert (out / "methods.png").stat().st_size > 1000 and (out / "frontier.png").stat().st_size > 1000
    assert len(list((out / "cells").glob("*.json"))) == on_disk["n_cells"]


def test_cli_list_and_report_only(tiny_assets, tmp_path, capsys):
    from hylorada.cli import main

    model, data = tiny_assets
    out = tmp_path / "cli"
    assert main(["benchmark", "--model", model, "--data", data, "--out", str(out), "--list", "--no-peft"]) == 0
    listed = capsys.readouterr().out.split()
    assert "base" in listed and "adapt-hylorada-s0" in listed and "frontier-whiten-0.2-rec" in listed
    assert "adapt-peft-lora-s0" not in listed
    assert main(["benchmark", "--model", model, "--data", data, "--out", str(out), "--report-only",
                 "--no-progress", "--no-peft"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["cells"] == {} and len(res["pending"]) == res["n_cells"]


def test_presets_are_valid_and_sized():
    quick, full = bm.make_config("cpu-quick"), bm.make_config("full")
    assert quick.seeds == 1 and quick.device == "cpu" and quick.caveat
    assert full.seeds >= 3 and full.train.steps >= 200 and full.ratios == [0.2, 0.4, 0.6]
    assert set(full.ablations) == set(ABLATIONS)
    with pytest.raises(ValueError, match="unknown preset"):
        bm.make_config("huge")
    with pytest.raises(ValueError, match="ratios"):
        bm.make_config("cpu-quick", ratios=[1.5])


def test_calibration_is_the_first_train_blocks(tiny_assets):
    """The benchmark's whitening calibration (hylorada/data/blocks.py calibration_blocks, seed None) is
    the first n blocks the training rows see (data.py pack_blocks), as in the published runs."""
    model, data = tiny_assets
    runner = CellRunner(tiny_config(model, data))
    calib = runner.calibration(data, 5, 16)
    assert torch.equal(calib, runner.train_blocks(data, 16)["input_ids"][:5])
