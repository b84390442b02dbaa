"""Optimizer and learning-rate schedule of the trainer (hylorada/train.py).

Only the adapter trains: `freeze_base` sets requires_grad exactly for
``model.trainable_parameters()``. AdamW runs over ``model.parameter_groups(lr, weight_decay)``,
so the model decides the groups (LoRA+: lora_B at ``lr * lora_plus_ratio``; scalars without
weight decay), and the schedule multiplies each group's own initial lr by one factor:

    factor(s) = (s+1)/(w+1)                                   for s < w (warm-up)
              = m + (1-m) * 0.5 * (1 + cos(pi * p))           cosine,  p = (s-w)/(steps-w) <= 1
              = m + (1-m) * (1 - p)                           linear
              = 1                                             constant

for the update of step index s (0-based), w = warmup_steps, m = min_lr_ratio.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from .train import TrainConfig


def freeze_base(model: nn.Module) -> list[nn.Parameter]:
    """requires_grad = True exactly for model.trainable_parameters(); returns them."""
    trainable = list(model.trainable_parameters())
    if not trainable:
        raise ValueError("the model has no trainable (adapter) parameters")
    ids = {id(p) for p in trainable}
    for p in model.parameters():
        p.requires_grad_(id(p) in ids)
    return trainable


def clear_grads(params: list[nn.Parameter]) -> None:
    """p.grad = None for every trainable parameter (the trainer owns the gradients)."""
    for p in params:
        p.grad = None


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


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig,
                    step: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR: each group's lr = its own initial lr x lr_factor(s) (LoRA+ ratios survive).

    `step` > 0 (resume; the optimizer's state, with its groups' "initial_lr", already loaded):
    the groups' lr becomes that of the update of step index `step` under THIS config's schedule,
    exactly as in an uninterrupted run, and right when e.g. `steps` was raised to extend a
    finished run. (The scheduler's state dict cannot do this: the lambda is not in it.)
    """
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config), last_epoch=step - 1)


def base_group(optimizer: torch.optim.Optimizer) -> dict:
    """The group whose lr is reported as the run's lr: lora_A (the base rate under LoRA+), else the first."""
    for g in optimizer.param_groups:
        if g.get("name") == "lora_A":
            return g
    return optimizer.param_groups[0]
