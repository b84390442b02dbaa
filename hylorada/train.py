"""Trainer for adapters (and compression recovery) on packed causal-LM blocks.

`train(model, train_blocks, valid_blocks, config)` builds a :class:`Trainer` and runs it
(`TrainConfig` lives in hylorada/config.py with the adapter config, and is importable from here):

1. Freeze everything but the adapter (``model.trainable_parameters()``).
2. AdamW over ``model.parameter_groups(lr, weight_decay)`` (LoRA+ groups keep their own rates:
   the schedule is a ``LambdaLR`` factor applied to each group's own initial lr).
3. Per optimizer step, one *global batch* of ``batch_size x grad_accum`` blocks is drawn from a
   seeded per-epoch permutation; it is cut into ``grad_accum`` micro-batches of ``batch_size``
   blocks, and each micro-batch is split across the processes. The loss is the sum of token
   losses divided by the number of real target tokens in the whole global batch, so gradient
   accumulation and any number of processes give the gradient of one big batch.
4. Clip, step, schedule; evaluate every ``eval_every`` steps; checkpoint every ``save_every``
   steps into ``out_dir/checkpoint-last`` and keep the best validation checkpoint in
   ``out_dir/checkpoint-best`` (hylorada/checkpoint.py: layout, atomic write, safe read).

Batch-size convention: ``batch_size`` is the GLOBAL micro-batch (blocks per forward summed over
all processes), the global batch per optimizer step is ``batch_size * grad_accum`` blocks, and
neither depends on the number of processes (each process gets ``batch_size / world_size`` blocks
per micro-batch; uneven splits are allowed, ``batch_size >= world_size`` is required).
The processes are DDP's (accelerate's prepare_model), or FSDP1's when accelerate is configured
for it: then the clip norm is FSDP's global one, every rank evaluates every batch through the
wrapped model, and out_dir is refused (docs/DISTRIBUTED.md "FSDP in the trainer").
"""
from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .checkpoint import (CHECKPOINT_BEST, CHECKPOINT_LAST, BlockSampler, find_checkpoint, load_adapter_checkpoint,
                         load_training_state, refuse_overwriting_checkpoints, rng_state, seed_everything,
                         set_rng_state, write_checkpoint)
from .config import COMPILE, MIXED_PRECISION, SCHEDULES, TrainConfig

__all__ = ["COMPILE", "MIXED_PRECISION", "SCHEDULES", "NonFiniteLossError", "Trainer", "TrainConfig", "TrainResult", "train"]
from .errors import UsageError
from .losses import causal_lm_loss_sum, count_targets, logits_of, step_loss_sum
from .optim import base_group, build_optimizer, build_scheduler, clear_grads, freeze_base
from .nn.compile import compile_forward, is_fsdp

logger = logging.getLogger(__name__)

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
    compiled: bool = False
    out_dir: str | None = None

    HISTORY = ("losses", "lrs", "grad_norms", "tokens_per_s", "valid_losses")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def history(self) -> dict[str, list]:
        """The per-step lists, as a checkpoint's trainer_state.json stores them."""
        return {k: getattr(self, k) for k in self.HISTORY}

    def restore(self, state: dict[str, Any]) -> None:
        """Per-step lists, token counters and best validation from a trainer_state.json."""
        for k in self.HISTORY:
            setattr(self, k, list(state.get("history", {}).get(k, [])))
        self.tokens_seen, self.target_tokens_seen = int(state.get("tokens_seen", 0)), int(state.get("target_tokens_seen", 0))
        self.best_valid_loss, self.best_step = state.get("best_valid_loss"), state.get("best_step")


