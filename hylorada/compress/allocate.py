"""Rank allocation under one global budget (`CompressConfig.allocate`).

All three options keep the same number of parameters in the target layers: the budget B is
what `ratio` keeps with every matrix at k = floor((1 - ratio)·m·n/(m + n)) ("uniform", the
SVD-LLM convention, hylorada/compress/ranks.py), so the model's removed fraction is the same up
to rank granularity (the allocators spend at most B, and leave less than one rank step of the
largest layer, max(m + n), unspent).

- "loss": minimise Σ_i e_i(k_i) subject to Σ_i k_i (m_i + n_i) ≤ B, where
  e_i(k) = Σ_{j>k} σ_ij² / Σ_j σ_ij² and σ_ij are the singular values of W_i L_i (of W_i for
  plain SVD). Σ_{j>k} σ_ij² is the calibration output error of truncating W_i
  (hylorada/compress/whiten.py); dividing by ||W_i L_i||_F² = E||W_i x||² makes it the
  *relative* output error. Why relative: absolute errors of different matrices are in
  different units (a q projection's output feeds a softmax after scaling, a down projection's
  output is added to the residual stream) and change when a function-preserving
  reparametrisation moves a scale c from one matrix to the next (W_i ↦ c·W_i, norm gain ↦
  gain / c); the relative error does not. This is ranks.allocate_budget (the "budget"
  policy with budget_energy="relative") at B: σ² per parameter, greedy, which is exact for
  this separable convex objective at the parameter count it spends (a Lagrangian solution,
  Everett 1963).
  Under method="fisher" the σ_ij are those of R_iᵀ W_i L_i and ½ N Σ_{j>k} σ_ij² is the
  predicted calibration-loss increase (hylorada/compress/curvature.py): already one unit for
  every matrix, so e_i(k) = Σ_{j>k} σ_ij² as is ("absolute"), with no normalisation.
- "sensitivity" (ASVD-style): Δ_i(k) = calibration loss with W_i alone truncated to rank k
  minus the dense loss, measured for a few candidate ranks per matrix
  (`candidate_ranks`); minimise Σ_i Δ̂_i(k_i) under the same budget, Δ̂_i the lower convex
  envelope of the measured points (linear between them, ranks between the smallest and the
  largest candidate), by `choose_options`: again the optimum for the parameter count it
  spends, within one rank step (m_i + n_i) of the budget.
"""
from __future__ import annotations

import itertools
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import nn

from .factorized import FactorizedLinear
from .ranks import (LayerSpec, RankDecision, decide_ranks, dense_params, factorized_params,
                    rank_for_ratio)
from .svd import factors_from_svd
from .targets import set_module
from .whiten import Whitening, iter_batches

ALLOCATIONS = ("uniform", "loss", "sensitivity")
ALLOCATE_CHOICES = ("auto",) + ALLOCATIONS
# candidate removed ratios for "sensitivity", as multiples of the target ratio (capped below 1)
SENSITIVITY_STEPS = (0.5, 1.0, 1.5, 2.0)


def resolve_allocate(allocate: str, method: str, policy: str, has_calibration: bool,
                     device: torch.device) -> tuple[str, str]:
    """(allocation, why) for CompressConfig.allocate; "auto" becomes "sensitivity" when it can
    run and is cheap enough (method "whiten", the ratio policy, calibration given, a CUDA
    device: about a minute for SmolLM2-135M on an H100) and "uniform" otherwise. "sensitivity"
    is the best option measured (docs/COMPRESSION-OPTIONS.md) and the principled one: it
    allocates by the change of the calibration loss itself, not by a proxy of it."""
    if allocate != "auto":
        return allocate, ""
    if method == "fisher" and policy == "ratio":
        return "loss", ("allocate='auto' -> 'loss' (method='fisher': the predicted loss increase of every "
                        "matrix is in the same unit, so one budget is spent where it costs least)")
    if method != "whiten" or policy != "ratio" or not has_calibration:
        return "uniform", "allocate='auto' -> 'uniform' (sensitivity needs method='whiten', a ratio and calibration)"
    if device.type != "cuda":
        return "uniform", (f"allocate='auto' -> 'uniform' on {device.type} (sensitivity, the better allocation, "
                           "costs ~4 forwards per matrix; --allocate sensitivity to use it anyway)")
    return "sensitivity", "allocate='auto' -> 'sensitivity' (measured calibration-loss change per matrix)"


