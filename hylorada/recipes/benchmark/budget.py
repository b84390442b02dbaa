"""Matched trainable-parameter budgets: every row gets the rank whose trainable count is the
closest to LoRA's at the target rank.

The count of one layer is its adapter class's `n_trainable` (hylorada/adapters/), the formula
that sits next to the parameters it creates; peft's rows count as our method of the same name
(peft-dora: A, B and the magnitude), and an ablation's frozen parameters are left out.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from ...adapters import ADAPTER_CLASSES
from .config import ABLATIONS, BUDGET_TOLERANCE, PEFT_ROWS, BenchConfig, base_method

class LayerCounts:
    """Trainable counts of the rows on `model`'s target layers, from each adapter class's
    `n_trainable` (nothing is wrapped; a meta-device model will do)."""

    def __init__(self, model: nn.Module, targets="all-linear") -> None:
        from ...layers import in_out_features
        from ...model import match_targets

        self.model = model
        self.shapes = [(name, *in_out_features(model.get_submodule(name))) for name in match_targets(model, targets)]
        self._needed: dict[str, list[dict[str, Any]]] = {}

    def needed(self, method: str) -> list[dict[str, Any]]:
        """Per layer, what `method`'s n_trainable needs besides the shape: LoRaDA the query heads
        (None off a query projection; hylorada/model.py `lorada_query_slice`)."""
        if method not in self._needed:
            self._needed[method] = [{} for _ in self.shapes]
            if method == "lorada":
                from ...model import lorada_query_slice

                for extra, (name, _, _) in zip(self._needed[method], self.shapes):
                    query = lorada_query_slice(self.model, name, self.model.get_submodule(name))
                    extra["n_heads"] = query["n_heads"] if query else None
        return self._needed[method]

    def count(self, row: str, rank: int) -> int:
        """Trainable parameters of `row` (a method, a peft row or an ablation) at `rank`."""
        method = base_method(row)
        cls = ADAPTER_CLASSES[method]
        frozen = tuple(ABLATIONS.get(row, {}).get("freeze", ()))
        return sum(cls.n_trainable(d_in, d_out, rank, frozen=frozen, **extra)
                   for (_, d_in, d_out), extra in zip(self.shapes, self.needed(method)))

    @property
    def max_rank(self) -> int:
        return min(min(d_in, d_out) for _, d_in, d_out in self.shapes)


def trainable_count(model: nn.Module, row: str, rank: int, targets="all-linear") -> int:
    """Trainable parameters of `row` at `rank` on `targets` (LayerCounts.count)."""
    return LayerCounts(model, targets).count(row, rank)


def matched_ranks(model: nn.Module, rows: Iterable[str], target_rank: int = 8,
                  targets="all-linear", tolerance: float = BUDGET_TOLERANCE) -> dict[str, int]:
    """{row: rank} so that each row's trainable count is the closest to LoRA's at `target_rank`
    (ties: the larger rank), and within `tolerance` (10%) of it.

    Raises ValueError when some row cannot get within the tolerance (e.g. a tiny model with
    target_rank 1, where DoRA's magnitude alone is > 10% of LoRA's count)."""
    counts = LayerCounts(model, targets)
    ref = counts.count("lora", target_rank)
    out: dict[str, int] = {}
    for row in rows:
        n = {r: counts.count(row, r) for r in range(1, counts.max_rank + 1)}
        best = min(n, key=lambda r: (abs(n[r] - ref), -r))
        if abs(n[best] - ref) > tolerance * ref:
            raise ValueError(
                f"matched_ranks: {row} cannot get within {tolerance:.0%} of LoRA's {ref:,} trainable "
                f"parameters at rank {target_rank} (closest: rank {best}, {n[best]:,}); use a larger "
                "target rank")
        out[row] = best
    return out


def budget_table(model: nn.Module, rows: Iterable[str], target_rank: int, targets="all-linear",
                 alpha_ratio: float = 2.0) -> dict[str, Any]:
    """The matched budget of every row: rank, alpha, trainable count and its ratio to LoRA's.
    Ablations take the rank of their base method."""
    rows = list(rows)
    bases = sorted({base_method(r) if r not in PEFT_ROWS else r for r in rows} | {"lora"})
    ranks = matched_ranks(model, bases, target_rank, targets)
    counts = LayerCounts(model, targets)
    ref = counts.count("lora", target_rank)
    table = {}
    for row in rows:
        r = ranks[row] if row in ranks else ranks[base_method(row)]
        n = counts.count(row, r)
        table[row] = {"rank": r, "alpha": alpha_ratio * r, "trainable_params": n, "vs_lora": n / ref}
    return {"target_rank": target_rank, "targets": targets, "n_layers": len(counts.shapes),
            "lora_params_at_target": ref, "tolerance": BUDGET_TOLERANCE, "rows": table}


def compute_budget(cfg: BenchConfig, rows: list[str], model: nn.Module | None = None) -> dict[str, Any]:
    """The matched budgets (needs the model's layer shapes: loaded on the meta device when possible)."""
    if model is None:
        model = shape_model(cfg.model)
    return budget_table(model, rows, cfg.target_rank, cfg.targets, cfg.alpha_ratio)


def shape_model(name: str) -> nn.Module:
    """The architecture of `name` without its weights (meta device): enough for layer shapes."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ...loading import MODEL_ALIASES, converted_folder

    folder = converted_folder(name) if name in MODEL_ALIASES else name
    try:
        config = AutoConfig.from_pretrained(folder)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except Exception:  # noqa: BLE001 - GGUF files, hub ids: load the real thing
        from ...loading import load_model

        return load_model(name)[0]


def print_budget(budget: dict[str, Any]) -> None:
    print(f"matched budgets (LoRA at rank {budget['target_rank']}: {budget['lora_params_at_target']:,} "
          f"trainable parameters on {budget['n_layers']} layers):")
    for row, e in budget["rows"].items():
        print(f"  {row:<22} rank {e['rank']:>3}  {e['trainable_params']:>12,}  ({100 * e['vs_lora']:.1f}% of LoRA)")
