"""Trainer for adapters (and compression recovery) on packed causal-LM blocks.

The whole flow, top to bottom, in :func:`train`:

1. Freeze everything but the adapter (``model.trainable_parameters()``).
2. AdamW over ``model.parameter_groups(lr, weight_decay)`` (LoRA+ groups keep their own rates:
   the schedule is a ``LambdaLR`` factor applied to each group's own initial lr).
3. Per optimizer step, one *global batch* of ``batch_size x grad_accum`` blocks is drawn from a
   seeded per-epoch permutation; it is cut into ``grad_accum`` micro-batches of ``batch_size``
   blocks, and each micro-batch is split across the processes. The loss is the sum of token
   losses divided by the number of real target tokens in the whole global batch, so gradient
   accumulation and any number of processes give the gradient of one big batch.
4. Clip, step, schedule; evaluate every ``eval_every`` steps; checkpoint every ``save_every``
   steps (atomically: temp dir, fsync, rename) into ``out_dir/checkpoint-last`` and keep the best
   validation checkpoint in ``out_dir/checkpoint-best``.

Batch-size convention: ``batch_size`` is the GLOBAL micro-batch (blocks per forward summed over
all processes), the global batch per optimizer step is ``batch_size * grad_accum`` blocks, and
neither depends on the number of processes (each process gets ``batch_size / world_size`` blocks
per micro-batch; uneven splits are allowed, ``batch_size >= world_size`` is required).

Checkpoint layout (``checkpoint-last`` / ``checkpoint-best``)::

    adapter.safetensors   model.adapter_state_dict()
    optimizer.pt          optimizer.state_dict()        (torch.save; loaded with weights_only=True)
    scheduler.pt          scheduler.state_dict()        (idem)
    rng.pt                python/numpy/torch/cuda RNG states of every process (idem)
    trainer_state.json    step, data position (epoch, index), history, config  -- written last
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import HyloradaError, UsageError
from .losses import check_loss, kd_loss_sum

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
SCHEDULES = ("cosine", "linear", "constant")
MIXED_PRECISION = ("auto", "no", "bf16")
CHECKPOINT_LAST = "checkpoint-last"
CHECKPOINT_BEST = "checkpoint-best"
STATE_FILE = "trainer_state.json"
ADAPTER_FILE = "adapter.safetensors"
LOG_FILE = "train_log.jsonl"


class NonFiniteLossError(RuntimeError):
    """Raised when the loss (or the gradient norm) of a step is not finite.

    It is raised before the optimizer step, so the parameters are those of the previous step and
    the last checkpoint on disk is untouched.
    """

    def __init__(self, step: int, loss: float, what: str = "loss", checkpoint: str | None = None):
        self.step, self.loss, self.what, self.checkpoint = step, loss, what, checkpoint
        where = f"last good checkpoint: {checkpoint}" if checkpoint else "no checkpoint was written"
        super().__init__(
            f"non-finite {what} ({loss}) at step {step}; stopped before the optimizer step "
            f"(parameters are those after step {step - 1}; {where})")


# ----------------------------------------------------------------------------------------------
# configuration and result
# ----------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """Training hyper-parameters.

    steps           optimizer steps in total (a resumed run continues up to this number)
    batch_size      GLOBAL micro-batch in blocks (summed over processes; >= number of processes)
    grad_accum      micro-batches per optimizer step; global batch = batch_size * grad_accum
    lr              base learning rate (lora_A and scalars; lora_B gets lr * lora_plus_ratio
                    when the model's LoRA+ is on -- that is the model's parameter_groups' choice)
    weight_decay    AdamW weight decay for the low-rank factors (the "scalars" group gets 0)
    warmup_steps    linear warm-up: factor (s+1)/(warmup_steps+1) for step index s < warmup_steps
    schedule        "cosine" | "linear" | "constant" decay after warm-up, down to min_lr_ratio
    min_lr_ratio    final lr factor for cosine/linear
    max_grad_norm   clip the global gradient norm to this (None or 0: no clipping, norm logged)
    seed            seeds python/numpy/torch (+ process index) and the data order (not + index)
    eval_every      evaluate on the valid blocks every N steps and at the end (0: never)
    eval_batches    number of valid micro-batches (of batch_size blocks) per evaluation (None: all)
    save_every      write checkpoint-last every N steps (0: only at the end); needs out_dir
    out_dir         where checkpoints and train_log.jsonl go (None: nothing is written)
    resume          continue from out_dir/checkpoint-last if it exists (else start fresh)
    mixed_precision "auto" (bf16 autocast on CUDA with bf16 support, fp32 otherwise) | "no" | "bf16"
    log_every       write a train_log.jsonl line (and a log message) every N steps (0: never)
    progress        show a tqdm progress bar (main process only)
    shuffle         shuffle the blocks with a seeded permutation per epoch
    find_unused_parameters  for DDP; None: probe once with a forward/backward (distributed only)
    loss            "lm" (next-token cross-entropy) | "kd" | "kd+lm": distillation from the
                    `teacher` given to train() (hylorada/losses.py); validation stays the LM loss
    kd_temperature  T of the distillation softmax (the KL is scaled by T²)
    """

    steps: int = 100
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.0
    max_grad_norm: float | None = 1.0
    seed: int = 0
    eval_every: int = 0
    eval_batches: int | None = None
    save_every: int = 0
    out_dir: str | None = None
    resume: bool = False
    mixed_precision: str = "auto"
    log_every: int = 10
    progress: bool = True
    shuffle: bool = True
    find_unused_parameters: bool | None = None
    loss: str = "lm"
    kd_temperature: float = 1.0

    def __post_init__(self) -> None:
        def bad(name: str, allowed: str) -> None:
            raise UsageError(f"TrainConfig.{name}={getattr(self, name)!r} is invalid: allowed {allowed}")

        def is_int(x: Any) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        def is_num(x: Any) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

        for name in ("steps", "batch_size", "grad_accum"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 1:
                bad(name, "an integer >= 1")
        for name in ("warmup_steps", "eval_every", "save_every", "log_every", "seed"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 0:
                bad(name, "an integer >= 0")
        if not is_num(self.lr) or self.lr <= 0:
            bad("lr", "a finite number > 0")
        if not is_num(self.weight_decay) or self.weight_decay < 0:
            bad("weight_decay", "a finite number >= 0")
        if self.schedule not in SCHEDULES:
            bad("schedule", f"one of {list(SCHEDULES)}")
        if not is_num(self.min_lr_ratio) or not 0.0 <= self.min_lr_ratio <= 1.0:
            bad("min_lr_ratio", "a number in [0, 1]")
        if self.max_grad_norm is not None and (not is_num(self.max_grad_norm) or self.max_grad_norm < 0):
            bad("max_grad_norm", "None or a finite number >= 0 (0 or None: no clipping)")
        if self.eval_batches is not None and (not is_int(self.eval_batches) or self.eval_batches < 1):
            bad("eval_batches", "None (all valid blocks) or an integer >= 1")
        if self.mixed_precision not in MIXED_PRECISION:
            bad("mixed_precision", f"one of {list(MIXED_PRECISION)}")
        if self.resume and not self.out_dir:
            bad("resume", "False unless out_dir is set (checkpoints live in out_dir)")
        for name in ("resume", "progress", "shuffle"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "True or False")
        if self.out_dir is not None:
            if not isinstance(self.out_dir, (str, os.PathLike)) or str(self.out_dir) == "":
                bad("out_dir", "None or a folder path")
            self.out_dir = str(self.out_dir)
        if self.find_unused_parameters not in (None, True, False):
            bad("find_unused_parameters", "None (auto), True or False")
        check_loss(self.loss, self.kd_temperature, "TrainConfig.loss", "TrainConfig.kd_temperature")

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TrainResult:
    """What a run did. Per-step lists cover every step since step 1 (restored on resume)."""

    steps: int = 0
    start_step: int = 0
    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    tokens_per_s: list[float] = field(default_factory=list)
    valid_losses: list[dict[str, float]] = field(default_factory=list)
    best_valid_loss: float | None = None
    best_step: int | None = None
    tokens_seen: int = 0
    target_tokens_seen: int = 0
    wall_time_s: float = 0.0
    train_time_s: float = 0.0
    mean_tokens_per_s: float = 0.0
    world_size: int = 1
    mixed_precision: str = "no"
    out_dir: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------
# loss
# ----------------------------------------------------------------------------------------------
def _upcast(logits: torch.Tensor) -> torch.Tensor:
    """Half-precision logits (bf16 autocast) are scored in fp32; fp32/fp64 are kept."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def _targets(labels: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Shifted targets [b, L-1]: position t is predicted from logits at t-1; padding -> -100."""
    if attention_mask is not None:
        labels = labels.masked_fill(attention_mask == 0, IGNORE_INDEX)
    return labels[:, 1:]


def token_losses(logits: torch.Tensor, labels: torch.Tensor,
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-position NLL [b, L-1] in fp32 or better (logits at t score labels at t+1); 0 where ignored.

    A position is ignored when its label is -100 or its attention_mask is 0 (padding).
    """
    targets = _targets(labels, attention_mask)
    logits = _upcast(logits[:, :-1])
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                          ignore_index=IGNORE_INDEX, reduction="none")
    return nll.view(targets.shape)


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor,
                       attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """(sum of token NLLs over real targets, number of real targets); padding never counts."""
    targets = _targets(labels, attention_mask)
    logits = _upcast(logits[:, :-1])
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                            ignore_index=IGNORE_INDEX, reduction="sum")
    return total, int((targets != IGNORE_INDEX).sum())


def count_targets(labels: torch.Tensor, attention_mask: torch.Tensor | None = None) -> int:
    return int((_targets(labels, attention_mask) != IGNORE_INDEX).sum())


def step_loss_sum(config: TrainConfig, logits: torch.Tensor, mb: dict[str, torch.Tensor],
                  teacher: nn.Module | None, autocast=contextlib.nullcontext) -> torch.Tensor:
    """Sum over the micro-batch's target tokens of config.loss (hylorada/losses.py); the
    teacher's forward runs under `autocast()` (the student's precision)."""
    lm, _ = causal_lm_loss_sum(logits, mb["labels"], mb["attention_mask"])
    if config.loss == "lm":
        return lm
    with torch.no_grad(), autocast():
        t_logits = _logits(teacher(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"],
                                   use_cache=False))
    kd, _ = kd_loss_sum(logits, t_logits, mb["labels"], mb["attention_mask"], config.kd_temperature)
    return kd if config.loss == "kd" else kd + lm.to(kd.dtype)


def _clear_grads(params: list[nn.Parameter]) -> None:
    """p.grad = None for every trainable parameter (the trainer owns the gradients)."""
    for p in params:
        p.grad = None


def _logits(output: Any) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output[0]


# ----------------------------------------------------------------------------------------------
# optimizer and schedule
# ----------------------------------------------------------------------------------------------
def freeze_base(model: nn.Module) -> list[nn.Parameter]:
    """requires_grad = True exactly for model.trainable_parameters(); returns them."""
    trainable = list(model.trainable_parameters())
    if not trainable:
        raise ValueError("the model has no trainable (adapter) parameters")
    ids = {id(p) for p in trainable}
    for p in model.parameters():
        p.requires_grad_(id(p) in ids)
    return trainable


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over model.parameter_groups(lr, weight_decay) (group "name" keys and LoRA+ lrs kept)."""
    groups = [dict(g) for g in model.parameter_groups(config.lr, config.weight_decay)]
    groups = [g for g in groups if len(list(g["params"])) > 0]
    for g in groups:
        g["params"] = list(g["params"])
    covered = {id(p) for g in groups for p in g["params"]}
    missing = [n for n, p in model.named_trainable_parameters() if id(p) not in covered]
    if missing:
        raise ValueError(f"parameter_groups() does not cover trainable parameters {missing[:5]}")
    return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)


