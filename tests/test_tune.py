"""hylorada tune: Optuna trials of a tiny model on SQLite storage, one worker and two concurrent ones."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest


pytestmark = pytest.mark.usefixtures("one_thread")

optuna = pytest.importorskip("optuna")


def tune_args(model: str, data: str, out: Path, storage: str, n_trials: int, *extra: str) -> list[str]:
    return ["tune", "--method", "hylorada", "--model", model, "--data", data, "--n-trials", str(n_trials),
            "--steps", "4", "--batch-size", "2", "--seq-len", "16", "--eval-every", "2", "--valid-blocks", "4",
            "--storage", storage, "--study", "tiny", "--out", str(out), "--threads", "1", *extra]


def test_tune_command_runs_three_trials_on_sqlite(tiny_assets, tmp_path, capsys):
    from hylorada.cli import main

    model, data = tiny_assets
    out = tmp_path / "tune"
    storage = f"sqlite:///{out / 'study.db'}"
    assert main(tune_args(model, data, out, storage, 3, "--no-progress")) == 0
    study = optuna.load_study(study_name="tiny", storage=storage)
    trials = study.get_trials()
    assert [t.number for t in trials] == [0, 1, 2]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    for t in trials:
        assert set(t.params) == {"lora_rank", "alpha_ratio", "lora_plus_ratio", "lr", "lora_dropout",
                                 "gate_init", "residual_init"}
        assert sorted(t.intermediate_values) == [2, 4]  # the valid loss, reported for the pruner
        assert t.value == pytest.approx(t.intermediate_values[4])
        assert t.params["lora_rank"] <= 16  # tiny Llama: k/v projections are 32 -> 16
    best = json.loads((out / "best_config.json").read_text())
    assert best["trial"] == study.best_trial.number and best["valid_loss"] == pytest.approx(study.best_value)
    from hylorada.config import HyLoRADAConfig

    cfg = HyLoRADAConfig.from_dict(best["adapter_config"])  # a valid adapter config
    assert cfg.method == "hylorada" and cfg.lora_rank == study.best_params["lora_rank"]
    # the finetune flags parse with the finetune command
    from hylorada.cli import build_parser

    ns = build_parser().parse_args(["finetune", *best["finetune_args"], "--out", str(tmp_path / "ft")])
    assert ns.rank == cfg.lora_rank and ns.lr == pytest.approx(study.best_params["lr"], rel=1e-5)
    printed = capsys.readouterr().out
    assert "best trial" in printed and "hylorada finetune" in printed

    # a second call adds trials to the same study (load_if_exists)
    assert main(tune_args(model, data, out, storage, 1, "--no-progress")) == 0
    assert len(optuna.load_study(study_name="tiny", storage=storage).trials) == 4


def test_two_concurrent_workers_share_one_study(tiny_assets, tmp_path):
    model, data = tiny_assets
    out = tmp_path / "tune"
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "hylorada.cli"]
    procs = [subprocess.Popen(cmd + tune_args(model, data, out / f"w{i}", storage, n, "--no-progress"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for i, n in enumerate((3, 2))]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (so, se) in zip(procs, outs):
        assert p.returncode == 0, se[-3000:]
    ran = []
    for so, _ in outs:
        m = re.search(r"this worker ran trials \[([\d, ]*)\]", so)
        assert m, so
        ran.append([int(x) for x in m.group(1).split(",") if x.strip()])
    assert [len(r) for r in ran] == [3, 2]
    assert not set(ran[0]) & set(ran[1])  # no trial run twice
    trials = optuna.load_study(study_name="tiny", storage=storage).get_trials()
    numbers = [t.number for t in trials]
    assert sorted(numbers) == list(range(5)) == sorted(ran[0] + ran[1])  # none lost, none duplicated
    assert all(t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED) for t in trials)


def test_pruner_stops_a_bad_trial(tiny_assets, tmp_path):
    """With enough finished trials, a trial whose first valid loss is worse than the median is pruned."""
    from hylorada.recipes.tune import TuneSettings, open_study, run_tune

    model, data = tiny_assets
    storage = f"sqlite:///{tmp_path / 'p.db'}"
    settings = TuneSettings(model=model, data=data, steps=4, batch_size=2, seq_len=16, eval_every=2, valid_blocks=4)
    # three good trials by hand, then one with a diverging learning rate
    study, _ = open_study(storage, "p", 0, 0, n_startup_trials=2, n_warmup_steps=0)
    for v in (1.0, 1.1, 1.2):
        study.enqueue_trial({"lora_rank": 4, "alpha_ratio": 2.0, "lora_plus_ratio": 1.0, "lr": 1e-3,
                             "lora_dropout": 0.0, "gate_init": 0.0, "residual_init": 0.0})
    study.enqueue_trial({"lora_rank": 16, "alpha_ratio": 4.0, "lora_plus_ratio": 32.0, "lr": 3e-3,
                         "lora_dropout": 0.2, "gate_init": 3.0, "residual_init": -3.0})
    res = run_tune(settings, n_trials=4, storage=storage, study_name="p", out_dir=tmp_path / "o",
                   n_startup_trials=2, progress=False)
    assert res.n_trials_total == 4 and res.trial_numbers == [0, 1, 2, 3]
    trials = optuna.load_study(study_name="p", storage=storage).get_trials()
    assert all(2 in t.intermediate_values for t in trials)
    # the three equal trials complete with the same value (same seed, same data)
    vals = [t.value for t in trials[:3]]
    assert vals[0] == pytest.approx(vals[1]) == pytest.approx(vals[2])
    last = trials[3]  # its first valid loss is worse than the median of the three: stopped there
    assert last.intermediate_values[2] > vals[0]
    assert last.state == optuna.trial.TrialState.PRUNED and 4 not in last.intermediate_values
