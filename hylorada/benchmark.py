"""`hylorada benchmark`: the adaptation table and the size/quality frontier, from one command.

Two groups of *cells* (each cell is one measured thing, stored on its own):

- adaptation (`adapt-<row>-s<seed>`): the base model fine-tuned on the train split of `data`
  with the same steps, schedule, batch, tokens and seed for every row, then scored on the test
  split (perplexity and LiM perplexity). Rows: our lora, dora, lorada, hylorada; peft's LoRA and
  DoRA (`peft-lora`, `peft-dora`, when peft is installed); and ablations of HyLoRADA
  (`ABLATIONS`). Every row gets the rank that brings its trainable-parameter count closest to
  LoRA's at `target_rank` (`matched_ranks`, within 10%); alpha = alpha_ratio x rank, so every
  row has the same scale s = alpha / r.
- frontier (`base`, `frontier-<svd|whiten>-<ratio>[-rec]`): the dense model, then the model
  compressed at each ratio with plain or whitened SVD, without and with recovery fine-tuning
  (`hylorada.recipes.compress.recover_compressed`: adapters on the factors, merged back, rank kept):
  size vs test perplexity.

Resume: a finished cell is written atomically to `<out>/cells/<cell id>.json` together with a
key (a hash of everything that determines its result). A rerun skips every cell whose file has
the current key, so an interrupted run continues where it stopped, and `only` (glob patterns on
cell ids) runs a subset: a long run splits into pieces that each write their cells. After every
invocation `results.json`, `results.md`, `methods.png` and `frontier.png` are rebuilt from all
the stored cells that belong to the current plan; cells still missing are listed as pending.
Runs made elsewhere merge by copying their `cells/*.json` into one out dir and running again with
`report_only=True` (`--report-only`).
"""
from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import fnmatch
import gc
import hashlib
import json
import logging
import math
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from .utils.io import atomic_write_text, claim_work_dir
from .errors import UsageError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
METHODS = ("lora", "dora", "lorada", "hylorada")
PEFT_ROWS = ("peft-lora", "peft-dora")
BUDGET_TOLERANCE = 0.10
# Kaiming-uniform(a=sqrt 5) draws A_ij from U(-1/sqrt(d_in), 1/sqrt(d_in)): E||row||² = 1/3 for
# every d_in, so its rows have norm ~0.577; orthogonal rows have norm 1 (docs/METHODS.md).
KAIMING_ROW_NORM = 1.0 / math.sqrt(3.0)

# ablation row -> how it differs from its base method (documented in results.md)
ABLATIONS: dict[str, dict[str, Any]] = {
    "hylorada-kaiming": dict(
        base="hylorada", init="kaiming",
        desc="HyLoRADA with kaiming-uniform A instead of orthogonal (init direction and scale)"),
    "hylorada-orth-scaled": dict(
        base="hylorada", scale_A=KAIMING_ROW_NORM,
        desc="HyLoRADA with orthogonal A rescaled to kaiming's row norm 1/sqrt(3) "
             "(orthogonal direction, kaiming scale)"),
    "hylorada-gate-frozen": dict(
        base="hylorada", freeze=("gate",),
        desc="HyLoRADA with the gate fixed at its init (g = sigmoid(gate_init) = 0.5): "
             "m_eff = g·m + (1-g)·m0 with a constant g, no learned gating"),
    "hylorada-blend-frozen": dict(
        base="hylorada", freeze=("residual",),
        desc="HyLoRADA with the DoRA/LoRA blend fixed at its init (beta = sigmoid(residual_init))"),
    "dora-orthogonal": dict(
        base="dora", init="orthogonal",
        desc="plain DoRA with orthogonal A: HyLoRADA without gate and blend (g = 1, beta = 0)"),
}


# ----------------------------------------------------------------------------------------------
# configuration and presets
# ----------------------------------------------------------------------------------------------
@dataclass
class BenchConfig:
    """Everything a benchmark run depends on. See PRESETS for the sized configurations."""

    preset: str = "cpu-quick"
    model: str = "smollm2-135m"
    data: str = "shakespeare"
    dtype: str = "float32"
    device: str = "cpu"
    seeds: int = 1
    # fine-tuning (adaptation rows and recovery)
    steps: int = 12
    batch_size: int = 4
    seq_len: int = 128
    lr: float = 1e-3
    warmup_steps: int = 2
    schedule: str = "cosine"
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    mixed_precision: str = "auto"
    # adapters
    target_rank: int = 8
    alpha_ratio: float = 2.0
    dropout: float = 0.05
    targets: str | list[str] = "all-linear"
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    peft: bool = True
    ablations: list[str] = field(default_factory=lambda: list(ABLATIONS))
    # evaluation
    eval_seq_len: int = 512
    eval_max_tokens: int | None = 4096
    eval_batch_size: int = 2
    lim_buckets: int = 10
    # "auto" | "bos" | "none": BOS at the start of every window/block (hylorada/data/blocks.py); cells
    # record the resolved value; the cell key holds it only when it is not "auto"
    window_prefix: str = "auto"
    # frontier
    ratios: list[float] = field(default_factory=lambda: [0.2])
    compress_methods: list[str] = field(default_factory=lambda: ["svd", "whiten"])
    recovery: list[bool] = field(default_factory=lambda: [False, True])
    recovery_method: str = "lora"
    recovery_rank: int = 8
    calib_blocks: int = 16
    calib_seq_len: int = 256
    svd_solver: str = "full"
    # a sample generation from every cell's model (greedy; "" = none): recorded in the cells,
    # shown side by side in results.md
    sample_prompt: str = ""
    sample_tokens: int = 32
    sample_chat: bool = False
    # what results.md says about the size of the run
    caveat: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def seed_list(self) -> list[int]:
        return list(range(self.seeds))


CPU_QUICK_CAVEAT = (
    "This is the `cpu-quick` preset: one seed, {steps} steps of {batch_size} x {seq_len} tokens "
    "({tokens:,} training tokens per row), test perplexity on the first {eval_tokens} test tokens, "
    "compression at ratio(s) {ratios}. It shows that every cell runs end to end on this machine, "
    "the matched trainable-parameter budgets, the relative cost (time, tokens/s, memory) of each "
    "method, and the gross effects of compression (plain SVD collapsing, whitening holding up, "
    "recovery helping). It CANNOT rank the adaptation methods: with one seed there is no seed "
    "spread, a few thousand training tokens move the model very little, and differences of a "
    "few percent in perplexity on a few thousand test tokens are noise. Use the `full` preset "
    "(>= 3 seeds, hundreds of steps, the full test split) on a GPU for that.")

FULL_CAVEAT = (
    "This is the `full` preset: {seeds} seeds, {steps} steps of {batch_size} x {seq_len} tokens "
    "({tokens:,} training tokens per row and seed), the test split evaluated in windows of "
    "{eval_seq_len} tokens. A difference between two rows means something only where it is "
    "larger than the spread over seeds shown next to it.")

QUICK_CAVEAT = (
    "This is the `quick` preset, the first command's demonstration: one seed, {steps} steps of "
    "{batch_size} x {seq_len} tokens ({tokens:,} training tokens) for each of LoRA, HyLoRADA and the "
    "recovery, test perplexity on the first {eval_tokens} test tokens, whitened compression at "
    "ratio(s) {ratios}. It shows the whole pipeline and the direction of each effect (adaptation "
    "lowers perplexity, compression raises it, recovery takes part of that back); it does not rank "
    "LoRA against HyLoRADA (one seed, a few thousand tokens). `--preset cpu-quick` (~15 min, every "
    "method, plain SVD too) and `--preset full` (a GPU) are the longer runs.")

SAMPLE_PROMPT = "ROMEO:\nWhat light through yonder window breaks?"