def kept_params(specs: list[LayerSpec], decisions: dict[str, RankDecision]) -> int:
    """Parameters the target layers store under `decisions` (biases included)."""
    return sum(dense_params(s.m, s.n, s.bias) if decisions[s.name].rank is None
               else factorized_params(decisions[s.name].rank, s.m, s.n, s.bias) for s in specs)


def uniform_budget(specs: list[LayerSpec], ratio: float, overrides: dict, force: bool) -> int:
    """B: parameters kept by the uniform ratio policy (with the same overrides)."""
    return kept_params(specs, decide_ranks(specs, "ratio", ratio, overrides, None, force))


def allocate_by_loss(specs: list[LayerSpec], ratio: float, spectra: dict[str, torch.Tensor],
                     overrides: dict, force: bool, energy: str = "relative") -> dict[str, RankDecision]:
    """Truncation loss per parameter under the uniform budget (module docstring): relative for
    SVD-LLM spectra; `energy="absolute"` for method="fisher", whose s² are predicted loss
    increases (hylorada/compress/curvature.py), comparable across matrices as they are."""
    budget = uniform_budget(specs, ratio, overrides, force)
    out = decide_ranks(specs, "budget", budget, overrides, spectra, force, energy)
    for d in out.values():
        if d.policy.startswith("budget="):
            d.policy = f"allocate=loss (ratio={ratio} budget {budget:,})"
    return out


def candidate_ranks(spec: LayerSpec, ratio: float) -> list[int]:
    """Ranks at removed ratios ratio·SENSITIVITY_STEPS (capped at 0.95), distinct, ascending."""
    r = Fraction(ratio).limit_denominator(10**9)
    ratios = [min(r * Fraction(s).limit_denominator(100), Fraction(95, 100)) for s in SENSITIVITY_STEPS]
    return sorted({rank_for_ratio(spec.m, spec.n, float(x)) for x in ratios if x > 0})


def _hull(costs: list[int], losses: list[float]) -> list[int]:
    """Indices of the lower convex hull of (cost, loss) from the cheapest option on, keeping only
    options that do not raise the loss; consecutive gains (loss drop per cost, >= 0) do not
    increase (a zero gain only spends parameters that nothing else wants)."""
    order = sorted(range(len(costs)), key=lambda j: (costs[j], losses[j]))
    hull: list[int] = [order[0]]

    def gain(a: int, b: int) -> float:
        return (losses[a] - losses[b]) / (costs[b] - costs[a])

    for j in order[1:]:
        if costs[j] == costs[hull[-1]] or losses[j] > losses[hull[-1]]:
            continue
        while len(hull) >= 2 and gain(hull[-2], hull[-1]) < gain(hull[-1], j):
            hull.pop()
        hull.append(j)
    return hull


