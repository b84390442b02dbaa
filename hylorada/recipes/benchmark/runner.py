"""Running the cells: `CellRunner` computes one cell (base, adaptation row, frontier point);
`run_benchmark` plans the run, skips the stored cells, runs the others and rebuilds the report.

Resume: a finished cell is written atomically to `<out>/cells/<cell id>.json` with its key; a
rerun skips every cell whose file has the current key, and `only` (glob patterns on cell ids)
runs a subset. After every invocation results.json, results.md and the plots are rebuilt from
all the stored cells of the current plan (report.py); cells still missing are listed as pending.
Launched on N processes, every process computes every cell (its trainings with DDP, a share of
each batch per process) and only the main one writes and prints (hylorada/utils/processes.py).
"""
from __future__ import annotations

import copy
import gc
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ...evaluate import jsonable
from ...utils.env import environment, now
from ...utils.io import atomic_write_text, claim_work_dir
from ...utils.processes import is_main_process, process_device
from ...utils.memory import PeakMemory
from .budget import compute_budget, print_budget
from .cells import Cell, adaptation_rows, cell_path, load_cell, num, plan_cells, select_cells
from .config import PEFT_ROWS, TRAIN_FIELDS, BenchConfig, validate_config
from .report import fmt, write_report

log = logging.getLogger(__name__)