PRESETS: dict[str, dict[str, Any]] = {
    # the README's first command: ~4 min on a 2-core CPU with SmolLM2-135M (docs/BENCHMARK.md)
    "quick": dict(
        seeds=1, steps=8, batch_size=4, seq_len=128, lr=1e-3, warmup_steps=1,
        eval_max_tokens=2048, eval_batch_size=2, mixed_precision="no",
        methods=["lora", "hylorada"], peft=False, ablations=[],
        ratios=[0.2], compress_methods=["whiten"], calib_blocks=8, calib_seq_len=256,
        sample_prompt=SAMPLE_PROMPT, sample_tokens=24, caveat=QUICK_CAVEAT),
    # ~15 minutes on a 2-core CPU with SmolLM2-135M (see docs/BENCHMARK.md for the arithmetic)
    "cpu-quick": dict(
        seeds=1, steps=12, batch_size=4, seq_len=128, lr=1e-3, warmup_steps=2,
        eval_max_tokens=3072, eval_batch_size=2, mixed_precision="no",
        ablations=["hylorada-kaiming", "dora-orthogonal"],
        ratios=[0.2], calib_blocks=16, calib_seq_len=256, caveat=CPU_QUICK_CAVEAT),
    # one H100 (measured there at 150 steps: LoRA ~18k, HyLoRADA ~9k training tokens/s, ~40 min for
    # the 46 cells): ~55 min at 200 steps, so it runs as --only pieces of <= 10 min (docs/BENCHMARK.md)
    "full": dict(
        device="cuda", seeds=3, steps=200, batch_size=16, seq_len=256, lr=2e-4, warmup_steps=20,
        eval_max_tokens=None, eval_batch_size=8, mixed_precision="auto",
        ablations=list(ABLATIONS), ratios=[0.2, 0.4, 0.6], calib_blocks=64, calib_seq_len=512,
        caveat=FULL_CAVEAT),
}


DEFAULT_PRESET = "quick"


def make_config(preset: str = DEFAULT_PRESET, **overrides: Any) -> BenchConfig:
    """The preset's BenchConfig with `overrides` (None values are ignored)."""
    if preset not in PRESETS:
        raise UsageError(f"unknown preset {preset!r}; allowed: {sorted(PRESETS)}")
    known = {f.name for f in dataclasses.fields(BenchConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise UsageError(f"unknown benchmark settings {unknown}; allowed: {sorted(known)}")
    values = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
    cfg = BenchConfig(preset=preset, **values)
    validate_config(cfg)
    return cfg


def validate_config(cfg: BenchConfig) -> None:
    def bad(name: str, allowed: str) -> None:
        raise UsageError(f"benchmark {name}={getattr(cfg, name)!r} is invalid: allowed {allowed}")

    for name in ("seeds", "steps", "batch_size", "seq_len", "target_rank", "eval_seq_len",
                 "eval_batch_size", "lim_buckets", "recovery_rank", "calib_blocks", "calib_seq_len",
                 "sample_tokens"):
        v = getattr(cfg, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            bad(name, "an integer >= 1")
    for name in ("seq_len", "eval_seq_len", "calib_seq_len"):  # one token predicts nothing
        if getattr(cfg, name) < 2:
            bad(name, "an integer >= 2")
    if not isinstance(cfg.lr, (int, float)) or isinstance(cfg.lr, bool) or not 0 < cfg.lr < math.inf:
        bad("lr", "a finite number > 0")
    if cfg.eval_max_tokens is not None and (not isinstance(cfg.eval_max_tokens, int) or cfg.eval_max_tokens < 2):
        bad("eval_max_tokens", "None or an integer >= 2")
    for m in cfg.methods:
        if m not in METHODS:
            bad("methods", f"a list from {list(METHODS)}")
    for a in cfg.ablations:
        if a not in ABLATIONS:
            bad("ablations", f"a list from {list(ABLATIONS)}")
    if cfg.recovery_method not in METHODS:
        bad("recovery_method", f"one of {list(METHODS)}")
    for r in cfg.ratios:
        if not isinstance(r, (int, float)) or not 0 < r < 1:
            bad("ratios", "fractions in (0, 1) (of each target matrix's parameters removed)")
    for m in cfg.compress_methods:
        if m not in ("svd", "whiten"):
            bad("compress_methods", "a list from ['svd', 'whiten']")
    if cfg.window_prefix not in ("auto", "bos", "none"):
        bad("window_prefix", "'auto', 'bos' or 'none'")
    if cfg.device not in ("cpu", "cuda") and not str(cfg.device).startswith("cuda:"):
        bad("device", "'cpu', 'cuda' or 'cuda:N'")


# ----------------------------------------------------------------------------------------------
# matched trainable-parameter budgets
# ----------------------------------------------------------------------------------------------
def _base_method(row: str) -> str:
    if row in ABLATIONS:
        return ABLATIONS[row]["base"]
    if row in PEFT_ROWS:
        return row.removeprefix("peft-")
    return row


def _layer_shapes(model: nn.Module, targets) -> list[tuple[str, int, int]]:
    from .layers import in_out_features
    from .model import match_targets

    out = []
    for name in match_targets(model, targets):
        d_in, d_out = in_out_features(model.get_submodule(name))
        out.append((name, d_in, d_out))
    return out


def trainable_count(model: nn.Module, method: str, rank: int, targets="all-linear",
                    shapes: list[tuple[str, int, int]] | None = None) -> int:
    """Trainable parameters of `method` (lora, dora, lorada, hylorada, peft-lora, peft-dora or an
    ablation row) at `rank` on `targets`, counted from the layer shapes without wrapping:
    LoRA r(d_in + d_out) per layer; DoRA + d_out (magnitude); HyLoRADA + d_out + 2 (magnitude,
    gate, blend; m0 is a buffer); LoRaDA + n_heads per query projection (temperatures).
    Frozen ablation parameters are not counted."""
    from .model import QUERY_NAMES, _num_heads

    shapes = shapes if shapes is not None else _layer_shapes(model, targets)
    base = _base_method(method)
    frozen = ABLATIONS.get(method, {}).get("freeze", ())
    total = 0
    for name, d_in, d_out in shapes:
        n = rank * (d_in + d_out)
        if base in ("dora", "hylorada"):
            n += d_out
        if base == "hylorada":
            n += sum(1 for p in ("gate", "residual") if p not in frozen)
        if base == "lorada" and name.rsplit(".", 1)[-1] in (*QUERY_NAMES, "c_attn"):
            n += _num_heads(model)
        total += n
    return total


def matched_ranks(model: nn.Module, methods: Iterable[str], target_rank: int = 8,
                  targets="all-linear", tolerance: float = BUDGET_TOLERANCE) -> dict[str, int]:
    """{method: rank} so that each method's trainable count is the closest to LoRA's at
    `target_rank` (ties: the larger rank), and within `tolerance` (10%) of it.

    Raises ValueError when some method cannot get within the tolerance (e.g. a tiny model with
    target_rank 1, where DoRA's magnitude alone is > 10% of LoRA's count)."""
    shapes = _layer_shapes(model, targets)
    ref = trainable_count(model, "lora", target_rank, shapes=shapes)
    max_rank = min(min(d_in, d_out) for _, d_in, d_out in shapes)
    out: dict[str, int] = {}
    for method in methods:
        best = min(range(1, max_rank + 1),
                   key=lambda r: (abs(trainable_count(model, method, r, shapes=shapes) - ref), -r))
        n = trainable_count(model, method, best, shapes=shapes)
        if abs(n - ref) > tolerance * ref:
            raise ValueError(
                f"matched_ranks: {method} cannot get within {tolerance:.0%} of LoRA's {ref:,} trainable "
                f"parameters at rank {target_rank} (closest: rank {best}, {n:,}); use a larger target rank")
        out[method] = best
    return out


def budget_table(model: nn.Module, rows: Iterable[str], target_rank: int, targets="all-linear",
                 alpha_ratio: float = 2.0) -> dict[str, Any]:
    """The matched budget of every row: rank, alpha, trainable count and its ratio to LoRA's."""
    rows = list(rows)
    bases = sorted({_base_method(r) if r not in PEFT_ROWS else r for r in rows} | {"lora"})
    ranks = matched_ranks(model, bases, target_rank, targets)
    shapes = _layer_shapes(model, targets)
    ref = trainable_count(model, "lora", target_rank, shapes=shapes)
    table = {}
    for row in rows:
        r = ranks[row] if row in ranks else ranks[_base_method(row)]
        n = trainable_count(model, row, r, shapes=shapes)
        table[row] = {"rank": r, "alpha": alpha_ratio * r, "trainable_params": n, "vs_lora": n / ref}
    return {"target_rank": target_rank, "targets": targets, "n_layers": len(shapes),
            "lora_params_at_target": ref, "tolerance": BUDGET_TOLERANCE, "rows": table}


# ----------------------------------------------------------------------------------------------
# peft reference rows: the trainer's interface around a peft model
# ----------------------------------------------------------------------------------------------
class PeftAdapter(nn.Module):
    """A peft `PeftModel` with the methods `hylorada.train.train` uses.

    Parameter groups follow HyLoRADAModel.parameter_groups: lora_A, lora_B (x LoRA+ ratio when
    on) and the 1-D magnitudes ("scalars", base lr, no weight decay)."""

    def __init__(self, peft_model: nn.Module, lora_plus_ratio: float | None = None) -> None:
        super().__init__()
        self.peft_model = peft_model
        self.lora_plus_ratio = lora_plus_ratio

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.peft_model(*args, **kwargs)

    def named_trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.peft_model.named_parameters() if p.requires_grad]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_trainable_parameters()]

    def parameter_groups(self, lr: float, weight_decay: float = 0.0) -> list[dict[str, Any]]:
        groups: dict[str, list[nn.Parameter]] = {"lora_A": [], "lora_B": [], "scalars": []}
        for name, p in self.named_trainable_parameters():
            key = "lora_A" if ".lora_A." in name else "lora_B" if ".lora_B." in name else "scalars"
            groups[key].append(p)
        ratio = self.lora_plus_ratio or 1.0
        spec = {"lora_A": (lr, weight_decay), "lora_B": (lr * ratio, weight_decay), "scalars": (lr, 0.0)}
        return [{"name": k, "params": v, "lr": spec[k][0], "weight_decay": spec[k][1]}
                for k, v in groups.items() if v]

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.named_trainable_parameters()}

    @torch.no_grad()
    def load_adapter_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        own = dict(self.named_trainable_parameters())
        if set(own) != set(state):
            raise ValueError("adapter state does not fit this peft model")
        for k, p in own.items():
            p.copy_(state[k])


