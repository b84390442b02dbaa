"""Compression recovery: adapters trained on the factors of a compressed model, merged back.

    report = compress_model(model, CompressConfig(ratio=0.2), calibration=ids)   # compress/
    summary = recover_compressed(model, blocks, steps=200, loss="kd", teacher=dense)

The math of compression lives in hylorada/compress/; this workflow adds the training
(hylorada/train.py) with the LM or the distillation loss (hylorada/losses.py).
"""
from __future__ import annotations

import time

from torch import nn

from ..compress.api import RECOVER_SCHEDULES, RECOVER_TARGETS
from ..layers import in_out_features
from ..compress.targets import factorized_layers, stored_size
from ..config import HyLoRADAConfig
from ..losses import check_loss
from ..model import HyLoRADAModel
from ..train import TrainConfig, train

__all__ = ["recover_compressed", "RECOVER_SCHEDULES", "RECOVER_TARGETS"]


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
    layers = factorized_layers(model)
    if not layers:
        raise ValueError("recover_compressed: the model has no FactorizedLinear layer")
    if targets == "layers":
        phases = [("layers", list(layers), steps)]
    elif schedule == "sequential":
        phases = [("up", [f"{n}.up" for n in layers], (steps + 1) // 2),
                  ("down", [f"{n}.down" for n in layers], steps // 2)]
    else:
        phases = [("up+down", [f"{n}.{c}" for n in layers for c in ("up", "down")], steps)]
    acfg = dict(method=method, lora_rank=lora_rank,
                lora_alpha=float(lora_alpha if lora_alpha is not None else 2 * lora_rank))
    acfg.update(adapter_config or {})
    was_training = model.training
    device = next(model.parameters()).device  # the trainer may move the model to its accelerator
    grad_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = stored_size(model)
    summary: dict = {"method": method, "schedule": schedule if targets == "factors" else "joint",
                     "targets": targets, "lora_rank": lora_rank, "loss": loss,
                     "kd_temperature": kd_temperature, "phases": []}
    t0 = time.perf_counter()
    for phase, names, n_steps in phases:
        if n_steps < 1:
            continue
        small = [n for n in names if min(in_out_features(model.get_submodule(n))) < lora_rank]
        names = [n for n in names if n not in small]  # a factor of rank < r: nothing to add there
        if small:
            summary.setdefault("skipped_small_factors", []).extend(small)
        if not names:
            continue
        wrapped = HyLoRADAModel(model, HyLoRADAConfig(**acfg), target_names=names)
        tcfg = TrainConfig(**{"steps": n_steps, "loss": loss, "kd_temperature": kd_temperature,
                              **(train_config or {})})
        result = train(wrapped, train_blocks, valid_blocks, tcfg, teacher=teacher)
        model = wrapped.merge_and_unload()
        summary["phases"].append({
            "phase": phase, "layers": len(names), "steps": n_steps,
            "first_loss": result.losses[0] if result.losses else None,
            "last_loss": result.losses[-1] if result.losses else None,
            "best_valid_loss": result.best_valid_loss, "train_time_s": result.train_time_s,
            "mean_tokens_per_s": result.mean_tokens_per_s})
    for n, p in model.named_parameters():
        p.requires_grad_(grad_flags.get(n, True))
    model.to(device)
    model.train(was_training)
    after = stored_size(model)
    summary.update(params_before=before[0], params_after=after[0], bytes_before=before[1],
                   bytes_after=after[1], seconds=time.perf_counter() - t0,
                   ranks_after={n: m.rank for n, m in factorized_layers(model).items()})
    return summary
