"""CPU smoke run of benchmarks/gpu_speed.py (--smoke: the tiny shape, aot_eager compilation):
every part's code path runs, the rows' checks hold, and --append resumes into one JSON."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIRST = ("frozen/eager,train/eager/0.05/dora,train/compiled/0.05/hylorada,train/eager/0/peft-lora,"
         "compressed/svd40,decode/eager/svd40/b1,decode/compiled/svd40/b2")


def _run(out: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_speed.py"), "--smoke",
                           "--device", "cpu", "--out", str(out), *flags],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)


def test_gpu_speed_smoke_rows_checks_and_resume(tmp_path):
    out = tmp_path / "perf.json"
    first = _run(out, "--rows", FIRST)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    data = json.loads(out.read_text())
    rows = {r["id"]: r for r in data["rows"]}
    assert set(rows) == set(FIRST.split(","))
    assert not [r for r in rows.values() if "error" in r]
    assert {"torch", "transformers", "peft", "device", "host_cpu"} <= set(data["runs"][0])
    for r in rows.values():
        assert r.get("ms", 1) > 0 and r.get("rel_err", 0) < 1e-5, r
    train = rows["train/eager/0.05/dora"]
    assert train["dropout_active_layers"] == 14 and train["grad_rel_err"] < 1e-5
    compiled = rows["train/compiled/0.05/hylorada"]
    assert compiled["graph_breaks"] == 0 and compiled["recompiles"] == 0 and compiled["graphs"] == 1
    decode = rows["decode/compiled/svd40/b2"]
    assert decode["decode_ms_per_token"] > 0 and decode["tokens_agree"] == 1.0 and decode["recompiles"] == 0
    assert decode["graphs"] >= 1 and rows["decode/eager/svd40/b1"]["graphs"] == 0  # compiled decode ran
    assert "| train/compiled/0.05/hylorada |" in first.stdout

    refused = _run(out, "--rows", "merge/merge()")  # an existing --out needs --append
    assert refused.returncode != 0 and "--append" in refused.stderr.strip().splitlines()[-1]

    second = _run(out, "--append", "--rows", "train/eager/0.05/dora,merge/merge()")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "train/eager/0.05/dora: already in" in second.stdout
    data = json.loads(out.read_text())
    assert len(data["runs"]) == 2
    rows2 = {r["id"]: r for r in data["rows"]}
    assert set(rows2) == set(rows) | {"merge/merge()"}
    assert rows2["train/eager/0.05/dora"] == train and rows2["merge/merge()"]["run"] == 1
    table = _run(out, "--table")
    assert table.returncode == 0 and "| merge/merge() |" in table.stdout and "run 1:" in table.stdout
