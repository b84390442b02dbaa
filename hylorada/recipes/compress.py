"""Compress a model, recover it, measure it and save it: the workflow behind `hylorada compress`.

    report = compress_model(model, CompressConfig(ratio=0.2), calibration=ids)   # compress/
    summary = recover_compressed(model, blocks, steps=200, loss="kd", teacher=dense)
    results = compress_and_save(model, tokenizer, config, CompressSettings(...))  # the whole run

`compress_and_save`, top to bottom: calibration blocks (before any perplexity, so too little
text is refused first) -> perplexity of the dense model -> compress_model -> perplexity ->
recovery (optional) -> perplexity -> sizes -> save_compressed with report.md, ranks.png and
results.json. The math of compression lives in hylorada/compress/; recovery adds the training
(hylorada/train.py) with the LM or the distillation loss (hylorada/losses.py).
Launched on N processes (`accelerate launch`, `torchrun`), every process compresses and
measures the same model, the recovery trains with DDP (each process a share of every batch),
and only the main process prints and writes (hylorada/utils/processes.py).
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .. import data, evaluate
from ..checkpoint import seed_everything
from ..compress import CompressConfig, compress_model, save_compressed
from ..compress.api import RECOVER_SCHEDULES, RECOVER_TARGETS
from ..compress.targets import factorized_layers, stored_size
from ..data import calibration_blocks
from ..config import METHODS, HyLoRADAConfig, option
from ..errors import UsageError
from ..layers import in_out_features
from ..losses import check_loss
from ..model import HyLoRADAModel
from ..train import COMPILE, TrainConfig, train
from ..utils.env import environment
from ..utils.processes import is_main_process, say

__all__ = ["recover_compressed", "compress_and_save", "CompressSettings", "RECOVER_SCHEDULES", "RECOVER_TARGETS"]


def recover_compressed(model: nn.Module, train_blocks: dict, *, method: str = "hylorada",
                       steps: int = 200, lora_rank: int = 8, lora_alpha: float | None = None,
                       schedule: str = "sequential", targets: str = "factors",
                       valid_blocks: dict | None = None, train_config: dict | None = None,
                       adapter_config: dict | None = None, loss: str = "lm",
                       kd_temperature: float = 1.0, teacher: nn.Module | None = None) -> dict:
    """Fine-tune a compressed model with adapters, merge them back and return a summary.

    targets="factors" (default): adapters wrap the `up` and `down` nn.Linear children of each
    FactorizedLinear, so merging writes into the factors and the layer KEEPS rank k (the size
    is unchanged). With schedule="sequential" (SVD-LLM) the up factors are adapted and merged
    first, then the down factors, ceil(steps/2) and floor(steps/2) steps; "joint" adapts both at
    once for `steps` steps. targets="layers": adapters wrap whole FactorizedLinear layers and the
    merge concatenates them, so each layer GROWS to rank k + lora_rank (the summary reports the
    size after merging either way). LoRaDA's attention temperature needs the query projection
    itself: use targets="layers" with it.

    train_blocks / valid_blocks: hylorada.data.pack_blocks dicts. `train_config`: extra
    hylorada.train.TrainConfig fields (batch_size, lr, ...); `adapter_config`: extra
    HyLoRADAConfig fields.

    loss: "lm" (next-token cross-entropy), "kd" (distil the `teacher`, the dense model, with
    T²·KL(p_teacher || p_student) at temperature `kd_temperature`) or "kd+lm" (their sum);
    hylorada/losses.py. Same steps and tokens whichever loss.
    """
    _check_recovery(method, steps, schedule, targets, loss, kd_temperature, teacher)
    layers = factorized_layers(model)
    if not layers:
        raise ValueError("recover_compressed: the model has no FactorizedLinear layer")
    acfg = dict(method=method, lora_rank=lora_rank,
                lora_alpha=float(lora_alpha if lora_alpha is not None else 2 * lora_rank))
    acfg.update(adapter_config or {})
    tcfg = {"loss": loss, "kd_temperature": kd_temperature, **(train_config or {})}
    state = _training_state(model)
    before = stored_size(model)
    summary: dict = {"method": method, "schedule": schedule if targets == "factors" else "joint",
                     "targets": targets, "lora_rank": lora_rank, "loss": loss,
                     "kd_temperature": kd_temperature, "phases": []}
    t0 = time.perf_counter()
    for phase, names, n_steps in recovery_phases(list(layers), steps, schedule, targets):
        names = _fitting(model, names, lora_rank, summary) if n_steps >= 1 else []
        if names:
            model, result = _train_and_merge(model, names, HyLoRADAConfig(**acfg),
                                             TrainConfig(**{"steps": n_steps, **tcfg}), train_blocks, valid_blocks,
                                             teacher)
            summary["phases"].append(_phase_summary(phase, names, n_steps, result))
    _restore_training_state(model, state)
    after = stored_size(model)
    summary.update(params_before=before[0], params_after=after[0], bytes_before=before[1],
                   bytes_after=after[1], seconds=time.perf_counter() - t0,
                   ranks_after={n: m.rank for n, m in factorized_layers(model).items()})
    return summary


def _check_recovery(method, steps, schedule, targets, loss, kd_temperature, teacher) -> None:
    """recover_compressed's arguments; ValueError naming the first bad one."""
    if schedule not in RECOVER_SCHEDULES:
        raise ValueError(f"schedule must be one of {RECOVER_SCHEDULES}, got {schedule!r}")
    if targets not in RECOVER_TARGETS:
        raise ValueError(f"targets must be one of {RECOVER_TARGETS}, got {targets!r}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    check_loss(loss, kd_temperature, "loss", "kd_temperature")
    if loss != "lm" and teacher is None:
        raise ValueError(f"loss={loss!r} needs the dense teacher model: teacher=...")
    if method == "lorada" and targets == "factors":
        raise ValueError("method='lorada' scales attention logits per head and needs the query "
                         "projection itself: use targets='layers'")


def recovery_phases(layers: list[str], steps: int, schedule: str, targets: str) -> list[tuple[str, list[str], int]]:
    """(phase, module names, steps) in order: "layers" (whole FactorizedLinear layers, `steps`);
    "up" then "down" factors, ceil(steps/2) and floor(steps/2) (sequential); "up+down" (joint)."""
    if targets == "layers":
        return [("layers", list(layers), steps)]
    if schedule == "sequential":
        return [("up", [f"{n}.up" for n in layers], (steps + 1) // 2),
                ("down", [f"{n}.down" for n in layers], steps // 2)]
    return [("up+down", [f"{n}.{c}" for n in layers for c in ("up", "down")], steps)]


def _fitting(model: nn.Module, names: list[str], lora_rank: int, summary: dict) -> list[str]:
    """The modules of `names` that can take a rank-`lora_rank` adapter; a factor of rank < r has
    nothing to add and is listed in summary["skipped_small_factors"]."""
    small = [n for n in names if min(in_out_features(model.get_submodule(n))) < lora_rank]
    if small:
        summary.setdefault("skipped_small_factors", []).extend(small)
    return [n for n in names if n not in small]


def _train_and_merge(model, names, adapter_config: HyLoRADAConfig, train_config: TrainConfig, train_blocks,
                     valid_blocks, teacher):
    """Adapters on `names`, trained (hylorada.train.train) and merged back: (model, TrainResult).
    The adapters' initial values are drawn after seeding torch with train_config.seed, so a
    recovery depends on its seed only, not on what ran before it in the process."""
    seed_everything(train_config.seed)
    wrapped = HyLoRADAModel(model, adapter_config, target_names=names)
    result = train(wrapped, train_blocks, valid_blocks, train_config, teacher=teacher)
    return wrapped.merge_and_unload(), result


def _phase_summary(phase: str, names: list[str], n_steps: int, result) -> dict:
    return {"phase": phase, "layers": len(names), "steps": n_steps,
            "first_loss": result.losses[0] if result.losses else None,
            "last_loss": result.losses[-1] if result.losses else None,
            "best_valid_loss": result.best_valid_loss, "train_time_s": result.train_time_s,
            "mean_tokens_per_s": result.mean_tokens_per_s}


def _training_state(model: nn.Module) -> tuple:
    """What training changes and recovery puts back: the mode, the device (the trainer may move
    the model to its accelerator) and each parameter's requires_grad."""
    return model.training, next(model.parameters()).device, {n: p.requires_grad for n, p in model.named_parameters()}


def _restore_training_state(model: nn.Module, state: tuple) -> None:
    was_training, device, grad_flags = state
    for n, p in model.named_parameters():
        p.requires_grad_(grad_flags.get(n, True))
    model.to(device)
    model.train(was_training)


def calibration_ids(tokenizer, corpora, label: str, n_blocks: int, seq_len: int, seed: int | None,
                    window_prefix: str = "auto"):
    """hylorada.data.calibration_blocks; too little text is a UsageError naming `--calib label`."""
    try:
        return calibration_blocks(tokenizer, corpora, n_blocks, seq_len, seed=seed, window_prefix=window_prefix)
    except ValueError as e:  # "<corpus> (train) has N blocks of L tokens, M asked"
        raise UsageError(f"--calib {label}: {e}; lower --calib-blocks or --calib-seq-len") from None


# ----------------------------------------------------------------------------- the whole run
@dataclass
class CompressSettings:
    """What `compress_and_save` does besides compressing (CompressConfig). Corpora are lists of
    DataSpecs or names; `eval=None` skips perplexity; `recover_steps=0` skips recovery. The
    fields with a help text are `hylorada compress` flags (EVAL_FIELDS, RECOVER_FIELDS)."""

    calib: list = field(default_factory=lambda: ["kjv"])
    calib_label: str = "kjv"  # how the user named the calibration corpora (in the error message)
    eval: list | None = field(default_factory=lambda: ["kjv", "shakespeare"])
    eval_seq_len: int = option(512, "perplexity window")
    max_eval_tokens: int = option(51200, "first N test tokens per corpus (0: all)")
    eval_batch_size: int = option(4, "perplexity windows per forward")
    window_prefix: str = option("auto", "start every calibration/recovery block and window with BOS: auto (when "
                                        "the tokenizer adds one), bos, none", choices=data.WINDOW_PREFIXES)
    recover_steps: int = option(0, "recovery optimizer steps (0: none)")
    recover_method: str = option("hylorada", "the recovery adapter", choices=METHODS)
    recover_data: list = field(default_factory=lambda: ["kjv"])
    recover_rank: int = option(8, "the recovery adapter's rank")
    recover_lr: float = option(2e-4, "recovery learning rate")
    recover_batch_size: int = option(16, "recovery blocks per step")
    recover_seq_len: int = option(256, "recovery block length")
    recover_schedule: str = option("sequential", "sequential: up factors then down factors (SVD-LLM); joint: "
                                                 "both at once", choices=RECOVER_SCHEDULES)
    recover_targets: str = option("factors", "factors: adapters on up/down (rank stays k); layers: on whole "
                                             "layers (rank k + r)", choices=RECOVER_TARGETS)
    recover_compile: str = option("auto", "torch.compile the recovery's training forward: auto (on CUDA), yes, "
                                          "no (TrainConfig.compile)", choices=COMPILE)
    seed: int = 0
    out: str | None = option(None, "output directory (default: do not save); an existing path is refused "
                                   "unless it is a previous hylorada output and --overwrite is given")
    overwrite: bool = option(False, "replace a previous hylorada output at --out (atomically, once the new one "
                                    "is complete)")
    progress: bool = True
    record: dict = field(default_factory=dict)  # results.json "argv" and "args" (the command's flags)


# the fields `hylorada compress` sets from its flags (hylorada/commands/compress.py)
EVAL_FIELDS = ("eval_seq_len", "max_eval_tokens", "eval_batch_size", "window_prefix")
RECOVER_FIELDS = ("recover_steps", "recover_method", "recover_rank", "recover_lr", "recover_batch_size",
                  "recover_seq_len", "recover_schedule", "recover_targets", "recover_compile")
SETTINGS_FIELDS = EVAL_FIELDS + RECOVER_FIELDS + ("out", "overwrite")  # of CompressSettings
POLICY = ("ratio", "energy", "alpha", "budget")  # of CompressConfig, one at most
COMPRESS_FIELDS = ("svd_solver", "whiten_method", "calib_precision", "dtype", "force", "rank_multiple",
                   "allocate", "calibrate", "update")
CALIB_FIELDS = ("calib_blocks", "calib_seq_len", "calib_batch_size", "seed")
CONFIG_FIELDS = ("method", *POLICY, *COMPRESS_FIELDS, *CALIB_FIELDS, "recover_loss", "kd_temperature")


class CompressRecipe:
    """The steps of one run; the model is compressed (and recovered) in place."""

    def __init__(self, model, tokenizer, config: CompressConfig, settings: CompressSettings, load_s: float = 0.0):
        self.model, self.tokenizer, self.config, self.s = model, tokenizer, config, settings
        self.timings: dict[str, float] = {"load_s": load_s}
        self.ppl: dict[str, dict] = {}
        self.window_prefix = data.resolve_window_prefix(tokenizer, settings.window_prefix)

    def calibration(self):
        """Calibration token ids (None when the config needs none); too little text is refused."""
        if not self.config.needs_calibration:
            return None
        s, t = self.s, time.perf_counter()
        ids = calibration_ids(self.tokenizer, s.calib, s.calib_label, self.config.calib_blocks,
                              self.config.calib_seq_len, s.seed, self.window_prefix)
        self.timings["calib_data_s"] = time.perf_counter() - t
        return ids

    def measure(self, stage: str) -> None:
        s = self.s
        if s.eval is None:
            return
        t = time.perf_counter()
        self.ppl[stage] = evaluate_corpora(self.model, self.tokenizer, s.eval, s.eval_seq_len, s.max_eval_tokens,
                                           s.eval_batch_size, s.progress and is_main_process(), self.window_prefix)
        self.timings[f"eval_{stage}_s"] = time.perf_counter() - t
        say(f"  perplexity {stage:>10}: " + ", ".join(f"{k} {v['ppl']:.3f}" for k, v in self.ppl[stage].items()))

    def compress(self, calibration):
        t = time.perf_counter()
        report = compress_model(self.model, self.config, calibration=calibration,
                                progress=self.s.progress and is_main_process())
        self.timings["compress_s"] = time.perf_counter() - t
        say(report.to_markdown())
        say(report.summary())
        return report

    def recover(self, teacher) -> dict:
        s = self.s
        blocks = recovery_blocks(self.tokenizer, s.recover_data, s.recover_seq_len, self.window_prefix)
        t = time.perf_counter()
        recovery = recover_compressed(
            self.model, blocks, method=s.recover_method, steps=s.recover_steps, lora_rank=s.recover_rank,
            schedule=s.recover_schedule, targets=s.recover_targets, loss=self.config.recover_loss,
            kd_temperature=self.config.kd_temperature, teacher=teacher,
            train_config={"batch_size": s.recover_batch_size, "lr": s.recover_lr, "progress": s.progress,
                          "seed": s.seed, "compile": s.recover_compile})
        self.timings["recover_s"] = time.perf_counter() - t
        say(f"  recovery: {recovery['method']} r={recovery['lora_rank']}, {s.recover_steps} steps "
              f"({recovery['schedule']}), size {recovery['bytes_before'] / 2**20:.1f} -> "
              f"{recovery['bytes_after'] / 2**20:.1f} MiB")
        return recovery

    def save(self, report, results: dict) -> None:
        extra = {"report.md": report.to_markdown(),
                 "results.json": json.dumps(evaluate.jsonable(results), indent=2, default=str)}
        png = report.ranks_png()  # rank / break-even per decoder layer and kind
        if png is not None:
            extra["ranks.png"] = png
        out = save_compressed(self.model, self.s.out, report=report, tokenizer=self.tokenizer,
                              overwrite=self.s.overwrite, extra=extra)
        say(f"  wrote {Path(out)}")


def compress_and_save(model, tokenizer, config: CompressConfig, settings: CompressSettings, *,
                      load_s: float = 0.0) -> dict:
    """The whole run (see the module doc); returns the results.json dict."""
    recipe = CompressRecipe(model, tokenizer, config, settings, load_s)
    calibration = recipe.calibration()  # before any perplexity: too little calibration text is refused first
    recipe.measure("dense")
    size_dense = evaluate.model_size(model).n_bytes
    recover = settings.recover_steps > 0
    teacher = copy.deepcopy(model) if recover and config.recover_loss != "lm" else None  # the dense model, for KD
    report = recipe.compress(calibration)
    recipe.measure("compressed")
    recovery = None
    if recover:
        recovery = recipe.recover(teacher)
        recipe.measure("recovered")
    size_after = evaluate.model_size(model).n_bytes
    say(f"  model size: {size_dense / 2**20:.1f} MiB dense -> {size_after / 2**20:.1f} MiB")
    results = {"command": "compress", "argv": settings.record.get("argv"), "args": settings.record.get("args"),
               "report": report.to_dict(), "window_prefix": recipe.window_prefix, "perplexity": recipe.ppl,
               "recovery": recovery, "size_bytes": {"dense": size_dense, "final": size_after},
               "timings": recipe.timings, "env": environment(str(next(model.parameters()).device))}
    if settings.out and is_main_process():  # launched on N processes: every one trains, the main one writes
        recipe.save(report, results)
    return results


def evaluate_corpora(model, tokenizer, corpora, seq_len: int, max_tokens: int | None,
                     batch_size: int = 4, progress: bool = False, window_prefix: str = "auto") -> dict[str, dict]:
    """{corpus: perplexity result dict} on the test split of each corpus."""
    bos_id = data.window_bos_id(tokenizer, window_prefix)
    out = {}
    for name in data.source_list(corpora):
        ids = data.eval_split(tokenizer, name, "test")[1]
        if max_tokens:
            ids = ids[:, :max_tokens]
        res = evaluate.perplexity(model, ids, seq_len, batch_size=batch_size, progress=progress,
                                  bos_id=bos_id).to_dict()
        res.pop("window_tokens", None)
        res.pop("window_nll", None)
        out[str(name)] = res
    return out


def recovery_blocks(tokenizer, corpora, seq_len: int, window_prefix: str = "auto") -> dict:
    """Training blocks (hylorada.data.training_blocks) of the train split of each corpus, concatenated."""
    bos_id = data.window_bos_id(tokenizer, window_prefix)
    parts = [data.training_blocks(tokenizer, n, "train", seq_len, bos_id=bos_id)[0] for n in data.source_list(corpora)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