def choose_options(costs: list[list[int]], losses: list[list[float]], budget: float,
                   granules: list[int] | None = None) -> list[int]:
    """The cost to spend on each item minimising Σ loss subject to Σ cost ≤ budget, by the
    Lagrangian greedy: every item starts at its cheapest option; the steps along each item's
    lower convex hull of (cost, loss) are taken in decreasing loss drop per cost while the
    running cost fits (a prefix of that order). With `granules`, a hull step of item i is cut
    into pieces of granules[i] (when it divides the step), the loss linear along the step
    (the convex envelope between measured options); without, the result is one option per
    item. Either way it is optimal among all choices that cost no more than it does
    (Everett 1963), and leaves unspent less than the piece that did not fit.
    Raises ValueError when even the cheapest options exceed the budget."""
    hulls = [_hull(c, l) for c, l in zip(costs, losses)]
    spend = [c[h[0]] for c, h in zip(costs, hulls)]
    left = budget - sum(spend)
    if left < 0:
        raise ValueError(f"budget {budget:,} is below the cheapest choice ({budget - left:,})")
    steps = []
    for i, (h, c, l) in enumerate(zip(hulls, costs, losses)):
        for a, b in zip(h, h[1:]):
            dc = c[b] - c[a]
            q = granules[i] if granules and dc % granules[i] == 0 else dc
            steps += [((l[a] - l[b]) / dc, q, i)] * (dc // q)
    steps.sort(key=lambda s: -s[0])  # stable: each item's steps keep their order
    for _, q, i in steps:
        if q > left:
            break
        spend[i], left = spend[i] + q, left - q
    return spend


def allocate_by_sensitivity(specs: list[LayerSpec], ratio: float,
                            table: dict[str, list[tuple[int, float]]], overrides: dict,
                            force: bool) -> dict[str, RankDecision]:
    """Ranks from the measured table name -> [(rank, Δloss)] under the uniform budget: Δ between
    measured ranks is the lower convex envelope (linear), ranks move in steps of 1 (cost m + n).
    A larger rank keeps every triplet of a smaller one, so a measured Δ that rises with the rank
    is noise: Δ is replaced by its running minimum over the smaller ranks (then budget that no
    matrix can use to lower the loss still goes to the ranks, keeping the uniform size).
    Layers with an override keep the override's decision (and its cost)."""
    budget = uniform_budget(specs, ratio, overrides, force)
    fixed = decide_ranks([s for s in specs if s.name not in table], "ratio", ratio, overrides,
                         None, force)
    free = [s for s in specs if s.name in table]
    spent = kept_params([s for s in specs if s.name in fixed], fixed)
    costs = [[factorized_params(k, s.m, s.n, s.bias) for k, _ in table[s.name]] for s in free]
    losses = [list(itertools.accumulate((d for _, d in sorted(table[s.name])), min)) for s in free]
    costs = [sorted(c) for c in costs]
    spend = choose_options(costs, losses, budget - spent, [s.m + s.n for s in free])
    out = dict(fixed)
    for s, c in zip(free, spend):
        k = (c - (s.m if s.bias else 0)) // (s.m + s.n)
        out[s.name] = RankDecision(k, f"allocate=sensitivity (ratio={ratio} budget {budget:,})", k)
    return {s.name: out[s.name] for s in specs}


@torch.no_grad()
def calibration_loss(model: nn.Module, calibration, batch_size: int, n_blocks: int | None,
                     seq_len: int | None) -> float:
    """Mean next-token NLL of `model` over the calibration blocks (padding left out)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for ids, mask in iter_batches(calibration, batch_size, n_blocks, seq_len):
        ids = ids.to(device)
        kwargs = {"input_ids": ids, "use_cache": False}
        if mask is not None:
            kwargs["attention_mask"] = mask.to(device)
        logits = model(**kwargs).logits[:, :-1].float()
        target = ids[:, 1:] if mask is None else ids[:, 1:].masked_fill(mask[:, 1:].to(device) == 0, -100)
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                       ignore_index=-100, reduction="sum"))
        count += int((target != -100).sum())
    return total / max(count, 1)


@torch.no_grad()
def measure_sensitivity(model: nn.Module, name: str, layer: nn.Module, W: torch.Tensor,
                        wh: Whitening | None, ranks: list[int], loss_fn, base_loss: float
                        ) -> list[tuple[int, float]]:
    """[(k, loss with `name` alone truncated to rank k - base_loss)]: one SVD of W L (or W),
    each rank's factors swapped in, the loss measured, the layer put back."""
    M = W.detach().double() if wh is None else wh.whiten(W.detach())
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    total = float(M.square().sum())
    bias = None if layer.bias is None else layer.bias.detach()
    out = []
    try:
        for k in ranks:
            k_eff = min(k, S.numel())
            f = factors_from_svd(U, S, Vh, k_eff, total, W.dtype, None if wh is None else wh.unwhiten)
            set_module(model, name, FactorizedLinear.from_factors(f.up.to(W.device),
                                                                   f.down.to(W.device), bias))
            out.append((k, loss_fn() - base_loss))
    finally:
        set_module(model, name, layer)
    return out