# ----------------------------------------------------------------------------------------------
# the trainer
# ----------------------------------------------------------------------------------------------
def _resolve_precision(mode: str, device: torch.device) -> bool:
    if mode == "bf16":
        return True
    if mode == "no":
        return False
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def _resolve_compile(mode: str, backend: str, device: torch.device) -> bool:
    """compile 'yes', or 'auto' on CUDA (eager stays the CPU reference); the backend is checked
    here, before any step, rather than at the first forward."""
    on = mode == "yes" or (mode == "auto" and device.type == "cuda")
    if on and backend not in torch.compiler.list_backends(exclude_tags=()):
        raise UsageError(f"TrainConfig.compile_backend={backend!r} is invalid: allowed one of "
                         f"{torch.compiler.list_backends(exclude_tags=())}")
    return on


def _probe_unused(model: nn.Module, blocks: dict[str, torch.Tensor], device: torch.device,
                  trainable: list[nn.Parameter]) -> bool:
    """One forward/backward on one block (RNG untouched): do some trainable params get no grad?
    Moves `model` to `device` first (the trainer would next): the probe runs where training will."""
    model.to(device)
    devices = [torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        out = logits_of(model(input_ids=blocks["input_ids"][:1].to(device),
                              attention_mask=blocks["attention_mask"][:1].to(device), use_cache=False))
        out.float().sum().backward()
    unused = any(p.grad is None for p in trainable)
    clear_grads(trainable)
    return unused


def _accelerator(accelerator, config: TrainConfig, model: nn.Module, blocks: dict[str, torch.Tensor],
                 trainable: list[nn.Parameter]):
    """`accelerator`, or a new one in fp32 (autocast is the trainer's). DDP's find_unused_parameters
    is the config's, or probed when None on a distributed run; an accelerator's own is kept."""
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DistributedDataParallelKwargs, DistributedType

    state = accelerator if accelerator is not None else PartialState(cpu=not torch.cuda.is_available())
    needs_handler = (state.num_processes > 1 and getattr(accelerator, "ddp_handler", None) is None
                     and state.distributed_type != DistributedType.FSDP)  # FSDP has no unused-parameter mode
    unused = config.find_unused_parameters
    if unused is None and needs_handler:
        unused = _probe_unused(model, blocks, state.device, trainable)
    handler = DistributedDataParallelKwargs(find_unused_parameters=bool(unused))
    if accelerator is None:
        return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no", kwargs_handlers=[handler])
    if needs_handler:
        accelerator.ddp_handler = handler
    if accelerator.gradient_accumulation_steps != 1:
        raise ValueError("set grad_accum in TrainConfig, not gradient_accumulation_steps in the Accelerator")
    if accelerator.mixed_precision == "fp16":
        raise ValueError("fp16 is not supported (use mixed_precision='bf16' in TrainConfig)")
    return accelerator


class Trainer:
    """One training run (module doc). __init__ sets it up: accelerator and precision, the model on
    its device, optimizer, resume, the (compiled) training forward; fit() runs the steps."""

    def __init__(self, model: nn.Module, train_blocks: dict[str, torch.Tensor],
                 valid_blocks: dict[str, torch.Tensor] | None, config: TrainConfig, accelerator=None,
                 callback: Callable[[int, dict[str, Any]], None] | None = None,
                 teacher: nn.Module | None = None):
        if config.loss != "lm" and teacher is None:
            raise UsageError(f"TrainConfig.loss={config.loss!r} needs a teacher model: train(..., teacher=dense)")
        self.t_start = time.perf_counter()
        self.model, self.config, self.callback = model, config, callback
        self.teacher = teacher if config.loss != "lm" else None
        self.trainable = freeze_base(model)
        for key in ("input_ids", "attention_mask", "labels"):
            if key not in train_blocks:
                raise ValueError(f"train_blocks lacks '{key}' (expected hylorada.data.pack_blocks output)")
        self.train_blocks, self.valid_blocks = train_blocks, valid_blocks
        self.n_train = int(train_blocks["input_ids"].shape[0])
        self.out_dir = Path(config.out_dir) if config.out_dir else None
        self._setup_accelerator(accelerator)
        self._setup_model()
        self._setup_optimizer()
        self._resume()
        self._setup_forward()

    # ---- setup ---------------------------------------------------------------------------------
    def _setup_accelerator(self, accelerator) -> None:
        c = self.config
        self.owns_accelerator = accelerator is None
        accelerator = _accelerator(accelerator, c, self.model, self.train_blocks, self.trainable)
        self.accelerator, self.device = accelerator, accelerator.device
        self.world, self.rank, self.is_main = (accelerator.num_processes, accelerator.process_index,
                                               accelerator.is_main_process)
        if c.batch_size < self.world:
            raise UsageError(f"TrainConfig.batch_size={c.batch_size} is the GLOBAL micro-batch: it must be "
                             f">= the number of processes ({self.world})")
        self._refuse_fsdp_out_dir(accelerator.distributed_type == "FSDP")  # before any work
        self.use_bf16 = _resolve_precision(c.mixed_precision, self.device)
        self.compiled = _resolve_compile(c.compile, c.compile_backend, self.device)

    def _refuse_fsdp_out_dir(self, fsdp: bool) -> None:
        if fsdp and self.out_dir is not None:
            raise UsageError("FSDP: checkpoints and saved adapters need the sharded parameters gathered first, "
                             "which is not built yet (docs/DISTRIBUTED.md); train with DDP "
                             "(docs/accelerate/ddp.yaml), or without TrainConfig.out_dir")

    def _setup_model(self) -> None:
        self.model.to(self.device)
        if self.teacher is not None:
            self.teacher.to(self.device).eval().requires_grad_(False)
        clear_grads(self.trainable)  # a stray backward before train() must not leak into step 1

    def _setup_optimizer(self) -> None:
        """AdamW, data order, result, seeds; the schedule comes with the resume (_resume)."""
        self.optimizer = build_optimizer(self.model, self.config)
        self.sampler = BlockSampler(self.n_train, self.config.seed, self.config.shuffle)
        self.result = TrainResult(world_size=self.world, mixed_precision="bf16" if self.use_bf16 else "no",
                                  compiled=self.compiled, out_dir=str(self.out_dir) if self.out_dir else None)
        seed_everything(self.config.seed + self.rank)

    def _resume(self) -> None:
        """Continue from out_dir/checkpoint-last (config.resume), or refuse to overwrite one."""
        c, self.step = self.config, 0
        if self.out_dir is not None and not c.resume:
            refuse_overwriting_checkpoints(self.out_dir)
        ckpt = find_checkpoint(self.out_dir) if (c.resume and self.out_dir) else None
        if c.resume and ckpt is None:
            logger.info("resume=True but no checkpoint in %s: starting from step 0", self.out_dir)
        if ckpt is not None:
            self._load(ckpt)
        # after the optimizer state: the schedule restarts from its groups' initial_lr at `step`
        self.scheduler = build_scheduler(self.optimizer, c, self.step)
        self.result.start_step = self.step
        self.tokens_at_start = self.result.tokens_seen
        self.last_good = str(ckpt) if ckpt is not None else None

    def _load(self, ckpt: Path) -> None:
        st = load_adapter_checkpoint(self.model, ckpt)
        rngs = load_training_state(ckpt, self.optimizer)
        if len(rngs) == self.world:
            set_rng_state(rngs[self.rank])
        else:
            logger.warning("checkpoint has RNG states of %d processes, running %d: reseeding", len(rngs), self.world)
            seed_everything(self.config.seed + self.rank + st["step"])
        old = st.get("config", {})
        for key in ("batch_size", "grad_accum", "seed", "lr", "schedule", "steps", "warmup_steps"):
            if key in old and old[key] != getattr(self.config, key):
                logger.warning("resuming with %s=%r, the checkpoint was written with %r", key,
                               getattr(self.config, key), old[key])
        if st.get("n_train_blocks") not in (None, self.n_train):
            logger.warning("resuming on %d training blocks, the checkpoint saw %d", self.n_train, st["n_train_blocks"])
        self.step = int(st["step"])
        self.sampler.epoch, self.sampler.index = int(st["epoch"]), int(st["index"])
        self.result.restore(st)
        if self.is_main:
            logger.info("resumed from %s at step %d (epoch %d, index %d)", ckpt, self.step,
                        self.sampler.epoch, self.sampler.index)

    def _setup_forward(self) -> None:
        self.ddp_model = self.accelerator.prepare_model(self.model)
        self.fsdp = is_fsdp(self.ddp_model)
        self._refuse_fsdp_out_dir(self.fsdp)
        if self.world > 1 and self.is_main:
            logger.info("DDP over %d processes (%s), find_unused_parameters=%s", self.world,
                        self.accelerator.distributed_type,
                        getattr(self.accelerator.ddp_handler, "find_unused_parameters", False))
        self.forward = self.ddp_model
        if self.compiled:
            # The graphs of step 1 serve every later step: each micro-batch has exactly batch_size
            # blocks of one length (the sampler runs on into the next epoch, never a short last
            # batch), so a process's shapes never change; dynamic=False keeps them static (scope
            # "blocks" makes a few variants per block: first layer or not, mask or none). Only the
            # training forward is compiled: evaluation (no_grad, eval mode) would be a second graph
            # for little gain.
            self.forward = compile_forward(self.ddp_model, self.config.compile_scope,
                                           backend=self.config.compile_backend, dynamic=False)
            if self.is_main:
                logger.info("torch.compile on (backend %s, scope %s)", self.config.compile_backend,
                            self.config.compile_scope)

    # ---- one step ------------------------------------------------------------------------------
    def _autocast(self):
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16)

    def _shard(self, idx: torch.Tensor, blocks: dict[str, torch.Tensor], whole: bool = False) -> dict[str, torch.Tensor]:
        """This process's part of the micro-batch `idx` (tensor_split: uneven splits allowed), or
        all of it (`whole`)."""
        mine = idx if whole else torch.tensor_split(idx, self.world)[self.rank]
        return {k: blocks[k][mine].to(self.device, non_blocking=True) for k in ("input_ids", "attention_mask", "labels")}

    def _logits(self, module: nn.Module, mb: dict[str, torch.Tensor]) -> torch.Tensor:
        with self._autocast():
            return logits_of(module(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"], use_cache=False))

    def _forward_backward(self, idx: torch.Tensor) -> tuple[float, int]:
        """(loss of the global batch `idx`, its number of targets); its gradient is left in .grad."""
        c, blocks = self.config, self.train_blocks
        n_targets = count_targets(blocks["labels"][idx], blocks["attention_mask"][idx])
        scale = self.world / max(n_targets, 1)  # DDP averages over processes: undo, then / global targets
        local_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for j in range(c.grad_accum):
            mb = self._shard(idx[j * c.batch_size:(j + 1) * c.batch_size], blocks)
            # gradients are all-reduced once per step, on the last micro-batch
            last = j == c.grad_accum - 1
            with contextlib.nullcontext() if last else self.accelerator.no_sync(self.ddp_model):
                s = step_loss_sum(self._logits(self.forward, mb), mb, c.loss, c.kd_temperature, self.teacher,
                                  self._autocast)
                self.accelerator.backward(s * scale)
            local_sum += s.detach().double()
        total = self.accelerator.reduce(local_sum, reduction="sum") if self.world > 1 else local_sum
        return float(total) / max(n_targets, 1), n_targets

    def _clip(self, loss: float) -> float:
        """The gradient norm before clipping; NonFiniteLossError (before any update) on NaN/inf."""
        if not math.isfinite(loss):
            raise NonFiniteLossError(self.step + 1, loss, "loss", self.last_good)
        clip = self.config.max_grad_norm or float("inf")  # None or 0: no clipping, norm still measured
        if self.fsdp:  # each rank holds the gradients of its shard: FSDP's norm is the global one
            grad_norm = float(self.ddp_model.clip_grad_norm_(clip))
        else:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.trainable, clip))
        if not math.isfinite(grad_norm):
            raise NonFiniteLossError(self.step + 1, grad_norm, "gradient norm", self.last_good)
        return grad_norm

    def _record(self, idx: torch.Tensor, loss: float, n_targets: int, lr: float, grad_norm: float,
                dt: float) -> dict[str, Any]:
        """Append the step to the result; its metrics (what the log line and the callback get)."""
        r, n_tokens = self.result, int(self.train_blocks["attention_mask"][idx].sum())
        tps = n_tokens / dt if dt > 0 else 0.0
        r.train_time_s += dt
        r.losses.append(loss)
        r.lrs.append(lr)
        r.grad_norms.append(grad_norm)
        r.tokens_per_s.append(tps)
        r.tokens_seen += n_tokens
        r.target_tokens_seen += n_targets
        return {"step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tps,
                "tokens_seen": r.tokens_seen}

    # ---- reporting, evaluation, checkpoints ----------------------------------------------------
    def _due(self, every: int) -> bool:
        return bool(every) and (self.step % every == 0 or self.step == self.config.steps)

    def _log_line(self, record: dict[str, Any]) -> None:
        if self.is_main and self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with open(self.out_dir / LOG_FILE, "a") as fh:
                fh.write(json.dumps(record) + "\n")

    def _report(self, m: dict[str, Any], bar) -> None:
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.2e}", tok_s=f"{m['tokens_per_s']:.0f}")
        if self._due(self.config.log_every):
            self._log_line(m)
            if self.is_main and bar is None:
                logger.info("step %d/%d loss %.4f lr %.3e grad %.3f %.0f tok/s", self.step, self.config.steps,
                            m["loss"], m["lr"], m["grad_norm"], m["tokens_per_s"])

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean LM loss per target token over the valid blocks (eager, eval mode, all processes).
        Under FSDP every rank runs every batch through the wrapped model (its forwards gather the
        shards, so the ranks must call it in step); otherwise each process takes its share."""
        c = self.config
        self.model.eval()
        n_valid = int(self.valid_blocks["input_ids"].shape[0])
        n_batches = math.ceil(n_valid / c.batch_size)
        if c.eval_batches is not None:
            n_batches = min(n_batches, c.eval_batches)
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        module = self.ddp_model if self.fsdp else self.model
        for b in range(n_batches):
            idx = torch.arange(b * c.batch_size, min(n_valid, (b + 1) * c.batch_size))
            mb = self._shard(idx, self.valid_blocks, whole=self.fsdp)
            if mb["input_ids"].shape[0] == 0:
                continue
            s, n = causal_lm_loss_sum(self._logits(module, mb), mb["labels"], mb["attention_mask"])
            total += torch.stack([s.double(), torch.tensor(float(n), dtype=torch.float64, device=self.device)])
        if self.world > 1 and not self.fsdp:
            total = self.accelerator.reduce(total, reduction="sum")
        self.model.train()
        return float(total[0] / total[1].clamp_min(1))

    def _validate(self, metrics: dict[str, Any], bar) -> None:
        vloss = self.evaluate()
        metrics["valid_loss"] = vloss
        r = self.result
        r.valid_losses.append({"step": self.step, "loss": vloss})
        self._log_line({"step": self.step, "valid_loss": vloss})
        if self.is_main:
            msg = f"step {self.step}: valid loss {vloss:.4f} (ppl {math.exp(min(vloss, 50)):.2f})"
            (bar.write if bar is not None else logger.info)(msg)
        if r.best_valid_loss is None or vloss < r.best_valid_loss:
            r.best_valid_loss, r.best_step = vloss, self.step
            if self.out_dir is not None:
                self._save(CHECKPOINT_BEST)

    def _trainer_state(self) -> dict[str, Any]:
        r = self.result
        return {"step": self.step, "epoch": self.sampler.epoch, "index": self.sampler.index,
                "world_size": self.world, "n_train_blocks": self.n_train, "compiled": self.compiled,
                "tokens_seen": r.tokens_seen, "target_tokens_seen": r.target_tokens_seen,
                "best_valid_loss": r.best_valid_loss, "best_step": r.best_step, "config": self.config.to_dict(),
                "history": r.history()}

    def _save(self, name: str) -> str | None:
        """Checkpoint `name` (all processes call it: the RNG states of every process go in)."""
        states = [rng_state()]
        if self.world > 1:
            from accelerate.utils import gather_object

            states = gather_object(states)
        if self.out_dir is None:
            return None
        if self.is_main:
            write_checkpoint(self.out_dir, name, model=self.model, optimizer=self.optimizer,
                             rng_states=states, state=self._trainer_state())
        self.accelerator.wait_for_everyone()
        return str(self.out_dir / name)

    # ---- the loop ------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        c, bar = self.config, None
        if self.is_main and c.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=c.steps, initial=self.step, desc="train", dynamic_ncols=True)
        was_training = self.model.training
        self.model.train()
        try:
            while self.step < c.steps:
                t0 = time.perf_counter()
                idx = self.sampler.take(c.global_batch)
                loss, n_targets = self._forward_backward(idx)
                lr = float(base_group(self.optimizer)["lr"])  # the rate this update uses
                group_lrs = {g.get("name", str(i)): float(g["lr"]) for i, g in enumerate(self.optimizer.param_groups)}
                grad_norm = self._clip(loss)  # raises before the update when loss or norm is NaN/inf
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                metrics = self._record(idx, loss, n_targets, lr, grad_norm, time.perf_counter() - t0)
                self._report(metrics, bar)
                metrics["group_lrs"] = group_lrs  # for the callback, not the log line
                if self.valid_blocks is not None and self._due(c.eval_every):
                    self._validate(metrics, bar)
                if self.out_dir is not None and (self._due(c.save_every) or self.step == c.steps):
                    self.last_good = self._save(CHECKPOINT_LAST) or self.last_good
                if self.callback is not None:
                    self.callback(self.step, metrics)
        finally:
            clear_grads(self.trainable)  # after a NonFiniteLossError the NaN/inf grads must not stay
            if bar is not None:
                bar.close()
            self.model.train(was_training)
        return self._finish()

    def _finish(self) -> TrainResult:
        r = self.result
        r.steps, r.wall_time_s = self.step, time.perf_counter() - self.t_start
        run_tokens = r.tokens_seen - self.tokens_at_start
        r.mean_tokens_per_s = run_tokens / r.train_time_s if r.train_time_s > 0 else 0.0
        self.accelerator.wait_for_everyone()
        if self.owns_accelerator and self.world > 1:
            _destroy_process_group_at_exit()
        return r


@functools.cache
def _destroy_process_group_at_exit() -> None:
    """Leave the process group up for the process's next train() (the compression recovery
    trains twice; accelerate's state outlives one run) and destroy it once, at exit."""
    atexit.register(lambda: torch.distributed.is_initialized() and torch.distributed.destroy_process_group())


def train(model: nn.Module, train_blocks: dict[str, torch.Tensor],
          valid_blocks: dict[str, torch.Tensor] | None, config: TrainConfig,
          accelerator=None, callback: Callable[[int, dict[str, Any]], None] | None = None,
          teacher: nn.Module | None = None) -> TrainResult:
    """Train the adapter parameters of `model` (a HyLoRADAModel or anything with its API).

    train_blocks / valid_blocks: dicts of [n, L] tensors input_ids, attention_mask, labels
    (hylorada.data.pack_blocks). `accelerator`: an accelerate.Accelerator (created when None;
    a created one shares accelerate's process state with the next train() of the process; its
    process group is destroyed at exit).
    `callback(step, metrics)` runs on every process after each step (after eval and
    checkpointing); raising in it stops the run (e.g. optuna pruning).
    Raises NonFiniteLossError before the optimizer step of a step whose loss is not finite.
    `teacher`: the model distilled from when config.loss is "kd" or "kd+lm" (frozen, eval mode,
    moved to the training device).
    """
    return Trainer(model, train_blocks, valid_blocks, config, accelerator, callback, teacher).fit()