class CellRunner:
    """Runs cells in one process, caching the tokenizer, token ids and the last compressed model."""

    def __init__(self, cfg: BenchConfig, progress: bool = True) -> None:
        self.cfg = cfg
        self.progress = progress
        self.device = torch.device(process_device(cfg.device))
        self._tokenizer = None
        self._cache: dict[Any, Any] = {}

    # ---- model and data ----------------------------------------------------------------------
    def load(self) -> nn.Module:
        """A fresh copy of the base model on the device (loaded from disk once per process)."""
        if "pristine" not in self._cache:
            from ...loading import load_model

            model, tok = load_model(self.cfg.model, dtype=self.cfg.dtype, device="cpu")
            self._tokenizer = self._tokenizer or tok
            self._cache["pristine"] = model
        model = copy.deepcopy(self._cache["pristine"]).to(self.device)
        return model.eval()

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            from ...loading import MODEL_ALIASES, converted_folder

            name = self.cfg.model
            folder = converted_folder(name) if name in MODEL_ALIASES else name
            self._tokenizer = AutoTokenizer.from_pretrained(folder)
        return self._tokenizer

    @property
    def window_prefix(self) -> str:
        """The resolved window prefix ("bos" or "none") of cfg.window_prefix for this tokenizer."""
        from ...data import resolve_window_prefix

        return resolve_window_prefix(self.tokenizer, self.cfg.window_prefix)

    def _bos_id(self) -> int | None:
        return self.tokenizer.bos_token_id if self.window_prefix == "bos" else None

    def train_blocks(self, data: str, seq_len: int) -> dict[str, torch.Tensor]:
        """The train split as consecutive blocks (hylorada/data/blocks.py training_blocks), cached."""
        key = ("train", data, seq_len)
        if key not in self._cache:
            from ...data import training_blocks

            self._cache[key] = training_blocks(self.tokenizer, data, "train", seq_len, bos_id=self._bos_id())[0]
        return self._cache[key]

    def calibration(self, data: str, n_blocks: int, seq_len: int) -> torch.Tensor:
        """The first n_blocks windows of seq_len tokens of the train split (fixed, no sampling):
        the CLI's calibration sampler (hylorada/data/blocks.py calibration_blocks) with seed None."""
        from ...data import calibration_blocks

        return calibration_blocks(self.tokenizer, data, n_blocks, seq_len, seed=None,
                                  window_prefix=self.cfg.window_prefix)

    def test_ids(self, data: str, max_tokens: int | None) -> torch.Tensor:
        key = ("test", data, max_tokens)
        if key not in self._cache:
            from ...data import eval_ids, load_corpus

            ids = eval_ids(self.tokenizer, load_corpus(data, "test"))
            self._cache[key] = ids[:, :max_tokens] if max_tokens else ids
        return self._cache[key]

    # ---- pieces -------------------------------------------------------------------------------
    def evaluate(self, model: nn.Module, spec: dict[str, Any]) -> dict[str, Any]:
        """Test perplexity and LiM perplexity (hylorada/evaluate.py) and the sample, if any."""
        from ...evaluate import lim_perplexity

        ids = self.test_ids(spec["data"], spec["eval_max_tokens"])
        res = lim_perplexity(model, ids, spec["eval_seq_len"], n_buckets=spec["lim_buckets"],
                             batch_size=self.cfg.eval_batch_size, device=self.device, progress=False,
                             bos_id=self._bos_id())
        out = {"window_prefix": res.window_prefix, "test_ppl": res.ppl, "test_nll": res.nll, "lim_ppl": res.lim_ppl,
               "test_tokens": res.n_tokens, "lim_bucket_ppl": res.bucket_ppl,
               "lim_bucket_tokens": res.bucket_tokens, "eval_seconds": res.seconds}
        if spec.get("sample"):
            out.update(self.sample(model, spec["sample"]))
        return out

    def sample(self, model: nn.Module, sample: dict[str, Any]) -> dict[str, Any]:
        """The greedy continuation of the sample prompt (hylorada.recipes.generate.generate)."""
        from ..generate import GenerationSettings, generate

        t0 = time.perf_counter()
        text = generate(getattr(model, "peft_model", model), self.tokenizer, sample["prompt"],
                        GenerationSettings(max_new_tokens=sample["max_new_tokens"]), chat=sample["chat"])
        return {"sample_text": text, "sample_seconds": time.perf_counter() - t0}

    def train_config(self, spec: dict[str, Any], seed: int):
        """The TrainConfig of a cell: its TRAIN_FIELDS, `seed`, no evaluation, no log lines."""
        from ...train import TrainConfig

        return TrainConfig(**{k: spec[k] for k in TRAIN_FIELDS}, seed=seed, eval_every=0, log_every=0,
                           progress=self.progress)

    def wrap(self, model: nn.Module, spec: dict[str, Any]) -> nn.Module:
        """The adapter of an adaptation row on `model` (seeded), ablations applied."""
        from ...config import HyLoRADAConfig
        from ...model import HyLoRADAModel

        row, rank = spec["row"], spec["rank"]
        alpha = spec["alpha_ratio"] * rank
        torch.manual_seed(spec["seed"])
        if row in PEFT_ROWS:
            from .peft_rows import peft_row

            return peft_row(model, row, rank, alpha, spec["dropout"], spec["targets"])
        abl = spec.get("ablation") or {}
        kwargs = dict(method=spec["method"], lora_rank=rank, lora_alpha=alpha, lora_dropout=spec["dropout"],
                      target_modules=spec["targets"])
        if "init" in abl:
            kwargs["init_lora_weights"] = abl["init"]
        if abl:
            kwargs["extra"] = {"ablation": row}
        wrapped = HyLoRADAModel(model, HyLoRADAConfig(**kwargs))
        _apply_ablation(wrapped, abl)
        return wrapped

    # ---- cells --------------------------------------------------------------------------------
    def __call__(self, cell: Cell) -> dict[str, Any]:
        fn = {"base": self.run_base, "adapt": self.run_adapt, "frontier": self.run_frontier}[cell.kind]
        t0 = time.perf_counter()
        out = fn(cell.spec)
        out["seconds"] = time.perf_counter() - t0
        return out

    def run_base(self, spec: dict[str, Any]) -> dict[str, Any]:
        model = self.load()
        out = {**_size(model), **self.evaluate(model, spec)}
        del model
        return out

    def run_adapt(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Fine-tune one row on the train blocks, then score it."""
        from ...train import train

        model = self.load()
        wrapped = self.wrap(model, spec)
        n_trainable = sum(p.numel() for p in wrapped.trainable_parameters())
        blocks = self.train_blocks(spec["data"], spec["seq_len"])
        with PeakMemory(self.device) as mem:
            result = train(wrapped, blocks, None, self.train_config(spec, spec["seed"]))
        wrapped.eval()
        losses = result.losses
        out = {"row": spec["row"], "method": spec["method"], "rank": spec["rank"], "seed": spec["seed"],
               "trainable_params": n_trainable, "train_time_s": result.train_time_s,
               "train_wall_s": result.wall_time_s, "tokens_per_s": result.mean_tokens_per_s,
               "tokens_seen": result.tokens_seen, "first_loss": losses[0] if losses else None,
               "last_loss": losses[-1] if losses else None, "losses": losses,
               "mixed_precision": result.mixed_precision,
               "peak_mem_mb": mem.mb, "peak_mem_kind": mem.kind, **self.evaluate(wrapped, spec)}
        del wrapped, model
        return out

    def run_frontier(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Compress (cached per spec), recover when asked, then measure size and score."""
        model, rep = self._compressed(spec)
        out: dict[str, Any] = {"compress_method": spec["compress_method"], "ratio": spec["ratio"],
                               "recovery": spec["recovery"], **rep}
        if spec["recovery"]:
            out.update(self._recover(model, spec))
        model.eval()
        out.update(**_size(model), **self.evaluate(model, spec))
        del model
        return out

    def _compressed(self, spec: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
        """(compressed model, report dict); reuses this process's last compression of the same spec."""
        from ...compress import CompressConfig, compress_model

        key = ("compressed", spec["compress_method"], spec["ratio"], spec.get("calib_blocks"),
               spec.get("calib_seq_len"), spec["svd_solver"])
        cached = self._cache.get("compressed")
        if cached is not None and cached[0] == key:
            return copy.deepcopy(cached[1]), cached[2]
        self._cache.pop("compressed", None)
        gc.collect()
        model = self.load()
        calib = None
        # uniform ranks, fixed: the benchmark compares adapters on one compressed base whatever the
        # device (its published numbers were made with it); `hylorada compress` defaults to "auto"
        ccfg = CompressConfig(method=spec["compress_method"], ratio=spec["ratio"], svd_solver=spec["svd_solver"],
                              allocate="uniform")
        if spec["compress_method"] == "whiten":
            calib = self.calibration(spec["calib_data"], spec["calib_blocks"], spec["calib_seq_len"])
        report = compress_model(model, ccfg, calibration=calib, progress=False)
        rep = {"target_ratio": report.target_ratio, "model_ratio": report.model_ratio,
               "n_factorized": report.n_factorized, "n_dense": report.n_dense,
               "calib_tokens": report.calib_tokens, "compress_seconds": report.seconds,
               "target_params_before": report.target_params_before,
               "target_params_after": report.target_params_after, "notes": report.notes}
        self._cache["compressed"] = (key, model, rep)
        return copy.deepcopy(model), rep

    def _recover(self, model: nn.Module, spec: dict[str, Any]) -> dict[str, Any]:
        """Recovery fine-tuning of a compressed model in place (hylorada/recipes/compress.py)."""
        from ..compress import recover_compressed

        blocks = self.train_blocks(spec["data"], spec["seq_len"])
        tcfg = self.train_config(spec, spec["seed"])
        torch.manual_seed(spec["seed"])
        tc = {k: getattr(tcfg, k) for k in ("batch_size", "lr", "warmup_steps", "schedule", "min_lr_ratio",
                                             "weight_decay", "max_grad_norm", "mixed_precision", "seed",
                                             "log_every", "progress")}
        with PeakMemory(self.device) as mem:
            summary = recover_compressed(
                model, blocks, method=spec["recovery_method"], steps=spec["steps"],
                lora_rank=spec["recovery_rank"], lora_alpha=spec["alpha_ratio"] * spec["recovery_rank"],
                train_config=tc, adapter_config={"lora_dropout": spec["dropout"]})
        return dict(recovery_method=spec["recovery_method"], recovery_rank=spec["recovery_rank"],
                    recovery_steps=spec["steps"], recovery_seconds=summary["seconds"],
                    recovery_phases=summary["phases"], peak_mem_mb=mem.mb, peak_mem_kind=mem.kind)


def _apply_ablation(wrapped: nn.Module, abl: dict[str, Any]) -> None:
    """scale_A: multiply every A by it; freeze: the named adapter parameters stop training."""
    with torch.no_grad():
        for _, layer in wrapped.adapter_layers():
            if "scale_A" in abl:
                layer.lora_A.mul_(abl["scale_A"])
            for pname in abl.get("freeze", ()):
                layer.adapter_params()[pname].requires_grad_(False)


def _size(model: nn.Module) -> dict[str, Any]:
    from ...evaluate import model_size

    size = model_size(model)
    return {"size_mb": size.mb, "n_params": size.n_params, "n_bytes": size.n_bytes}


# ----------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------
def run_benchmark(cfg: BenchConfig, out_dir: str | os.PathLike | None = None, *, only: list[str] | None = None,
                  report_only: bool = False, cell_runner: Callable[[Cell], dict] | None = None,
                  progress: bool = True, command: str | None = None, with_peft: bool | None = None,
                  budget_model: nn.Module | None = None, plots: bool = True) -> dict[str, Any]:
    """Run (or resume) the benchmark into `out_dir` and rebuild its results; returns results.json's dict.

    only: glob patterns on cell ids (None: every cell). report_only: compute nothing, only rebuild
    results from the stored cells. cell_runner(cell) -> result dict (default: CellRunner(cfg)).
    plots: draw methods.png and frontier.png at the end.
    """
    validate_config(cfg)
    out = Path(out_dir) if out_dir is not None else Path("runs") / f"benchmark-{cfg.preset}"
    main = is_main_process()
    progress = progress and main
    if main:
        claim_work_dir(out, "benchmark")  # new/empty or ours; a foreign folder is refused (UsageError)
        (out / "cells").mkdir(parents=True, exist_ok=True)
    rows = adaptation_rows(cfg, with_peft)
    if cfg.peft and not any(r in rows for r in PEFT_ROWS):
        log.warning("peft is not installed: the peft reference rows are left out")
    budget = compute_budget(cfg, rows, budget_model)
    if progress:
        print_budget(budget)
    cells = plan_cells(cfg, budget, rows)
    results = {c.id: stored["result"] for c in cells if (stored := load_cell(out, c)) is not None}
    todo = [] if report_only else [c for c in select_cells(cells, only) if c.id not in results]
    if todo:
        runner = cell_runner if cell_runner is not None else CellRunner(cfg, progress=progress)
        for _ in _run_cells(todo, runner, out, results, cfg.device, command, progress, main):
            if main:  # the tables after every cell (plots at the end), so an interrupted run has them
                write_report(cfg, out, cells, results, rows, budget, command, plots=False)
    return write_report(cfg, out, cells, results, rows, budget, command, plots=plots, write=main)


def _run_cells(todo: list[Cell], runner: Callable[[Cell], dict], out: Path, results: dict[str, dict],
               device: str, command: str | None, progress: bool, write: bool = True) -> Iterator[Cell]:
    """Run each cell, store it atomically with its key and environment (when `write`), add it to
    `results`, then yield it."""
    env = environment(device)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="benchmark", unit="cell", dynamic_ncols=True)
    try:
        for c in todo:
            if bar is not None:
                bar.set_postfix_str(c.id)
            t0 = time.perf_counter()
            result = runner(c)
            record = {"id": c.id, "kind": c.kind, "key": c.key, "spec": c.spec,
                      "result": jsonable(result), "seconds": time.perf_counter() - t0, "date": now(),
                      "device": env["device"], "device_name": env["device_name"],
                      "git_commit": env["git_commit"], "git_dirty": env["git_dirty"], "command": command,
                      "versions": env["versions"]}
            if write:
                atomic_write_text(cell_path(out, c), json.dumps(record, indent=1) + "\n")
            results[c.id] = record["result"]
            if bar is not None:
                bar.update(1)
                bar.write(f"  {c.id}: " + _cell_line(record["result"]))
            yield c
    finally:
        if bar is not None:
            bar.close()


def _cell_line(r: dict[str, Any]) -> str:
    parts = [f"test PPL {fmt(num(r.get('test_ppl')))}", f"LiM {fmt(num(r.get('lim_ppl')))}"]
    if r.get("tokens_per_s"):
        parts.append(f"{r['tokens_per_s']:.0f} train tok/s")
    if r.get("size_mb"):
        parts.append(f"{r['size_mb']:.1f} MiB")
    if r.get("seconds"):
        parts.append(f"{r['seconds']:.0f} s")
    return ", ".join(parts)


def list_cells(cfg: BenchConfig, out_dir: str | os.PathLike, with_peft: bool | None = None,
               budget_model: nn.Module | None = None) -> list[tuple[str, bool]]:
    """(cell id, done?) for every planned cell."""
    rows = adaptation_rows(cfg, with_peft)
    cells = plan_cells(cfg, compute_budget(cfg, rows, budget_model), rows)
    return [(c.id, load_cell(Path(out_dir), c) is not None) for c in cells]
