"""Worker for test_distributed_cli.py's benchmark test: `run_benchmark` on the tiny config of
tests/test_benchmark.py, as a user calls it (progress on: the budget table is printed), under any
launcher.

Usage: [torchrun --nproc_per_node=2] tests/dist_bench_worker.py MODEL_DIR DATA OUT_DIR [DEVICE]
"""
from __future__ import annotations

import sys

from test_benchmark import tiny_config

from hylorada.recipes.benchmark import run_benchmark

if __name__ == "__main__":
    model, data, out = sys.argv[1:4]
    cfg = tiny_config(model, data, seeds=1, peft=False, ablations=[], methods=["hylorada"], dropout=0.0,
                      device=sys.argv[4] if len(sys.argv) > 4 else "cpu", compile="no")
    run_benchmark(cfg, out, only=["base", "adapt-hylorada-s0", "frontier-whiten-0.4-rec"], progress=True,
                  with_peft=False, plots=False)