def peft_available() -> bool:
    try:
        import peft  # noqa: F401
    except ImportError:
        return False
    return True


# ----------------------------------------------------------------------------------------------
# cells
# ----------------------------------------------------------------------------------------------
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


def adaptation_rows(cfg: BenchConfig, with_peft: bool | None = None) -> list[str]:
    with_peft = (cfg.peft and peft_available()) if with_peft is None else with_peft
    rows = list(cfg.methods)
    if with_peft:
        rows += list(PEFT_ROWS)
    rows += list(cfg.ablations)
    return rows


def _fmt_ratio(r: float) -> str:
    return f"{r:g}"


def plan_cells(cfg: BenchConfig, budget: dict[str, Any], rows: list[str]) -> list[Cell]:
    """Every cell of the run, in run order: base, adaptation rows by seed, then the frontier."""
    common = dict(model=cfg.model, dtype=cfg.dtype, data=cfg.data, eval_seq_len=cfg.eval_seq_len,
                  eval_max_tokens=cfg.eval_max_tokens, lim_buckets=cfg.lim_buckets)
    if cfg.window_prefix != "auto":  # "auto" keeps the keys (and stored cells) of runs before the option
        common["window_prefix"] = cfg.window_prefix
    if cfg.sample_prompt:  # likewise: no sample, the keys of runs before the option
        common["sample"] = dict(prompt=cfg.sample_prompt, max_new_tokens=cfg.sample_tokens, chat=cfg.sample_chat)
    train = dict(steps=cfg.steps, batch_size=cfg.batch_size, seq_len=cfg.seq_len, lr=cfg.lr,
                 warmup_steps=cfg.warmup_steps, schedule=cfg.schedule, min_lr_ratio=cfg.min_lr_ratio,
                 weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
                 mixed_precision=cfg.mixed_precision, dropout=cfg.dropout, alpha_ratio=cfg.alpha_ratio)
    cells = [Cell("base", "base", {"kind": "base", **common})]
    for seed in cfg.seed_list:
        for row in rows:
            spec = {"kind": "adapt", "row": row, "method": _base_method(row),
                    "rank": budget["rows"][row]["rank"], "targets": cfg.targets, "seed": seed,
                    "ablation": {k: v for k, v in ABLATIONS.get(row, {}).items() if k != "desc"},
                    **common, **train}
            cells.append(Cell(f"adapt-{row}-s{seed}", "adapt", spec))
    for ratio in cfg.ratios:
        for method in cfg.compress_methods:
            comp = dict(compress_method=method, ratio=float(ratio), svd_solver=cfg.svd_solver)
            if method == "whiten":
                comp.update(calib_data=cfg.data, calib_blocks=cfg.calib_blocks, calib_seq_len=cfg.calib_seq_len)
            for rec in cfg.recovery:
                spec = {"kind": "frontier", "recovery": bool(rec), **comp, **common}
                cid = f"frontier-{method}-{_fmt_ratio(ratio)}"
                if rec:
                    spec.update(recovery_method=cfg.recovery_method, recovery_rank=cfg.recovery_rank,
                                seed=0, **train)
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




def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.dtype):
        return str(x).removeprefix("torch.")
    if isinstance(x, Path):
        return str(x)
    return x


def _num(x: Any) -> float | None:
    """A JSON value back to a float ("inf" strings included); None stays None."""
    if x is None:
        return None
    if isinstance(x, str):
        return float(x)
    return float(x)


