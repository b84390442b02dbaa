"""Training losses: next-token cross-entropy (LM) and knowledge distillation (KD) from a teacher.

The causal-LM shift: the logits at position t score the token at t + 1, and a position counts
when that shifted label is not -100 and its attention mask is 1 (padding never counts, whatever
its label). The LM loss of a counted position is -log softmax(logits_t)[label_{t+1}], in fp32 or
better. With p_T = softmax(teacher_logits / T) and p_S = softmax(student_logits / T) over the
vocabulary at a counted position,

    kd(t) = T² · KL(p_T || p_S) = T² · Σ_v p_T(v) (log p_T(v) - log p_S(v)),

summed over counted positions (the trainer divides by their number, as for the LM loss). T²
keeps the gradient's scale independent of T (Hinton, Vinyals & Dean, 2015). The teacher is
the dense model; its logits are computed on the fly under no_grad.

TrainConfig.loss (hylorada/train.py) picks the objective: "lm" (cross-entropy only), "kd"
(distillation only) or "kd+lm" (their sum, equal weights).
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UsageError

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


def logits_of(output: Any) -> torch.Tensor:
    """The logits of a model output (a ModelOutput with .logits, or a tuple whose first item)."""
    return output.logits if hasattr(output, "logits") else output[0]


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
    """Per-position NLL [b, L-1] in fp32 or better (logits at t score labels at t+1); 0 where ignored."""
    targets = _targets(labels, attention_mask)
    logits = _upcast(logits[:, :-1])
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                          ignore_index=IGNORE_INDEX, reduction="none")
    return nll.view(targets.shape)


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor,
                       attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """(sum of token NLLs over counted positions, number of counted positions)."""
    targets = _targets(labels, attention_mask)
    logits = _upcast(logits[:, :-1])
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                            ignore_index=IGNORE_INDEX, reduction="sum")
    return total, int((targets != IGNORE_INDEX).sum())


def count_targets(labels: torch.Tensor, attention_mask: torch.Tensor | None = None) -> int:
    """The number of counted positions (the denominator of the loss of a global batch)."""
    return int(counted_positions(labels, attention_mask).sum())


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


def step_loss_sum(logits: torch.Tensor, mb: dict[str, torch.Tensor], loss: str = "lm",
                  temperature: float = 1.0, teacher: nn.Module | None = None,
                  autocast: Callable[[], Any] = contextlib.nullcontext) -> torch.Tensor:
    """Sum over the micro-batch's counted positions of the objective `loss` (LOSSES); the
    teacher's forward runs under `autocast()` (the student's precision)."""
    lm, _ = causal_lm_loss_sum(logits, mb["labels"], mb["attention_mask"])
    if loss == "lm":
        return lm
    with torch.no_grad(), autocast():
        t_logits = logits_of(teacher(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"],
                                     use_cache=False))
    kd, _ = kd_loss_sum(logits, t_logits, mb["labels"], mb["attention_mask"], temperature)
    return kd if loss == "kd" else kd + lm.to(kd.dtype)
