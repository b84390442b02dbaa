"""The cells of a run: what each measures (its spec), its id and key, and its file.

A cell's key is a hash of its spec (everything that determines its result): a stored cell whose
key matches is never recomputed, a changed setting changes exactly the keys of the cells it
affects. The specs must stay as they are for the stored cells under docs/benchmark-*/ to match.
"""
from __future__ import annotations

import fnmatch
import hashlib
import importlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import ABLATIONS, PEFT_ROWS, TRAIN_FIELDS, BenchConfig, base_method

log = logging.getLogger(__name__)


@dataclass
class Cell:
    id: str
    kind: str  # "base" | "adapt" | "frontier"
    spec: dict[str, Any]

    @property
    def key(self) -> str:
        """A hash of everything that determines this cell's result."""
        text = json.dumps(self.spec, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:20]


def peft_available() -> bool:
    try:
        importlib.import_module("peft")
    except ImportError:
        return False
    return True


def adaptation_rows(cfg: BenchConfig, with_peft: bool | None = None) -> list[str]:
    """The methods, then peft's rows (when asked for and installed), then the ablations."""
    with_peft = (cfg.peft and peft_available()) if with_peft is None else with_peft
    rows = list(cfg.methods)
    if with_peft:
        rows += list(PEFT_ROWS)
    rows += list(cfg.ablations)
    return rows


def _common_spec(cfg: BenchConfig) -> dict[str, Any]:
    """What every cell's result depends on: model, data and evaluation."""
    common = dict(model=cfg.model, dtype=cfg.dtype, data=cfg.data, eval_seq_len=cfg.eval_seq_len,
                  eval_max_tokens=cfg.eval_max_tokens, lim_buckets=cfg.lim_buckets)
    if cfg.window_prefix != "auto":  # "auto" keeps the keys (and stored cells) of runs before the option
        common["window_prefix"] = cfg.window_prefix
    if cfg.sample_prompt:  # likewise: no sample, the keys of runs before the option
        common["sample"] = dict(prompt=cfg.sample_prompt, max_new_tokens=cfg.sample_tokens, chat=cfg.sample_chat)
    return common


def _train_spec(cfg: BenchConfig) -> dict[str, Any]:
    """What a fine-tuning depends on: the TRAIN_FIELDS, the block length, dropout and alpha / r."""
    return {**{k: getattr(cfg.train, k) for k in TRAIN_FIELDS}, "seq_len": cfg.seq_len,
            "dropout": cfg.dropout, "alpha_ratio": cfg.alpha_ratio}


def plan_cells(cfg: BenchConfig, budget: dict[str, Any], rows: list[str]) -> list[Cell]:
    """Every cell of the run, in run order: base, adaptation rows by seed, then the frontier."""
    common, train = _common_spec(cfg), _train_spec(cfg)
    cells = [Cell("base", "base", {"kind": "base", **common})]
    for seed in cfg.seed_list:
        for row in rows:
            spec = {"kind": "adapt", "row": row, "method": base_method(row),
                    "rank": budget["rows"][row]["rank"], "targets": cfg.targets, "seed": seed,
                    "ablation": {k: v for k, v in ABLATIONS.get(row, {}).items() if k != "desc"},
                    **common, **train}
            cells.append(Cell(f"adapt-{row}-s{seed}", "adapt", spec))
    for ratio in cfg.ratios:
        for method in cfg.compress_methods:
            cells += _frontier_cells(cfg, method, float(ratio), common, train)
    return cells


def _frontier_cells(cfg: BenchConfig, method: str, ratio: float, common: dict[str, Any],
                    train: dict[str, Any]) -> list[Cell]:
    """frontier-<method>-<ratio> and, with recovery, frontier-<method>-<ratio>-rec."""
    comp = dict(compress_method=method, ratio=ratio, svd_solver=cfg.svd_solver)
    if method == "whiten":
        comp.update(calib_data=cfg.data, calib_blocks=cfg.calib_blocks, calib_seq_len=cfg.calib_seq_len)
    cells = []
    for rec in cfg.recovery:
        spec = {"kind": "frontier", "recovery": bool(rec), **comp, **common}
        cid = f"frontier-{method}-{ratio:g}"
        if rec:
            spec.update(recovery_method=cfg.recovery_method, recovery_rank=cfg.recovery_rank, seed=0, **train)
            cid += "-rec"
        cells.append(Cell(cid, "frontier", spec))
    return cells


def select_cells(cells: list[Cell], only: list[str] | None) -> list[Cell]:
    """Cells whose id matches any of the glob patterns in `only` (all cells when None/empty)."""
    if not only:
        return list(cells)
    chosen = [c for c in cells if any(fnmatch.fnmatchcase(c.id, pat) for pat in only)]
    for pat in only:
        if not any(fnmatch.fnmatchcase(c.id, pat) for c in cells):
            log.warning("--only %r matches no cell; cell ids: %s", pat, ", ".join(c.id for c in cells))
    return chosen


def cell_path(out_dir: Path, cell: Cell) -> Path:
    return out_dir / "cells" / f"{cell.id}.json"


def load_cell(out_dir: Path, cell: Cell) -> dict[str, Any] | None:
    """The stored result of `cell` if it exists and was computed for the same spec (key)."""
    path = cell_path(out_dir, cell)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        log.warning("ignoring unreadable cell file %s", path)
        return None
    if data.get("key") != cell.key:
        return None
    return data


def num(x: Any) -> float | None:
    """A JSON value back to a float ("inf" strings included); None stays None."""
    return None if x is None else float(x)
