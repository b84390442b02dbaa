"""`hylorada benchmark`: the adaptation table and the size/quality frontier, from one command.

Two groups of *cells* (each cell is one measured thing, stored on its own):

- adaptation (`adapt-<row>-s<seed>`): the base model fine-tuned on the train split of `data`
  with the same steps, schedule, batch, tokens and seed for every row, then scored on the test
  split (perplexity and LiM perplexity). Rows: our lora, dora, lorada, hylorada; peft's LoRA and
  DoRA (`peft-lora`, `peft-dora`, when peft is installed); and ablations of HyLoRADA
  (`ABLATIONS`). Every row gets the rank that brings its trainable-parameter count closest to
  LoRA's at `target_rank` (budget.py `matched_ranks`, within 10%); alpha = alpha_ratio x rank,
  so every row has the same scale s = alpha / r.
- frontier (`base`, `frontier-<svd|whiten>-<ratio>[-rec]`): the dense model, then the model
  compressed at each ratio with plain or whitened SVD, without and with recovery fine-tuning
  (`hylorada.recipes.compress.recover_compressed`: adapters on the factors, merged back, rank
  kept): size vs test perplexity.

The modules, in the order a run uses them: config.py (BenchConfig, presets, checks) -> budget.py
(matched ranks) -> cells.py (the plan, cell keys and files) -> runner.py (CellRunner,
run_benchmark) -> report.py (results.json, results.md) and plots.py. Runs made elsewhere merge by
copying their `cells/*.json` into one out dir and running again with `report_only=True`
(`--report-only`).
"""
from .budget import budget_table, compute_budget, matched_ranks, trainable_count
from .cells import Cell, adaptation_rows, plan_cells, select_cells
from .config import (ABLATIONS, CPU_QUICK_CAVEAT, DEFAULT_PRESET, KAIMING_ROW_NORM, METHODS, PEFT_ROWS, PRESETS,
                     BenchConfig, make_config, validate_config)
from .plots import FRONTIER_CLIP, frontier_points, render_plots
from .report import render_markdown, write_report
from .runner import CellRunner, list_cells, run_benchmark

__all__ = ["ABLATIONS", "CPU_QUICK_CAVEAT", "DEFAULT_PRESET", "FRONTIER_CLIP", "KAIMING_ROW_NORM", "METHODS",
           "PEFT_ROWS", "PRESETS", "BenchConfig", "Cell", "CellRunner", "adaptation_rows", "budget_table",
           "compute_budget", "frontier_points", "list_cells", "make_config", "matched_ranks", "plan_cells",
           "render_markdown", "render_plots", "run_benchmark", "select_cells", "trainable_count",
           "validate_config", "write_report"]
