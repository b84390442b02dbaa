"""Rank policies: how many singular triplets each layer keeps.

A d_out x d_in = m x n layer factorised at rank k stores k·(m + n) weights instead of m·n,
so it only saves parameters when k < m·n / (m + n) (the *break-even rank*; m/2 for a square
layer). The policies:

- `ratio` r in (0, 1), the SVD-LLM convention: r is the fraction of each matrix's parameters
  REMOVED ("compress 20%" is ratio=0.2 and keeps 80%): k = floor((1 - r)·m·n / (m + n)).
  Summed over the target layers it removes r of their weights up to the floor (at most
  (m + n) weights per layer; under 0.4% for SmolLM2's shapes).
- `energy` e in (0, 1]: the smallest k whose top singular values hold e of Σσ² (σ of W for
  plain SVD, of W·L for whitened SVD, where it is the share of output energy kept).
- `alpha` a in (0, 1], the original HyLoRA knob: k = floor(a·min(m, n)). Note a ≥ 0.5 makes
  square layers larger than dense: the break-even guard catches it.
- `budget`: a parameter budget for all target layers together (biases and layers that stay
  dense included), shared greedily by what each parameter buys: the next singular triplet
  of layer i costs m_i + n_i parameters and removes σ_ij² of (relative, by default) error, so
  the triplets are taken in order of σ_ij² / (m_i + n_i) until the budget is spent. Ranks stay
  below break-even; budget left over then turns whole layers dense, best remaining energy
  per extra parameter first.

Every policy keeps k ≥ 1 and k ≤ min(m, n). Per-module overrides (name pieces -> value) set
a layer's value in the policy's own unit (a float), a fixed rank (an int) or "dense".
The break-even guard: a layer whose k·(m + n) ≥ m·n stays dense (the report says why)
unless `force=True`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import torch

POLICIES = ("ratio", "energy", "alpha", "budget")


def break_even_rank(m: int, n: int) -> float:
    """m·n / (m + n): factorising at rank k saves parameters iff k is below this."""
    return m * n / (m + n)


def saves(k: int, m: int, n: int) -> bool:
    return k * (m + n) < m * n


def max_saving_rank(m: int, n: int) -> int:
    """Largest k with k·(m + n) < m·n (0 when even rank 1 saves nothing)."""
    return (m * n - 1) // (m + n)


def factorized_params(k: int, m: int, n: int, bias: bool) -> int:
    return k * (m + n) + (m if bias else 0)


def dense_params(m: int, n: int, bias: bool) -> int:
    return m * n + (m if bias else 0)


def _clamp(k: int, m: int, n: int) -> int:
    return max(1, min(int(k), m, n))


def rank_for_ratio(m: int, n: int, ratio: float) -> int:
    """k = floor((1 - ratio)·m·n / (m + n)) in exact rational arithmetic (0.2 is 1/5, not
    0.2000000000000000111), clamped to [1, min(m, n)]."""
    keep = 1 - Fraction(ratio).limit_denominator(10**9)
    return _clamp((keep.numerator * m * n) // (keep.denominator * (m + n)), m, n)


def rank_for_alpha(m: int, n: int, alpha: float) -> int:
    """k = floor(alpha·min(m, n)), clamped to [1, min(m, n)]."""
    a = Fraction(alpha).limit_denominator(10**9)
    return _clamp((a.numerator * min(m, n)) // a.denominator, m, n)


def rank_for_energy(s: torch.Tensor, energy: float) -> int:
    """Smallest k with Σ_{i≤k} σ_i² ≥ energy·Σ σ_i² (s: every singular value, descending)."""
    e = s.double().square()
    cum = e.cumsum(0)
    total = cum[-1]
    if total <= 0:
        return 1
    # a relative tolerance so that energy=1.0 is met by the full (numerical) rank
    k = int((cum < energy * total * (1 - 1e-12)).sum()) + 1
    return max(1, min(k, s.numel()))


def energy_kept(s: torch.Tensor, k: int, total: float | None = None) -> float:
    """Σ_{i≤k} σ_i² / total (total defaults to Σ σ_i² over `s`)."""
    e = s.double().square()
    tot = float(e.sum()) if total is None else float(total)
    if tot <= 0:
        return 1.0
    return min(float(e[:k].sum()) / tot, 1.0)


@dataclass
class LayerSpec:
    """What the allocator needs of a layer: its name and shape (m = d_out, n = d_in)."""

    name: str
    m: int
    n: int
    bias: bool


@dataclass
class RankDecision:
    """rank None: the layer stays dense (`reason` says why). `requested`: the policy's rank
    before the break-even guard. `policy`: where the rank came from."""

    rank: int | None
    policy: str
    requested: int | None = None
    reason: str = ""


def match_key(name: str, key: str) -> bool:
    """`key` is a run of whole dotted pieces of `name`: "mlp" and "self_attn.q_proj" match
    "model.layers.0.self_attn.q_proj"/"model.layers.0.mlp.up_proj"; "proj" matches neither."""
    return f".{key.strip('.')}." in f".{name}."


def find_override(name: str, overrides: dict) -> tuple[str, object] | None:
    """The override whose key matches `name`; the longest (most specific) key wins."""
    hits = [k for k in overrides if match_key(name, k)]
    if not hits:
        return None
    key = max(hits, key=len)
    return key, overrides[key]


def round_to_multiple(k: int, multiple: int, m: int, n: int, force: bool = False
                      ) -> tuple[int | None, str]:
    """(rank, note) after aligning rank k of an m x n layer to `multiple` = q.

    k' = q·floor(k/q), or q itself when k < q (the smallest aligned rank, a round-UP). The
    break-even guard then applies to k': the layer stays dense (rank None, the note says why)
    when k'·(m + n) ≥ m·n, unless `force`; a k' above min(m, n) cannot be factorised at all:
    dense, or under `force` the unrounded k. The note names the direction ("" when k' = k).
    """
    q = int(multiple)
    if q <= 1 or k % q == 0:
        return k, ""
    k2 = k - k % q if k >= q else q
    way = "down" if k2 < k else "up"
    if k2 > min(m, n):
        if force:
            return k, f"not rounded: multiple {q} > min(d_out, d_in) = {min(m, n)}"
        return None, (f"rank {k} rounded up to {k2} (rank_multiple={q}) exceeds min(d_out, d_in) "
                      f"= {min(m, n)}: kept dense")
    if not saves(k2, m, n) and not force:
        return None, (f"rank {k} rounded {way} to {k2} (rank_multiple={q}) >= break-even "
                      f"{break_even_rank(m, n):.1f}: {k2 * (m + n):,} factor weights vs {m * n:,} "
                      "dense saves nothing")
    return k2, f"rounded {way} to a multiple of {q}"


def _guard(k: int, spec: LayerSpec, policy: str, force: bool) -> RankDecision:
    m, n = spec.m, spec.n
    if saves(k, m, n) or force:
        return RankDecision(k, policy, k)
    return RankDecision(None, policy, k,
                        f"rank {k} >= break-even {break_even_rank(m, n):.1f}: "
                        f"{k * (m + n):,} factor weights vs {m * n:,} dense saves nothing")


def _rank_by_value(policy: str, value: float, spec: LayerSpec, s: torch.Tensor | None) -> int:
    m, n = spec.m, spec.n
    if policy == "ratio" or policy == "budget":  # a float override under budget is a ratio
        return rank_for_ratio(m, n, value)
    if policy == "alpha":
        return rank_for_alpha(m, n, value)
    if policy == "energy":
        if s is None:
            raise ValueError(f"{spec.name}: the energy policy needs the layer's singular values")
        return rank_for_energy(s, value)
    raise ValueError(f"unknown policy {policy!r}; expected one of {POLICIES}")


def decide_ranks(specs: list[LayerSpec], policy: str, value: float,
                 overrides: dict | None = None, spectra: dict[str, torch.Tensor] | None = None,
                 force: bool = False, budget_energy: str = "relative") -> dict[str, RankDecision]:
    """Rank per layer (name -> RankDecision) for `policy` in POLICIES with its `value`.

    `spectra` (name -> all singular values, descending) is needed by "energy" and "budget".
    For "budget", `value` is the parameter count the target layers may keep in total.
    """
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    overrides = overrides or {}
    spectra = spectra or {}
    out: dict[str, RankDecision] = {}
    free: list[LayerSpec] = []  # layers the budget allocator decides
    for spec in specs:
        hit = find_override(spec.name, overrides)
        if hit is not None:
            key, v = hit
            if isinstance(v, str):  # "dense"
                out[spec.name] = RankDecision(None, f"override {key!r}: dense", None,
                                              f"kept dense by override {key!r}")
                continue
            if isinstance(v, int):
                k = _clamp(v, spec.m, spec.n)
                out[spec.name] = _guard(k, spec, f"override {key!r}: rank={v}", force)
                continue
            unit = "ratio" if policy == "budget" else policy
            k = _rank_by_value(policy, float(v), spec, spectra.get(spec.name))
            out[spec.name] = _guard(k, spec, f"override {key!r}: {unit}={v}", force)
            continue
        if policy == "budget":
            free.append(spec)
            continue
        k = _rank_by_value(policy, value, spec, spectra.get(spec.name))
        out[spec.name] = _guard(k, spec, f"{policy}={value}", force)
    if policy == "budget":
        fixed = 0
        for spec in specs:
            d = out.get(spec.name)
            if d is not None:
                fixed += (dense_params(spec.m, spec.n, spec.bias) if d.rank is None
                          else factorized_params(d.rank, spec.m, spec.n, spec.bias))
        ranks = allocate_budget(free, [spectra[s.name] for s in free], value - fixed,
                                relative=budget_energy == "relative")
        for spec, k in zip(free, ranks):
            tag = f"budget={int(value):,}"
            if k is None and max_saving_rank(spec.m, spec.n) == 0:
                out[spec.name] = RankDecision(None, tag, None, "even rank 1 saves nothing")
            elif k is None:
                out[spec.name] = RankDecision(None, tag, None,
                                              "budget left over: dense is the best use of it")
            else:
                out[spec.name] = RankDecision(k, tag, k)
    return {spec.name: out[spec.name] for spec in specs}


def allocate_budget(specs: list[LayerSpec], spectra: list[torch.Tensor], budget: float,
                    relative: bool = True) -> list[int | None]:
    """Greedy global allocation of `budget` parameters (biases included) over `specs`.

    Every layer starts at rank 1 (or stays dense if even rank 1 saves nothing). Candidate
    triplets j = 2..max_saving_rank of every layer are scored σ_ij² / (m_i + n_i), with σ² divided
    by the layer's Σσ² when `relative` (error as a share of the layer's own output energy) and
    taken in descending score order while the running cost fits (a prefix of the sorted list,
    so each layer's kept triplets are its top ones). Leftover budget turns saturated layers
    dense, most remaining energy per extra parameter first. Returns a rank or None (dense).
    """
    if not specs:
        return []
    ms = torch.tensor([s.m for s in specs])
    ns = torch.tensor([s.n for s in specs])
    kmax = torch.tensor([min(max_saving_rank(s.m, s.n), s_.numel())
                         for s, s_ in zip(specs, spectra)])
    cost = ms + ns
    bias = torch.tensor([s.m if s.bias else 0 for s in specs])
    can_factor = kmax >= 1
    base = torch.where(can_factor, cost, ms * ns) + bias  # rank 1, or dense if nothing saves
    left = float(budget) - float(base.sum())
    if left < 0:
        raise ValueError(f"budget {int(budget):,} is below the minimum {int(base.sum()):,} "
                         "(rank 1 everywhere) for these layers")
    energies = []
    for s, spec in zip(spectra, specs):
        e = s.detach().double().cpu().square()
        tot = float(e.sum())
        energies.append(e / tot if (relative and tot > 0) else e)
    # flat candidate list: layer index, rank j (2..kmax), score, cost
    counts = (kmax - 1).clamp(min=0)
    layer_idx = torch.repeat_interleave(torch.arange(len(specs)), counts)
    scores = torch.cat([energies[i][1:int(kmax[i])] for i in range(len(specs))]) \
        / cost[layer_idx].double()
    order = torch.sort(scores, descending=True, stable=True).indices
    spent = cost[layer_idx[order]].double().cumsum(0)
    taken = order[spent <= left]
    left -= float(cost[layer_idx[taken]].sum()) if taken.numel() else 0.0
    ranks = torch.ones(len(specs), dtype=torch.long) + torch.bincount(
        layer_idx[taken], minlength=len(specs))
    result: list[int | None] = [int(k) if ok else None for k, ok in zip(ranks, can_factor)]
    # leftover: make saturated layers dense, best remaining energy per extra parameter first
    saturated = [i for i in range(len(specs)) if can_factor[i] and ranks[i] == kmax[i]]
    if saturated and left > 0:
        extra = {i: int(ms[i] * ns[i] - kmax[i] * cost[i]) for i in saturated}
        gain = {i: float(energies[i][int(kmax[i]):].sum()) for i in saturated}
        for i in sorted(saturated, key=lambda i: gain[i] / max(extra[i], 1), reverse=True):
            if gain[i] > 0 and extra[i] <= left:
                result[i] = None
                left -= extra[i]
    return result


def resolve_budget(budget: float, target_params: int) -> int:
    """A budget as a parameter count: an int ≥ 1 as is, a float in (0, 1) as that fraction of
    the target layers' current parameters."""
    if isinstance(budget, float) and 0 < budget < 1:
        return int(math.floor(budget * target_params))
    return int(budget)
