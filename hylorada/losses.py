"""Training losses beyond next-token cross-entropy: knowledge distillation (KD) from a teacher.

Positions follow the causal-LM shift of hylorada/train.py: the logits at position t score the
token at t + 1, and a position counts when that shifted label is not -100 and its attention
mask is 1. With p_T = softmax(teacher_logits / T) and p_S = softmax(student_logits / T) over
the vocabulary at a counted position,

    kd(t) = T² · KL(p_T || p_S) = T² · Σ_v p_T(v) (log p_T(v) - log p_S(v)),

summed over counted positions (the trainer divides by their number, as for the LM loss). T²
keeps the gradient's scale independent of T (Hinton, Vinyals & Dean, 2015). The teacher is
the dense model; its logits are computed on the fly under no_grad.

TrainConfig.loss (hylorada/train.py) picks the objective: "lm" (cross-entropy only), "kd"
(distillation only) or "kd+lm" (their sum, equal weights).
"""
from __future__ import annotations

import math

from .errors import UsageError

import torch
import torch.nn.functional as F

LOSSES = ("lm", "kd", "kd+lm")
IGNORE_INDEX = -100


def check_loss(loss, temperature, loss_field: str = "loss",
               temperature_field: str = "kd_temperature") -> None:
    """ValueError naming the field unless loss is in LOSSES and temperature a finite number > 0."""
    if loss not in LOSSES:
        raise UsageError(f"{loss_field} must be one of {LOSSES}, got {loss!r}")
    ok = isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
    if not ok or not math.isfinite(temperature) or temperature <= 0:
        raise UsageError(f"{temperature_field} must be a finite number > 0, got {temperature!r}")


def counted_positions(labels: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Bool [b, L-1]: logits at t count when label t+1 is not -100 and its mask is 1."""
    keep = labels[:, 1:] != IGNORE_INDEX
    if attention_mask is not None:
        keep = keep & (attention_mask[:, 1:] != 0)
    return keep


def kd_loss_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                attention_mask: torch.Tensor | None = None, temperature: float = 1.0
                ) -> tuple[torch.Tensor, int]:
    """(Σ over counted positions of T²·KL(p_T || p_S), number of counted positions), in fp32 or
    better; gradients flow into the student logits only."""
    keep = counted_positions(labels, attention_mask)
    s = student_logits[:, :-1][keep]
    t = teacher_logits[:, :-1][keep].detach()
    dt = torch.promote_types(s.dtype, torch.float32)
    log_s = F.log_softmax(s.to(dt) / temperature, dim=-1)
    log_t = F.log_softmax(t.to(dt) / temperature, dim=-1)
    kl = F.kl_div(log_s, log_t, log_target=True, reduction="sum")
    return kl * temperature ** 2, int(keep.sum())