# ----------------------------------------------------------------------------------------------
# memory
# ----------------------------------------------------------------------------------------------
def _proc_status_kb(field_name: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{field_name}:\s+(\d+)\s+kB", text, re.M)
    return int(m.group(1)) if m else None


def _malloc_trim() -> None:
    """glibc keeps freed memory in its arenas (RSS stays high); malloc_trim returns it to the OS."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory of a block: CUDA max_memory_allocated, or on CPU the peak resident set size
    above the RSS at the start (after gc and malloc_trim; Linux: VmHWM reset through
    /proc/self/clear_refs; elsewhere the growth of the process's lifetime peak ru_maxrss, a
    lower bound)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind = "none"
        self.mb: float | None = None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.kind = "cuda_max_allocated"
            return self
        gc.collect()
        _malloc_trim()  # give freed heap memory back, so that the RSS baseline is what is in use
        self._rss0 = _proc_status_kb("VmRSS")
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self.kind = "cpu_peak_rss_delta"
        except OSError:
            import resource

            self._maxrss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.kind = "cpu_maxrss_growth"
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.kind == "cuda_max_allocated":
            torch.cuda.synchronize(self.device)
            self.mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif self.kind == "cpu_peak_rss_delta":
            hwm = _proc_status_kb("VmHWM")
            if hwm is not None and self._rss0 is not None:
                self.mb = max(0, hwm - self._rss0) / 1024
        elif self.kind == "cpu_maxrss_growth":
            import resource

            grow = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self._maxrss0
            self.mb = max(0, grow) / (2**20 if sys.platform == "darwin" else 1024)


# ----------------------------------------------------------------------------------------------
# the cell runner
# ----------------------------------------------------------------------------------------------
class CellRunner:
    """Runs cells in one process, caching the tokenizer, token ids and the last compressed model."""

    def __init__(self, cfg: BenchConfig, progress: bool = True) -> None:
        self.cfg = cfg
        self.progress = progress
        self.device = torch.device(cfg.device)
        self._tokenizer = None
        self._cache: dict[Any, Any] = {}

    # ---- data -------------------------------------------------------------------------------
    def load(self) -> nn.Module:
        """A fresh copy of the base model on the device (loaded from disk once per process)."""
        if "pristine" not in self._cache:
            from .loading import load_model

            model, tok = load_model(self.cfg.model, dtype=self.cfg.dtype, device="cpu")
            self._tokenizer = self._tokenizer or tok
            self._cache["pristine"] = model
        model = copy.deepcopy(self._cache["pristine"]).to(self.device)
        return model.eval()

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            from .loading import MODEL_ALIASES, converted_folder

            name = self.cfg.model
            folder = converted_folder(name) if name in MODEL_ALIASES else name
            self._tokenizer = AutoTokenizer.from_pretrained(folder)
        return self._tokenizer

    def _pad_id(self) -> int:
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)

    @property
    def window_prefix(self) -> str:
        """The resolved window prefix ("bos" or "none") of cfg.window_prefix for this tokenizer."""
        from .data import resolve_window_prefix

        return resolve_window_prefix(self.tokenizer, self.cfg.window_prefix)

    def _bos_id(self) -> int | None:
        return self.tokenizer.bos_token_id if self.window_prefix == "bos" else None

    def train_blocks(self, data: str, seq_len: int) -> dict[str, torch.Tensor]:
        key = ("train", data, seq_len)
        if key not in self._cache:
            from .data import training_blocks

            self._cache[key] = training_blocks(self.tokenizer, data, "train", seq_len, self._pad_id(),
                                               bos_id=self._bos_id())[0]
        return self._cache[key]

    def calibration(self, data: str, n_blocks: int, seq_len: int) -> dict[str, torch.Tensor]:
        """The first n_blocks blocks of seq_len tokens of the train split (fixed, no sampling)."""
        blocks = self.train_blocks(data, seq_len)
        return {k: v[:n_blocks] for k, v in blocks.items()}

    def test_ids(self, data: str, max_tokens: int | None) -> torch.Tensor:
        key = ("test", data, max_tokens)
        if key not in self._cache:
            from .data import eval_ids, load_corpus

            ids = eval_ids(self.tokenizer, load_corpus(data, "test"))
            self._cache[key] = ids[:, :max_tokens] if max_tokens else ids
        return self._cache[key]

    # ---- pieces -------------------------------------------------------------------------------
    def evaluate(self, model: nn.Module, spec: dict[str, Any]) -> dict[str, Any]:
        from .evaluate import lim_perplexity

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
        from .recipes.generate import GenerationSettings, generate

        t0 = time.perf_counter()
        text = generate(getattr(model, "peft_model", model), self.tokenizer, sample["prompt"],
                        GenerationSettings(max_new_tokens=sample["max_new_tokens"]), chat=sample["chat"])
        return {"sample_text": text, "sample_seconds": time.perf_counter() - t0}

    def train_config(self, spec: dict[str, Any], seed: int):
        from .train import TrainConfig

        return TrainConfig(steps=spec["steps"], batch_size=spec["batch_size"], lr=spec["lr"],
                           warmup_steps=spec["warmup_steps"], schedule=spec["schedule"],
                           min_lr_ratio=spec["min_lr_ratio"], weight_decay=spec["weight_decay"],
                           max_grad_norm=spec["max_grad_norm"], mixed_precision=spec["mixed_precision"],
                           seed=seed, eval_every=0, log_every=0, progress=self.progress)

    def wrap(self, model: nn.Module, spec: dict[str, Any]) -> nn.Module:
        """The adapter of an adaptation row on `model` (seeded), ablations applied."""
        from .config import HyLoRADAConfig
        from .model import HyLoRADAModel, match_targets

        row, rank = spec["row"], spec["rank"]
        alpha = spec["alpha_ratio"] * rank
        torch.manual_seed(spec["seed"])
        if row in PEFT_ROWS:
            from peft import LoraConfig, get_peft_model

            names = match_targets(model, spec["targets"])
            pcfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=spec["dropout"], target_modules=names,
                              use_dora=row == "peft-dora", bias="none", init_lora_weights=True)
            return PeftAdapter(get_peft_model(model, pcfg))
        abl = spec.get("ablation") or {}
        kwargs = dict(method=spec["method"], lora_rank=rank, lora_alpha=alpha, lora_dropout=spec["dropout"],
                      target_modules=spec["targets"])
        if "init" in abl:
            kwargs["init_lora_weights"] = abl["init"]
        if abl:
            kwargs["extra"] = {"ablation": row}
        wrapped = HyLoRADAModel(model, HyLoRADAConfig(**kwargs))
        with torch.no_grad():
            for _, layer in wrapped.adapter_layers():
                if "scale_A" in abl:
                    layer.lora_A.mul_(abl["scale_A"])
                for pname in abl.get("freeze", ()):
                    getattr(layer, pname).requires_grad_(False)
        return wrapped

    # ---- cells --------------------------------------------------------------------------------
    def __call__(self, cell: Cell) -> dict[str, Any]:
        fn = {"base": self.run_base, "adapt": self.run_adapt, "frontier": self.run_frontier}[cell.kind]
        t0 = time.perf_counter()
        out = fn(cell.spec)
        out["seconds"] = time.perf_counter() - t0
        return out

    def run_base(self, spec: dict[str, Any]) -> dict[str, Any]:
        from .evaluate import model_size

        model = self.load()
        size = model_size(model)
        out = {"size_mb": size.mb, "n_params": size.n_params, "n_bytes": size.n_bytes,
               **self.evaluate(model, spec)}
        del model
        return out

    def run_adapt(self, spec: dict[str, Any]) -> dict[str, Any]:
        from .train import train

        model = self.load()
        wrapped = self.wrap(model, spec)
        n_trainable = sum(p.numel() for p in wrapped.trainable_parameters())
        blocks = self.train_blocks(spec["data"], spec["seq_len"])
        with PeakMemory(self.device) as mem:
            result = train(wrapped, blocks, None, self.train_config(spec, spec["seed"]))
        wrapped.eval()
        out = {"row": spec["row"], "method": spec["method"], "rank": spec["rank"], "seed": spec["seed"],
               "trainable_params": n_trainable, "train_time_s": result.train_time_s,
               "train_wall_s": result.wall_time_s, "tokens_per_s": result.mean_tokens_per_s,
               "tokens_seen": result.tokens_seen, "first_loss": result.losses[0] if result.losses else None,
               "last_loss": result.losses[-1] if result.losses else None, "losses": result.losses,
               "mixed_precision": result.mixed_precision,
               "peak_mem_mb": mem.mb, "peak_mem_kind": mem.kind, **self.evaluate(wrapped, spec)}
        del wrapped, model
        return out

    def _compressed(self, spec: dict[str, Any]):
        """(compressed model, report dict); reuses this process's last compression of the same spec."""
        from .compress import CompressConfig, compress_model

        key = ("compressed", spec["compress_method"], spec["ratio"], spec.get("calib_blocks"),
               spec.get("calib_seq_len"), spec["svd_solver"])
        cached = self._cache.get("compressed")
        if cached is not None and cached[0] == key:
            return copy.deepcopy(cached[1]), cached[2]
        self._cache.pop("compressed", None)
        gc.collect()
        model = self.load()
        calib = None
        ccfg = CompressConfig(method=spec["compress_method"], ratio=spec["ratio"], svd_solver=spec["svd_solver"])
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

    def run_frontier(self, spec: dict[str, Any]) -> dict[str, Any]:
        from .recipes.compress import recover_compressed
        from .evaluate import model_size

        model, rep = self._compressed(spec)
        out: dict[str, Any] = {"compress_method": spec["compress_method"], "ratio": spec["ratio"],
                               "recovery": spec["recovery"], **rep}
        if spec["recovery"]:
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
            out.update(recovery_method=spec["recovery_method"], recovery_rank=spec["recovery_rank"],
                       recovery_steps=spec["steps"], recovery_seconds=summary["seconds"],
                       recovery_phases=summary["phases"], peak_mem_mb=mem.mb, peak_mem_kind=mem.kind)
        model.eval()
        size = model_size(model)
        out.update(size_mb=size.mb, n_params=size.n_params, n_bytes=size.n_bytes, **self.evaluate(model, spec))
        del model
        return out


# ----------------------------------------------------------------------------------------------
# environment
# ----------------------------------------------------------------------------------------------
def _git(*args: str) -> str | None:
    root = Path(__file__).resolve().parents[1]
    try:
        res = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


_ENV_CACHE: dict[str, dict[str, Any]] = {}


def environment(device: str) -> dict[str, Any]:
    """Versions, device, git commit (computed once per process and device) and the current date."""
    if device not in _ENV_CACHE:
        _ENV_CACHE[device] = _environment(device)
    return {**_ENV_CACHE[device], "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def _environment(device: str) -> dict[str, Any]:
    versions = {"python": platform.python_version()}
    for mod in ("torch", "transformers", "accelerate", "peft", "optuna", "safetensors", "numpy"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - optional packages
            versions[mod] = None
    try:
        from importlib.metadata import version

        versions["hylorada"] = version("hylorada")
    except Exception:  # noqa: BLE001
        versions["hylorada"] = None
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        name = torch.cuda.get_device_name(dev)
    else:
        name = _cpu_name()
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    commit = _git("rev-parse", "HEAD") or os.environ.get("HYLORADA_GIT_COMMIT")  # a copy without .git
    return {"versions": versions, "device": str(dev), "device_name": name, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
            "git_commit": commit, "git_dirty": None if dirty is None else bool(dirty),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU: {line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"CPU: {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


# ----------------------------------------------------------------------------------------------
# aggregation
# ----------------------------------------------------------------------------------------------
def mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof 1; None with fewer than 2 values)."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not xs:
        return None, None
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, None
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def aggregate(cfg: BenchConfig, cells: list[Cell], results: dict[str, dict], rows: list[str],
              budget: dict[str, Any]) -> dict[str, Any]:
    base = results.get("base")
    adaptation = []
    if base is not None:
        adaptation.append({"row": "base", "kind": "base", "method": None, "rank": None, "trainable_params": 0,
                           "n_seeds": 1, "seeds": [], "test_ppl_mean": base["test_ppl"], "test_ppl_std": None,
                           "lim_ppl_mean": base["lim_ppl"], "lim_ppl_std": None,
                           "train_time_s_mean": None, "tokens_per_s_mean": None, "peak_mem_mb_mean": None,
                           "lim_bucket_ppl": base.get("lim_bucket_ppl")})
    for row in rows:
        done = [results[c.id] for c in cells if c.kind == "adapt" and c.spec["row"] == row and c.id in results]
        planned = sum(1 for c in cells if c.kind == "adapt" and c.spec["row"] == row)
        entry: dict[str, Any] = {
            "row": row, "kind": "ablation" if row in ABLATIONS else "peft" if row in PEFT_ROWS else "method",
            "method": _base_method(row), "rank": budget["rows"][row]["rank"],
            "alpha": budget["rows"][row]["alpha"],
            "trainable_params": done[0]["trainable_params"] if done else budget["rows"][row]["trainable_params"],
            "n_seeds": len(done), "n_planned": planned, "seeds": [d["seed"] for d in done],
            "description": ABLATIONS.get(row, {}).get("desc")}
        for key in ("test_ppl", "lim_ppl", "train_time_s", "tokens_per_s", "peak_mem_mb", "last_loss"):
            m, s = mean_std([_num(d.get(key)) for d in done])
            entry[f"{key}_mean"], entry[f"{key}_std"] = m, s
            entry[f"{key}_values"] = [_num(d.get(key)) for d in done]
        if done:
            buckets = [d["lim_bucket_ppl"] for d in done if d.get("lim_bucket_ppl")]
            entry["lim_bucket_ppl"] = [mean_std([_num(b[i]) for b in buckets])[0]
                                       for i in range(len(buckets[0]))] if buckets else None
        adaptation.append(entry)
    frontier = []
    if base is not None:
        frontier.append({"cell": "base", "compress_method": None, "ratio": 0.0, "recovery": False,
                         "size_mb": base["size_mb"], "n_params": base["n_params"], "test_ppl": base["test_ppl"],
                         "lim_ppl": base["lim_ppl"], "target_ratio": 0.0, "model_ratio": 0.0})
    for c in cells:
        if c.kind != "frontier" or c.id not in results:
            continue
        r = results[c.id]
        frontier.append({"cell": c.id, "compress_method": r["compress_method"], "ratio": r["ratio"],
                         "recovery": r["recovery"], "size_mb": r["size_mb"], "n_params": r["n_params"],
                         "test_ppl": r["test_ppl"], "lim_ppl": r["lim_ppl"], "target_ratio": r["target_ratio"],
                         "model_ratio": r["model_ratio"], "recovery_method": r.get("recovery_method"),
                         "seconds": r.get("seconds")})
    return {"adaptation": adaptation, "frontier": frontier, "verdict": verdict(adaptation),
            "samples": samples(cfg, cells, results)}


def _cell_label(cell: Cell) -> str:
    spec = cell.spec
    if cell.kind == "base":
        return "dense"
    if cell.kind == "adapt":
        return f"dense + {spec['row']}" + (f" (seed {spec['seed']})" if spec["seed"] else "")
    name = f"{'whitened' if spec['compress_method'] == 'whiten' else 'plain'} SVD {100 * spec['ratio']:g}%"
    return name + (f" + recovery ({spec['recovery_method']})" if spec["recovery"] else "")


def samples(cfg: BenchConfig, cells: list[Cell], results: dict[str, dict]) -> dict[str, Any] | None:
    """The sample generations of the finished cells, in cell order (None without a sample prompt)."""
    if not cfg.sample_prompt:
        return None
    rows = [{"cell": c.id, "label": _cell_label(c), "text": results[c.id]["sample_text"],
             "seconds": results[c.id].get("sample_seconds")}
            for c in cells if c.id in results and results[c.id].get("sample_text") is not None]
    return {"prompt": cfg.sample_prompt, "max_new_tokens": cfg.sample_tokens, "chat": cfg.sample_chat,
            "rows": rows}


def verdict(adaptation: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Which method row (not ablation) has the lowest mean test PPL, by how much, and whether the
    gap to the runner-up exceeds the seed spread (the larger of the two standard deviations)."""
    cand = [r for r in adaptation if r["kind"] in ("method", "peft") and r.get("test_ppl_mean") is not None]
    if len(cand) < 2:
        return None
    cand.sort(key=lambda r: r["test_ppl_mean"])
    best, second = cand[0], cand[1]
    gap = second["test_ppl_mean"] - best["test_ppl_mean"]
    stds = [s for s in (best.get("test_ppl_std"), second.get("test_ppl_std")) if s is not None]
    spread = max(stds) if len(stds) == 2 else None
    return {"best": best["row"], "best_ppl": best["test_ppl_mean"], "runner_up": second["row"],
            "runner_up_ppl": second["test_ppl_mean"], "gap": gap,
            "gap_pct": 100 * gap / second["test_ppl_mean"], "seed_spread": spread,
            "exceeds_spread": None if spread is None else gap > spread,
            "n_seeds": min(best["n_seeds"], second["n_seeds"])}


# ----------------------------------------------------------------------------------------------
# report: markdown and plots
# ----------------------------------------------------------------------------------------------
def _f(x: float | None, digits: int = 2) -> str:
    if x is None:
        return "–"
    if not math.isfinite(x):
        return str(x)
    if abs(x) >= 1e5:
        return f"{x:.3g}"
    return f"{x:,.{digits}f}"


def _pm(m: float | None, s: float | None, digits: int = 2) -> str:
    if m is None:
        return "–"
    return _f(m, digits) + (f" ± {_f(s, digits)}" if s is not None else "")


def render_markdown(res: dict[str, Any]) -> str:
    cfg = res["config"]
    env = res["environment"]
    tokens = cfg["steps"] * cfg["batch_size"] * cfg["seq_len"]
    lines = [f"# hylorada benchmark — preset `{cfg['preset']}`", ""]
    this = res.get("command") or "hylorada benchmark --preset " + cfg["preset"]
    made_by = res.get("commands") or []
    if made_by:
        lines.append(("Command: " if len(made_by) == 1 else "Commands: ") + ", ".join(f"`{c}`" for c in made_by) + "  ")
    elif res.get("cells"):
        lines.append(f"Command: not recorded by the cells (this report: `{this}`)  ")
    else:
        lines.append(f"Command: `{this}`  ")
    when = res.get("cell_dates") or [env["date"]] * 2
    when_s = when[0] if when[0][:16] == when[1][:16] else f"{when[0]} to {when[1]}"
    commits = res.get("cell_git_commits") or (["? (not recorded by the cells)"] if res.get("cells") else
                                              [env.get("git_commit") or "?"])
    lines.append(f"Date: {when_s} · device: {env['device_name']} (`{env['device']}`) · git "
                 f"{', '.join(c if c.startswith('?') else c[:12] for c in commits)}{' (working tree had local changes)' if (res.get('cell_git_dirty') if res.get('cells') else env.get('git_dirty')) else ''}  ")
    cell_versions = res.get("cell_versions") or []
    if len(cell_versions) == 1 or not res.get("cells"):
        v = cell_versions[0] if cell_versions else env["versions"]
        lines.append("Versions: " + ", ".join(f"{k} {v[k]}" for k in v if v[k]) + "  ")
    elif cell_versions:
        lines.append(f"Versions: {len(cell_versions)} different sets among the cells (see `cells` in results.json)  ")
    else:
        lines.append("Versions: not recorded by the cells  ")
    lines.append(f"Model `{cfg['model']}` ({cfg['dtype']}), data `{cfg['data']}` (train split for fine-tuning, "
                 f"test split for perplexity; windows of {cfg['eval_seq_len']} tokens, "
                 f"{'the whole test split' if not cfg['eval_max_tokens'] else 'first ' + format(cfg['eval_max_tokens'], ',') + ' test tokens'}).")
    lines.append("")
    if cfg.get("caveat"):
        lines += ["> " + cfg["caveat"].format(tokens=tokens, eval_tokens=cfg["eval_max_tokens"] or "all",
                                               ratios=", ".join(map(str, cfg["ratios"])), **{
                                                   k: cfg[k] for k in ("steps", "batch_size", "seq_len",
                                                                       "seeds", "eval_seq_len")}), ""]
    if res["pending"]:
        lines += [f"**Incomplete:** {len(res['pending'])} of {res['n_cells']} cells pending: "
                  + ", ".join(f"`{p}`" for p in res["pending"]) + ". Run the same command again (or with "
                  "`--only`) to finish them.", ""]

    lines += _summary_lines(res)
    b = res["budget"]
    lines += ["## Matched trainable-parameter budgets", "",
              f"Every row's rank gives the trainable count closest to LoRA's at rank {b['target_rank']} "
              f"({b['lora_params_at_target']:,} parameters on {b['n_layers']} layers, targets "
              f"`{b['targets']}`), within {b['tolerance']:.0%}; alpha = {cfg['alpha_ratio']:g} x rank "
              f"(the same scale for all). Training for every row: {cfg['steps']} steps of "
              f"{cfg['batch_size']} x {cfg['seq_len']} tokens ({tokens:,} tokens), AdamW lr {cfg['lr']:g}, "
              f"{cfg['warmup_steps']} warm-up steps then {cfg['schedule']}, dropout {cfg['dropout']:g}, "
              f"mixed precision `{cfg['mixed_precision']}`, seeds {', '.join(map(str, range(cfg['seeds'])))} "
              "(seed = adapter init, data order and dropout; the same blocks for every row).", "",
              "| row | rank | alpha | trainable params | vs LoRA |", "|---|---:|---:|---:|---:|"]
    for row, e in b["rows"].items():
        lines.append(f"| {row} | {e['rank']} | {e['alpha']:g} | {e['trainable_params']:,} | "
                     f"{100 * e['vs_lora']:.1f}% |")
    lines.append("")

    def adapt_table(entries: list[dict[str, Any]]) -> list[str]:
        out = ["| row | rank | trainable | test PPL | LiM PPL | train time (s) | train tokens/s | "
               "peak mem (MiB) | seeds |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for e in entries:
            name = f"**{e['row']}** (ours)" if e["row"] == "hylorada" else e["row"]
            out.append(f"| {name} | {e['rank'] or '–'} | {e['trainable_params']:,} | "
                       f"{_pm(e['test_ppl_mean'], e['test_ppl_std'])} | {_pm(e['lim_ppl_mean'], e['lim_ppl_std'])} | "
                       f"{_pm(e.get('train_time_s_mean'), e.get('train_time_s_std'), 1)} | "
                       f"{_f(e.get('tokens_per_s_mean'), 0)} | {_f(e.get('peak_mem_mb_mean'), 0)} | "
                       f"{e['n_seeds']}{'/' + str(e['n_planned']) if e.get('n_planned', e['n_seeds']) != e['n_seeds'] else ''} |")
        return out

    ad = res["adaptation"]
    lines += ["## Adaptation (test perplexity after fine-tuning)", "",
              "Mean ± sample standard deviation over seeds (no ± with one seed). LiM PPL: the mean of "
              f"the perplexities of {cfg['lim_buckets']} buckets of relative position in the window. "
              "Peak memory: " + _mem_note(ad) + ".", ""]
    lines += adapt_table([e for e in ad if e["kind"] != "ablation"]) + [""]
    abl = [e for e in ad if e["kind"] == "ablation"]
    if abl:
        ref = next((e for e in ad if e["row"] == "hylorada"), None)
        lines += ["## Ablations of HyLoRADA", ""]
        for e in abl:
            lines.append(f"- `{e['row']}`: {e['description']}")
        lines += [""] + adapt_table(([ref] if ref else []) + abl) + [""]
    vd = res.get("verdict")
    if vd:
        lines += ["## Verdict", ""]
        msg = (f"Lowest mean test PPL among the method rows: **{vd['best']}** ({_f(vd['best_ppl'])}), "
               f"ahead of {vd['runner_up']} ({_f(vd['runner_up_ppl'])}) by {_f(vd['gap'], 3)} "
               f"({vd['gap_pct']:.2f}%). ")
        if vd["exceeds_spread"] is None:
            msg += "With one seed there is no seed spread: this gap cannot be told apart from noise."
        elif vd["exceeds_spread"]:
            msg += f"The gap exceeds the seed spread (largest std {_f(vd['seed_spread'], 3)})."
        else:
            msg += (f"The gap does NOT exceed the seed spread (largest std {_f(vd['seed_spread'], 3)}): "
                    "the two are not distinguishable at this budget.")
        lines += [msg, ""]

    fr = res["frontier"]
    lines += ["## Size / quality frontier", "",
              "Compression ratio = fraction of each target matrix's parameters removed (SVD-LLM's "
              "convention: 0.2 keeps 80%); targets: every linear layer inside the decoder blocks. "
              f"Whitening calibrated on the first {cfg['calib_blocks']} x {cfg['calib_seq_len']} tokens of the "
              f"`{cfg['data']}` train split. Recovery: {cfg['recovery_method']} adapters (rank "
              f"{cfg['recovery_rank']}) on the up then the down factors ({cfg['steps']} steps in all, the "
              "fine-tuning schedule above), merged back, so the rank and the size stay those of the "
              "compressed model. Size: every stored parameter and buffer (MiB = 2^20 bytes).", "",
              "| model | method | ratio | recovery | size (MiB) | params removed (linears / model) | test PPL | LiM PPL |",
              "|---|---|---:|---|---:|---:|---:|---:|"]
    for e in fr:
        lines.append(f"| {e['cell']} | {e['compress_method'] or 'dense'} | {e['ratio']:g} | "
                     f"{('yes (' + e['recovery_method'] + ')') if e['recovery'] else 'no'} | {_f(e['size_mb'], 1)} | "
                     f"{100 * e['target_ratio']:.1f}% / {100 * e['model_ratio']:.1f}% | {_f(_num(e['test_ppl']))} | "
                     f"{_f(_num(e['lim_ppl']))} |")
    lines += _sample_lines(res.get("samples"))
    lines += ["", f"Plots: `methods.png`, `frontier.png`. Every number: `results.json`. "
              f"{res['n_cells'] - len(res['pending'])} of {res['n_cells']} cells done; "
              f"cell files in `cells/`.", ""]
    return "\n".join(lines)


def _summary_lines(res: dict[str, Any]) -> list[str]:
    """One table: size and test perplexity of dense, each adapted method and each compressed model."""
    fr, ad = res["frontier"], res["adaptation"]
    dense = next((e for e in fr if e["compress_method"] is None), None)
    if dense is None:
        return []
    d_ppl, d_size = _num(dense["test_ppl"]), dense["size_mb"]
    lines = ["## At a glance", "", "| model | size (MiB) | test PPL | vs dense |", "|---|---:|---:|---:|"]

    def row(name: str, size: float | None, ppl: float | None) -> None:
        rel = f"{ppl / d_ppl:.2f}x" if ppl is not None and d_ppl else "–"
        lines.append(f"| {name} | {_f(size, 1)} | {_f(ppl)} | {rel} |")

    row("dense", d_size, d_ppl)
    for e in ad:
        if e["kind"] in ("method", "peft") and e.get("test_ppl_mean") is not None:
            row(f"dense + {e['row']} adapter ({e['trainable_params']:,} trainable)", d_size, e["test_ppl_mean"])
    for e in fr:
        if e["compress_method"] is not None:
            name = f"{'whitened' if e['compress_method'] == 'whiten' else 'plain'} SVD {100 * e['ratio']:g}%"
            row(name + (" + recovery" if e["recovery"] else ""), e["size_mb"], _num(e["test_ppl"]))
    return lines + ["", "Adapted rows: the dense size plus the adapter (merged: exactly the dense size).", ""]


def _sample_lines(smp: dict[str, Any] | None) -> list[str]:
    if not smp or not smp["rows"]:
        return []
    lines = ["", "## Sample generation", "",
             f"Greedy, {smp['max_new_tokens']} new tokens, {'chat template' if smp['chat'] else 'no chat template'}"
             " (`hylorada.recipes.generate`); the prompt:", "", "```", smp["prompt"], "```", ""]
    for r in smp["rows"]:
        text = r["text"].strip("\n") or "(no text: end of text was the first token)"
        lines += [f"**{r['label']}** (`{r['cell']}`):", "", "```", text, "```", ""]
    return lines[:-1]


def _mem_note(ad: list[dict[str, Any]]) -> str:
    return ("CUDA max_memory_allocated during training on GPU; on CPU the peak resident memory of the "
            "process above its level at the start of training (model weights already loaded are not "
            "counted)")


def render_plots(res: dict[str, Any], out_dir: Path) -> list[str]:
    """methods.png (test PPL per row with seed spread; LiM buckets) and frontier.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    ad = [e for e in res["adaptation"] if e.get("test_ppl_mean") is not None]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    ax = axes[0]
    if ad:  # a dot plot (a bar chart with a cut axis would exaggerate small differences)
        for i, e in enumerate(ad):
            color = ("#999999" if e["kind"] == "base" else "#d62728" if e["row"] == "hylorada" else
                     "#1f77b4" if e["kind"] == "method" else "#2ca02c" if e["kind"] == "peft" else "#ff7f0e")
            std = e.get("test_ppl_std")
            ax.errorbar([e["test_ppl_mean"]], [i], xerr=None if std is None else [std], fmt="o", color=color,
                        capsize=4, ms=7)
            vals = [v for v in (e.get("test_ppl_values") or []) if v is not None]
            if len(vals) > 1:
                ax.scatter(vals, [i] * len(vals), marker="|", color=color, s=80)
        ax.set_yticks(range(len(ad)), [e["row"] for e in ad], fontsize=8)
        ax.invert_yaxis()
        ax.grid(True, axis="x", alpha=0.3)
        ax.set_xlabel("test perplexity (dot: mean over seeds; bar: ± std; ticks: seeds)")
    ax.set_title(f"adaptation at matched budgets ({res['config']['preset']})")
    ax = axes[1]
    for e in ad:
        b = e.get("lim_bucket_ppl")
        if b:
            ax.plot(range(1, len(b) + 1), [x if x is not None else float("nan") for x in b], marker=".",
                    label=e["row"], lw=2.0 if e["row"] in ("hylorada", "base") else 1.0)
    ax.set_xlabel("relative position in the window (bucket)")
    ax.set_ylabel("perplexity")
    ax.set_title("LiM: perplexity by position")
    if ad:
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out_dir / "methods.png", dpi=120)
    plt.close(fig)
    written.append("methods.png")

    _frontier_plot(res, out_dir / "frontier.png", plt)
    written.append("frontier.png")
    return written


FRONTIER_CLIP = 10.0  # frontier.png: points above this multiple of the dense perplexity sit at the top edge


def frontier_points(res: dict[str, Any], clip: float = FRONTIER_CLIP) -> list[dict[str, Any]]:
    """The frontier as plotted: per compressed cell, size, rel = test PPL / dense test PPL and y =
    min(rel, clip) (`clipped` says where y < rel). Empty without a dense (`base`) perplexity."""
    fr = [e for e in res["frontier"] if _num(e["test_ppl"]) is not None]
    dense = next((e for e in fr if e["compress_method"] is None), None)
    if dense is None:
        return []
    d = _num(dense["test_ppl"])
    out = []
    for e in fr:
        rel = _num(e["test_ppl"]) / d
        out.append({**e, "rel": rel, "y": min(rel, clip), "clipped": rel > clip})
    return out


def _frontier_plot(res: dict[str, Any], path: Path, plt) -> None:
    """Size vs perplexity relative to dense on a linear axis cut at FRONTIER_CLIP x dense; points
    above the cut are drawn on it as triangles (filled: recovered), their real ratios written
    under it (collapsed plain SVD would otherwise squash the useful region into a sliver of a
    log axis)."""
    pts = frontier_points(res)
    fig, ax = plt.subplots(figsize=(9.5, 5))
    styles = {"svd": ("#1f77b4", "o", "plain SVD"), "whiten": ("#d62728", "s", "whitened SVD")}
    clipped: dict[float, list[str]] = {}
    for p in pts:
        x, y = p["size_mb"], p["y"]
        if p["compress_method"] is None:
            ax.scatter([x], [1.0], marker="*", s=220, color="black", label="dense", zorder=3)
            ax.annotate(f"dense: PPL {_f(_num(p['test_ppl']))}", (x, 1.0), textcoords="offset points",
                        xytext=(0, 10), ha="center", fontsize=8)
            continue
        color, marker, name = styles[p["compress_method"]]
        label = name + (" + recovery" if p["recovery"] else "")
        face = color if p["recovery"] else "none"
        if p["clipped"]:
            ax.scatter([x], [y], marker="^", s=90, zorder=3, facecolors=face, edgecolors=color,
                       label=label + f" (above {FRONTIER_CLIP:g}x)")
            clipped.setdefault(x, []).append(f"{label} {p['ratio']:g}: {p['rel']:.3g}x")
            continue
        ax.scatter([x], [y], marker=marker, s=60, zorder=3, facecolors=face, edgecolors=color, label=label)
        ax.annotate(f"{p['ratio']:g}: {p['rel']:.2f}x", (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
    for method, (color, _, _) in styles.items():
        for rec in (False, True):
            line = sorted((p["size_mb"], p["y"]) for p in pts
                          if p["compress_method"] == method and p["recovery"] == rec and not p["clipped"])
            if len(line) > 1:
                ax.plot(*zip(*line), color=color, lw=1, ls="-" if rec else "--", alpha=0.6)
    ax.axhline(1.0, color="black", lw=0.8, ls=":")
    top = max([p["y"] for p in pts] + [1.5])
    if clipped:
        ax.axhline(FRONTIER_CLIP, color="grey", lw=0.8, ls="--")
        for x, texts in clipped.items():
            ax.annotate("\n".join(texts), (x, FRONTIER_CLIP), textcoords="offset points", xytext=(0, -14),
                        ha="center", va="top", fontsize=7, color="#1f3f77",
                        bbox=dict(boxstyle="round,pad=0.2", fc="white", ec="none", alpha=0.8))
        top = FRONTIER_CLIP
    ax.set_ylim(0.0, top * 1.06)
    xs = [p["size_mb"] for p in pts]
    if xs:
        pad = 0.12 * (max(xs) - min(xs) or max(xs))
        ax.set_xlim(min(xs) - pad, max(xs) + pad)
    uniq = dict(zip(*reversed(ax.get_legend_handles_labels())))
    if uniq:
        ax.legend(uniq.values(), uniq.keys(), fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_xlabel("model size (MiB, every stored tensor)")
    ax.set_ylabel("test perplexity / dense" + (f" (axis cut at {FRONTIER_CLIP:g}x)" if clipped else ""))
    ax.set_title(f"size / quality frontier ({res['config']['preset']}); labels: ratio: perplexity vs dense",
                 fontsize=10)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------
def compute_budget(cfg: BenchConfig, rows: list[str], model: nn.Module | None = None) -> dict[str, Any]:
    """The matched budgets (needs the model's layer shapes: loaded on the meta device when possible)."""
    if model is None:
        model = _shape_model(cfg.model)
    return budget_table(model, rows, cfg.target_rank, cfg.targets, cfg.alpha_ratio)


def _shape_model(name: str) -> nn.Module:
    """The architecture of `name` without its weights (meta device): enough for layer shapes."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .loading import MODEL_ALIASES, converted_folder

    folder = converted_folder(name) if name in MODEL_ALIASES else name
    try:
        config = AutoConfig.from_pretrained(folder)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except Exception:  # noqa: BLE001 - GGUF files, hub ids: load the real thing
        from .loading import load_model

        return load_model(name)[0]


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
    claim_work_dir(out, "benchmark")  # new/empty or ours; a foreign folder is refused (UsageError)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    rows = adaptation_rows(cfg, with_peft)
    if cfg.peft and not any(r in rows for r in PEFT_ROWS):
        log.warning("peft is not installed: the peft reference rows are left out")
    budget = compute_budget(cfg, rows, budget_model)
    if progress:
        _print_budget(budget)
    cells = plan_cells(cfg, budget, rows)
    results: dict[str, dict] = {}
    for c in cells:
        stored = load_cell(out, c)
        if stored is not None:
            results[c.id] = stored["result"]
    todo = [] if report_only else [c for c in select_cells(cells, only) if c.id not in results]
    if todo:
        runner = cell_runner if cell_runner is not None else CellRunner(cfg, progress=progress)
        env = environment(cfg.device)
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
                          "result": _jsonable(result), "seconds": time.perf_counter() - t0,
                          "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                          "device": env["device"], "device_name": env["device_name"],
                          "git_commit": env["git_commit"], "git_dirty": env["git_dirty"], "command": command,
                          "versions": env["versions"]}
                atomic_write_text(cell_path(out, c), json.dumps(record, indent=1) + "\n")
                results[c.id] = record["result"]
                if bar is not None:
                    bar.update(1)
                    bar.write(f"  {c.id}: " + _cell_line(record["result"]))
                # rebuild the tables after every cell (plots at the end), so an interrupted run has them
                write_report(cfg, out, cells, results, rows, budget, command, plots=False)
        finally:
            if bar is not None:
                bar.close()
    return write_report(cfg, out, cells, results, rows, budget, command, plots=plots)


def _cell_line(r: dict[str, Any]) -> str:
    parts = [f"test PPL {_f(_num(r.get('test_ppl')))}", f"LiM {_f(_num(r.get('lim_ppl')))}"]
    if r.get("tokens_per_s"):
        parts.append(f"{r['tokens_per_s']:.0f} train tok/s")
    if r.get("size_mb"):
        parts.append(f"{r['size_mb']:.1f} MiB")
    if r.get("seconds"):
        parts.append(f"{r['seconds']:.0f} s")
    return ", ".join(parts)


def _print_budget(budget: dict[str, Any]) -> None:
    print(f"matched budgets (LoRA at rank {budget['target_rank']}: {budget['lora_params_at_target']:,} "
          f"trainable parameters on {budget['n_layers']} layers):")
    for row, e in budget["rows"].items():
        print(f"  {row:<22} rank {e['rank']:>3}  {e['trainable_params']:>12,}  ({100 * e['vs_lora']:.1f}% of LoRA)")


def write_report(cfg: BenchConfig, out: Path, cells: list[Cell], results: dict[str, dict], rows: list[str],
                 budget: dict[str, Any], command: str | None = None, plots: bool = True) -> dict[str, Any]:
    """results.json, results.md (and with `plots` methods.png and frontier.png) from the stored cells."""
    agg = aggregate(cfg, cells, results, rows, budget)
    env = environment(cfg.device)
    cell_env = {}
    for c in cells:
        stored = load_cell(out, c)
        if stored is not None:
            cell_env[c.id] = {k: stored.get(k) for k in ("date", "device", "device_name", "git_commit", "git_dirty",
                                                          "seconds", "command", "versions")}
    devices = sorted({v["device_name"] for v in cell_env.values() if v.get("device_name")})
    if devices:
        env["device_name"] = " + ".join(devices)
        env["device"] = ", ".join(sorted({v["device"] for v in cell_env.values() if v.get("device")}))
    made_by = list(dict.fromkeys(v["command"] for v in cell_env.values() if v.get("command")))
    dates = sorted(v["date"] for v in cell_env.values() if v.get("date"))
    commits = list(dict.fromkeys(v["git_commit"] for v in cell_env.values() if v.get("git_commit")))
    res = {
        "schema_version": SCHEMA_VERSION,
        "preset": cfg.preset,
        "command": command,
        "commands": made_by,
        "cell_dates": [dates[0], dates[-1]] if dates else None,
        "cell_git_commits": commits,
        "cell_git_dirty": any(v.get("git_dirty") for v in cell_env.values()),
        "cell_versions": list({json.dumps(v["versions"], sort_keys=True): v["versions"]
                               for v in cell_env.values() if v.get("versions")}.values()),
        "config": cfg.to_dict(),
        # resolved per cell; a cell stored before the option existed used none
        "window_prefixes": sorted({str(results[c.id].get("window_prefix", "none")) for c in cells
                                   if c.id in results}),
        "environment": env,
        "budget": budget,
        "n_cells": len(cells),
        "cells": {c.id: {"kind": c.kind, "key": c.key, "spec": c.spec, "result": results[c.id],
                         **cell_env.get(c.id, {})} for c in cells if c.id in results},
        "pending": [c.id for c in cells if c.id not in results],
        **agg,
    }
    res = _jsonable(res)
    atomic_write_text(out / "results.json", json.dumps(res, indent=1) + "\n")
    atomic_write_text(out / "results.md", render_markdown(res))
    try:
        if plots:
            render_plots(res, out)
    except Exception as e:  # noqa: BLE001 - a plot must not lose the numbers
        log.warning("could not draw the plots: %s", e)
    return res


def list_cells(cfg: BenchConfig, out_dir: str | os.PathLike, with_peft: bool | None = None,
               budget_model: nn.Module | None = None) -> list[tuple[str, bool]]:
    """(cell id, done?) for every planned cell."""
    rows = adaptation_rows(cfg, with_peft)
    cells = plan_cells(cfg, compute_budget(cfg, rows, budget_model), rows)
    return [(c.id, load_cell(Path(out_dir), c) is not None) for c in cells]