def lr_factor(step: int, config: TrainConfig) -> float:
    """LR multiplier for the update of step index `step` (0-based: the update that makes step+1)."""
    w = config.warmup_steps
    if step < w:
        return (step + 1) / (w + 1)
    if config.schedule == "constant" or config.steps <= w:
        return 1.0
    progress = min(1.0, (step - w) / (config.steps - w))
    m = config.min_lr_ratio
    if config.schedule == "linear":
        return m + (1.0 - m) * (1.0 - progress)
    return m + (1.0 - m) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR: each group's lr = its own initial lr x lr_factor(step) (LoRA+ ratios survive)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config))


def _base_group(optimizer: torch.optim.Optimizer) -> dict:
    for g in optimizer.param_groups:
        if g.get("name") == "lora_A":
            return g
    return optimizer.param_groups[0]


# ----------------------------------------------------------------------------------------------
# seeding, RNG states, data order
# ----------------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def rng_state() -> dict[str, Any]:
    """RNG states as tensors and plain numbers (loadable with torch.load(weights_only=True))."""
    version, py_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": int(version), "state": torch.tensor(py_state, dtype=torch.int64),
                   "gauss": gauss},
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"],
                         npy["has_gauss"], npy["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class BlockSampler:
    """Deterministic stream of block indices: a seeded permutation per epoch.

    The position is (epoch, index): the next block is permutation(epoch)[index]. A global batch
    that runs past the end of an epoch continues with the next epoch's permutation.
    """

    def __init__(self, n_blocks: int, seed: int, shuffle: bool = True, epoch: int = 0, index: int = 0):
        if n_blocks < 1:
            raise ValueError("no training blocks")
        self.n, self.seed, self.shuffle = n_blocks, seed, shuffle
        self.epoch, self.index = epoch, index
        self._perm: tuple[int, torch.Tensor] | None = None

    def permutation(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                perm = torch.randperm(self.n, generator=g)
            else:
                perm = torch.arange(self.n)
            self._perm = (epoch, perm)
        return self._perm[1]

    def take(self, count: int) -> torch.Tensor:
        out = []
        while count > 0:
            if self.index >= self.n:
                self.epoch, self.index = self.epoch + 1, 0
            k = min(count, self.n - self.index)
            out.append(self.permutation(self.epoch)[self.index:self.index + k])
            self.index += k
            count -= k
        return torch.cat(out)


# ----------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------
def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.adapter_state_dict().items()}


def write_checkpoint(out_dir: str | Path, name: str, *, model: nn.Module, optimizer, scheduler,
                     rng_states: list[dict], state: dict[str, Any]) -> Path:
    """Write out_dir/name atomically: temp dir, fsync every file and the dir, then rename.

    An existing checkpoint is first renamed to ``.old-<name>`` and removed after the swap; if the
    process dies between the two renames, :func:`find_checkpoint` falls back to the old one.
    ``trainer_state.json`` is written last: a directory without it is never used.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    final, tmp, old = out / name, out / f".tmp-{name}", out / f".old-{name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(_adapter_tensors(model), str(tmp / ADAPTER_FILE),
              metadata={"format": "pt", "step": str(state["step"])})
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save({"ranks": rng_states}, tmp / "rng.pt")
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")
    for f in tmp.iterdir():
        _fsync_file(f)
    _fsync_dir(tmp)
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_dir(out)
    if old.exists():
        shutil.rmtree(old)
    return final


def find_checkpoint(out_dir: str | Path, name: str = CHECKPOINT_LAST) -> Path | None:
    """The complete checkpoint `name` in out_dir (or its `.old-` copy after a crash mid-swap)."""
    for cand in (Path(out_dir) / name, Path(out_dir) / f".old-{name}"):
        if (cand / STATE_FILE).is_file() and (cand / ADAPTER_FILE).is_file():
            return cand
    return None


def refuse_overwriting_checkpoints(out_dir: str | Path) -> None:
    """UsageError when `out_dir` holds a checkpoint and the run was not asked to resume: a fresh
    run would overwrite it step by step."""
    found = [n for n in (CHECKPOINT_LAST, CHECKPOINT_BEST) if find_checkpoint(out_dir, n) is not None]
    if found:
        from .errors import UsageError

        step = read_checkpoint_state(find_checkpoint(out_dir, found[0])).get("step")
        raise UsageError(f"out_dir {out_dir}: holds {' and '.join(found)} (step {step}) of a previous run; "
                         "resume it (--resume, TrainConfig.resume=True) or choose another output folder")


def read_checkpoint_state(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / STATE_FILE).read_text())


def load_adapter_checkpoint(model: nn.Module, path: str | Path) -> dict[str, Any]:
    """Load the adapter weights of a checkpoint dir into `model`; returns its trainer state."""
    model.load_adapter_state_dict(read_checkpoint_file(Path(path) / ADAPTER_FILE, lambda p: load_file(str(p))))
    return read_checkpoint_file(Path(path) / STATE_FILE, lambda p: json.loads(p.read_text()))


def _torch_load(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


def read_checkpoint_file(path: Path, reader: Callable[[Path], Any]) -> Any:
    """reader(path), with a damaged file (truncated, garbage, not our format) reported as a
    HyloradaError that names it instead of the reader's own error ("Unsupported operand 148")."""
    import pickle

    from safetensors import SafetensorError

    try:
        return reader(path)
    except (SafetensorError, pickle.UnpicklingError, RuntimeError, EOFError, ValueError, KeyError, OSError) as e:
        raise HyloradaError(f"checkpoint file {path} is damaged or not a checkpoint ({type(e).__name__}: "
                            f"{' '.join(str(e).split())[:200]}); move {path.parent} away to restart from "
                            "an older checkpoint or from step 0") from e


# ----------------------------------------------------------------------------------------------
# the trainer
# ----------------------------------------------------------------------------------------------
def _resolve_precision(mode: str, device: torch.device) -> bool:
    if mode == "bf16":
        return True
    if mode == "no":
        return False
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def _probe_unused(model: nn.Module, blocks: dict[str, torch.Tensor], device: torch.device,
                  trainable: list[nn.Parameter]) -> bool:
    """One forward/backward on one block (RNG untouched): do some trainable params get no grad?"""
    devices = [torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        out = _logits(model(input_ids=blocks["input_ids"][:1].to(device),
                            attention_mask=blocks["attention_mask"][:1].to(device), use_cache=False))
        out.float().sum().backward()
    unused = any(p.grad is None for p in trainable)
    for p in trainable:
        p.grad = None
    return unused


def _make_accelerator(config: TrainConfig, unused: bool | None):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    handler = DistributedDataParallelKwargs(find_unused_parameters=bool(unused))
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no", kwargs_handlers=[handler])


def train(model: nn.Module, train_blocks: dict[str, torch.Tensor],
          valid_blocks: dict[str, torch.Tensor] | None, config: TrainConfig,
          accelerator=None, callback: Callable[[int, dict[str, Any]], None] | None = None,
          teacher: nn.Module | None = None) -> TrainResult:
    """Train the adapter parameters of `model` (a HyLoRADAModel or anything with its API).

    train_blocks / valid_blocks: dicts of [n, L] tensors input_ids, attention_mask, labels
    (hylorada.data.pack_blocks). `accelerator`: an accelerate.Accelerator (created when None;
    a created one is ended at the end of a distributed run -- pass your own to keep it).
    `callback(step, metrics)` runs on every process after each step (after eval and
    checkpointing); raising in it stops the run (e.g. optuna pruning).
    Raises NonFiniteLossError before the optimizer step of a step whose loss is not finite.
    `teacher`: the model distilled from when config.loss is "kd" or "kd+lm" (frozen, eval mode,
    moved to the training device).
    """
    if config.loss != "lm" and teacher is None:
        raise UsageError(f"TrainConfig.loss={config.loss!r} needs a teacher model: train(..., teacher=dense)")
    t_start = time.perf_counter()
    owns_accelerator = accelerator is None
    core = model
    trainable = freeze_base(core)
    for key in ("input_ids", "attention_mask", "labels"):
        if key not in train_blocks:
            raise ValueError(f"train_blocks lacks '{key}' (expected hylorada.data.pack_blocks output)")
    n_train = int(train_blocks["input_ids"].shape[0])

    if accelerator is None:
        from accelerate import PartialState

        state0 = PartialState(cpu=not torch.cuda.is_available())
        unused = config.find_unused_parameters
        if unused is None and state0.num_processes > 1:
            unused = _probe_unused(core, train_blocks, state0.device, trainable)
        accelerator = _make_accelerator(config, unused)
    elif accelerator.num_processes > 1 and accelerator.ddp_handler is None:
        from accelerate.utils import DistributedDataParallelKwargs

        unused = config.find_unused_parameters
        if unused is None:
            unused = _probe_unused(core, train_blocks, accelerator.device, trainable)
        accelerator.ddp_handler = DistributedDataParallelKwargs(find_unused_parameters=bool(unused))
    if accelerator.gradient_accumulation_steps != 1:
        raise ValueError("set grad_accum in TrainConfig, not gradient_accumulation_steps in the Accelerator")
    if accelerator.mixed_precision == "fp16":
        raise ValueError("fp16 is not supported (use mixed_precision='bf16' in TrainConfig)")
    world, rank, is_main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    device = accelerator.device
    if config.batch_size < world:
        raise UsageError(f"TrainConfig.batch_size={config.batch_size} is the GLOBAL micro-batch: it must be "
                         f">= the number of processes ({world})")
    use_bf16 = _resolve_precision(config.mixed_precision, device)
    out_dir = Path(config.out_dir) if config.out_dir else None

    core.to(device)
    if teacher is not None and config.loss != "lm":
        teacher.to(device).eval().requires_grad_(False)
    _clear_grads(trainable)  # a stray backward before train() must not leak into step 1
    optimizer = build_optimizer(core, config)
    scheduler = build_scheduler(optimizer, config)
    sampler = BlockSampler(n_train, config.seed, config.shuffle)
    result = TrainResult(world_size=world, mixed_precision="bf16" if use_bf16 else "no",
                         out_dir=str(out_dir) if out_dir else None)
    seed_everything(config.seed + rank)

    # ---- resume --------------------------------------------------------------------------
    step = 0
    if out_dir is not None and not config.resume:
        refuse_overwriting_checkpoints(out_dir)
    ckpt = find_checkpoint(out_dir) if (config.resume and out_dir) else None
    if config.resume and ckpt is None:
        logger.info("resume=True but no checkpoint in %s: starting from step 0", out_dir)
    if ckpt is not None:
        st = load_adapter_checkpoint(core, ckpt)
        optimizer.load_state_dict(read_checkpoint_file(ckpt / "optimizer.pt", _torch_load))
        scheduler.load_state_dict(read_checkpoint_file(ckpt / "scheduler.pt", _torch_load))
        rngs = read_checkpoint_file(ckpt / "rng.pt", lambda p: _torch_load(p)["ranks"])
        if len(rngs) == world:
            set_rng_state(rngs[rank])
        else:
            logger.warning("checkpoint has RNG states of %d processes, running %d: reseeding", len(rngs), world)
            seed_everything(config.seed + rank + st["step"])
        old = st.get("config", {})
        for key in ("batch_size", "grad_accum", "seed", "lr", "schedule", "steps", "warmup_steps"):
            if key in old and old[key] != getattr(config, key):
                logger.warning("resuming with %s=%r, the checkpoint was written with %r", key,
                               getattr(config, key), old[key])
        if st.get("n_train_blocks") not in (None, n_train):
            logger.warning("resuming on %d training blocks, the checkpoint saw %d", n_train, st["n_train_blocks"])
        step = int(st["step"])
        # the lr of the next update under THIS config's schedule (identical when unchanged; right
        # when e.g. `steps` was raised to extend a finished run)
        for g, base_lr in zip(optimizer.param_groups, scheduler.base_lrs):
            g["lr"] = base_lr * lr_factor(step, config)
        scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
        sampler.epoch, sampler.index = int(st["epoch"]), int(st["index"])
        h = st.get("history", {})
        result.losses, result.lrs = list(h.get("losses", [])), list(h.get("lrs", []))
        result.grad_norms, result.tokens_per_s = list(h.get("grad_norms", [])), list(h.get("tokens_per_s", []))
        result.valid_losses = list(h.get("valid_losses", []))
        result.tokens_seen, result.target_tokens_seen = int(st.get("tokens_seen", 0)), int(st.get("target_tokens_seen", 0))
        result.best_valid_loss, result.best_step = st.get("best_valid_loss"), st.get("best_step")
        if is_main:
            logger.info("resumed from %s at step %d (epoch %d, index %d)", ckpt, step, sampler.epoch, sampler.index)
    result.start_step = step
    tokens_at_start = result.tokens_seen
    last_good = str(ckpt) if ckpt is not None else None

    ddp_model = accelerator.prepare_model(core)
    if world > 1 and is_main:
        handler = accelerator.ddp_handler
        logger.info("DDP over %d processes (%s), find_unused_parameters=%s", world, accelerator.distributed_type,
                    getattr(handler, "find_unused_parameters", False))
    was_training = core.training
    core.train()

    def autocast():
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16)

    def shard(idx: torch.Tensor, blocks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        mine = torch.tensor_split(idx, world)[rank]
        return {k: blocks[k][mine].to(device, non_blocking=True)
                for k in ("input_ids", "attention_mask", "labels")}

    def trainer_state() -> dict[str, Any]:
        return {"step": step, "epoch": sampler.epoch, "index": sampler.index, "world_size": world,
                "n_train_blocks": n_train, "tokens_seen": result.tokens_seen,
                "target_tokens_seen": result.target_tokens_seen,
                "best_valid_loss": result.best_valid_loss, "best_step": result.best_step,
                "config": config.to_dict(),
                "history": {"losses": result.losses, "lrs": result.lrs, "grad_norms": result.grad_norms,
                            "tokens_per_s": result.tokens_per_s, "valid_losses": result.valid_losses}}

    def save(name: str) -> str | None:
        states = [rng_state()]
        if world > 1:
            from accelerate.utils import gather_object

            states = gather_object(states)
        if out_dir is None:
            return None
        if is_main:
            write_checkpoint(out_dir, name, model=core, optimizer=optimizer, scheduler=scheduler,
                             rng_states=states, state=trainer_state())
        accelerator.wait_for_everyone()
        return str(out_dir / name)

    def log_line(record: dict[str, Any]) -> None:
        if is_main and out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            with open(out_dir / LOG_FILE, "a") as fh:
                fh.write(json.dumps(record) + "\n")

    @torch.no_grad()
    def evaluate() -> float:
        core.eval()
        n_valid = int(valid_blocks["input_ids"].shape[0])
        n_batches = math.ceil(n_valid / config.batch_size)
        if config.eval_batches is not None:
            n_batches = min(n_batches, config.eval_batches)
        total = torch.zeros(2, dtype=torch.float64, device=device)
        for b in range(n_batches):
            idx = torch.arange(b * config.batch_size, min(n_valid, (b + 1) * config.batch_size))
            mb = shard(idx, valid_blocks)
            if mb["input_ids"].shape[0] == 0:
                continue
            with autocast():
                logits = _logits(core(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"],
                                      use_cache=False))
            s, n = causal_lm_loss_sum(logits, mb["labels"], mb["attention_mask"])
            total += torch.stack([s.double(), torch.tensor(float(n), dtype=torch.float64, device=device)])
        if world > 1:
            total = accelerator.reduce(total, reduction="sum")
        core.train()
        return float(total[0] / total[1].clamp_min(1))

    bar = None
    if is_main and config.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, initial=step, desc="train", dynamic_ncols=True)
    clip = config.max_grad_norm if config.max_grad_norm else float("inf")
    try:
        while step < config.steps:
            t0 = time.perf_counter()
            idx = sampler.take(config.global_batch)
            n_targets = count_targets(train_blocks["labels"][idx], train_blocks["attention_mask"][idx])
            n_tokens = int(train_blocks["attention_mask"][idx].sum())
            scale = world / max(n_targets, 1)  # DDP averages over processes: undo, then / global targets
            local_sum = torch.zeros((), dtype=torch.float64, device=device)
            for j in range(config.grad_accum):
                mb = shard(idx[j * config.batch_size:(j + 1) * config.batch_size], train_blocks)
                sync = j == config.grad_accum - 1
                ctx = contextlib.nullcontext() if sync else accelerator.no_sync(ddp_model)
                with ctx:
                    with autocast():
                        logits = _logits(ddp_model(input_ids=mb["input_ids"],
                                                   attention_mask=mb["attention_mask"], use_cache=False))
                    s = step_loss_sum(config, logits, mb, teacher, autocast)
                    accelerator.backward(s * scale)
                local_sum += s.detach().double()
            total = accelerator.reduce(local_sum, reduction="sum") if world > 1 else local_sum
            loss = float(total) / max(n_targets, 1)
            lr = float(_base_group(optimizer)["lr"])  # the rates this update uses
            group_lrs = {g.get("name", str(i)): float(g["lr"]) for i, g in enumerate(optimizer.param_groups)}
            if not math.isfinite(loss):
                raise NonFiniteLossError(step + 1, loss, "loss", last_good)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, clip))
            if not math.isfinite(grad_norm):
                raise NonFiniteLossError(step + 1, grad_norm, "gradient norm", last_good)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            dt = time.perf_counter() - t0
            result.train_time_s += dt
            tps = n_tokens / dt if dt > 0 else 0.0
            result.losses.append(loss)
            result.lrs.append(lr)
            result.grad_norms.append(grad_norm)
            result.tokens_per_s.append(tps)
            result.tokens_seen += n_tokens
            result.target_tokens_seen += n_targets
            metrics: dict[str, Any] = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                                       "tokens_per_s": tps, "tokens_seen": result.tokens_seen,
                                       "group_lrs": group_lrs}
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:.0f}")
            if config.log_every and (step % config.log_every == 0 or step == config.steps):
                log_line({k: v for k, v in metrics.items() if k != "group_lrs"})
                if is_main and bar is None:
                    logger.info("step %d/%d loss %.4f lr %.3e grad %.3f %.0f tok/s", step, config.steps,
                                loss, lr, grad_norm, tps)
            if valid_blocks is not None and config.eval_every and (
                    step % config.eval_every == 0 or step == config.steps):
                vloss = evaluate()
                metrics["valid_loss"] = vloss
                result.valid_losses.append({"step": step, "loss": vloss})
                log_line({"step": step, "valid_loss": vloss})
                if is_main:
                    msg = f"step {step}: valid loss {vloss:.4f} (ppl {math.exp(min(vloss, 50)):.2f})"
                    (bar.write if bar is not None else logger.info)(msg)
                if result.best_valid_loss is None or vloss < result.best_valid_loss:
                    result.best_valid_loss, result.best_step = vloss, step
                    if out_dir is not None:
                        save(CHECKPOINT_BEST)
            if out_dir is not None and ((config.save_every and step % config.save_every == 0)
                                        or step == config.steps):
                last_good = save(CHECKPOINT_LAST) or last_good
            if callback is not None:
                callback(step, metrics)
    finally:
        _clear_grads(trainable)  # after a NonFiniteLossError the NaN/inf grads must not stay
        if bar is not None:
            bar.close()
        core.train(was_training)
    result.steps = step
    result.wall_time_s = time.perf_counter() - t_start
    run_tokens = result.tokens_seen - tokens_at_start
    result.mean_tokens_per_s = run_tokens / result.train_time_s if result.train_time_s > 0 else 0.0
    accelerator.wait_for_everyone()
    if owns_accelerator and world > 1:
        accelerator.end_training()
    return result
