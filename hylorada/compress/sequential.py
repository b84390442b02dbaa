"""Sequential calibration (`CompressConfig.calibrate="sequential"`): statistics per input group.

The target layers are grouped by the input tensor they read (q/k/v share one, gate/up share
one; o and down read their own) and ordered as the forward pass reaches them
(`forward_groups`). `stream_stats` then yields the statistics of one group at a time: every
calibration batch runs through the model *as it is at that moment* and stops (an exception
raised by a forward pre-hook) as soon as the group's input has been captured. A caller that
factorises the group's layers before asking for the next group therefore whitens every layer
with the activations of the already-compressed layers below it. Memory: one group's n x n
matrices (and one batch's inputs) at a time. Cost: each group re-runs the model up to itself,
about (number of groups / 2) full forward passes of the calibration set in all.

With a `reference` model (the dense one) the same batch also runs through it up to the same
layer, giving the cross-Gram C = (1/N) Σ x_ref x'ᵀ and G_ref = (1/N) Σ x_ref x_refᵀ that the
least-squares update needs (hylorada/compress/update.py).
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .whiten import Gram, iter_batches


class _Captured(Exception):
    """Raised by the capture hook to stop the forward pass once the input is in hand."""


@dataclass
class GroupStats:
    """Calibration statistics of one input group (means over `gram.n_tokens` tokens):
    gram.G = E[x' x'ᵀ] of the inputs the model gives now; cross = E[x_ref x'ᵀ] and
    ref_gram = E[x_ref x_refᵀ] with the reference (dense) model's inputs, None without one."""

    names: list[str]
    gram: Gram
    cross: torch.Tensor | None = None
    ref_gram: torch.Tensor | None = None


def _first_input(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs.get("input", kwargs.get("x"))


def _forward(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None) -> None:
    device = next(model.parameters()).device
    kwargs = {"input_ids": ids.to(device), "use_cache": False}
    if mask is not None:
        kwargs["attention_mask"] = mask.to(device)
    model(**kwargs)


@torch.no_grad()
def forward_groups(model: nn.Module, targets: Mapping[str, nn.Module], calibration) -> list[list[str]]:
    """Target names grouped by shared input tensor, in the order one forward pass reaches them
    (first block of `calibration`, at most 16 tokens). Targets the pass never reaches come last,
    one per group."""
    ids, mask = next(iter_batches(calibration, 1))
    ids, mask = ids[:, :16], None if mask is None else mask[:, :16]
    groups: list[list[str]] = []
    seen: set[str] = set()
    last: list = [None]

    def hook(name):
        def h(module, args, kwargs):
            x = _first_input(args, kwargs)
            if name in seen:
                return None
            seen.add(name)
            if last[0] is not None and x is last[0][0] and x._version == last[0][1]:
                groups[-1].append(name)
            else:
                groups.append([name])
            last[0] = (x, x._version)
            return None
        return h

    handles = [m.register_forward_pre_hook(hook(n), with_kwargs=True) for n, m in targets.items()]
    was_training = model.training
    model.eval()
    try:
        _forward(model, ids, mask)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return groups + [[n] for n in targets if n not in seen]


def capture_input(model: nn.Module, name: str, ids: torch.Tensor, mask: torch.Tensor | None
                  ) -> torch.Tensor:
    """Rows [N, d_in] (float64) of the input that submodule `name` receives on this batch,
    padding (mask 0) left out; the forward pass stops right there."""
    box: list[torch.Tensor] = []

    def hook(module, args, kwargs):
        box.append(_first_input(args, kwargs).detach())
        raise _Captured

    handle = model.get_submodule(name).register_forward_pre_hook(hook, with_kwargs=True)
    try:
        _forward(model, ids, mask)
    except _Captured:
        pass
    finally:
        handle.remove()
    if not box:
        raise RuntimeError(f"{name}: the forward pass never reached this layer")
    x = box[0]
    rows = x.reshape(-1, x.shape[-1])
    if mask is not None:
        rows = rows[mask.reshape(-1).bool().to(rows.device)]
    return rows.double()


@torch.no_grad()
def group_stats(model: nn.Module, names: list[str], calibration, batch_size: int = 4,
                n_blocks: int | None = None, seq_len: int | None = None,
                reference: nn.Module | None = None) -> GroupStats:
    """Statistics of the input of `names[0]` (shared by the whole group) over the calibration
    batches, with the cross terms against `reference` when given."""
    was = [(m, m.training) for m in (model, reference) if m is not None]
    for m, _ in was:
        m.eval()
    G = C = R = None
    n = 0
    try:
        for ids, mask in iter_batches(calibration, batch_size, n_blocks, seq_len):
            x = capture_input(model, names[0], ids, mask)
            if G is None:
                G = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
            G.addmm_(x.mT, x)
            if reference is not None:
                xr = capture_input(reference, names[0], ids, mask).to(x.device)
                if C is None:
                    C, R = torch.zeros_like(G), torch.zeros_like(G)
                C.addmm_(xr.mT, x)
                R.addmm_(xr.mT, xr)
            n += x.shape[0]
    finally:
        for m, t in was:
            m.train(t)
    scale = 1.0 / max(n, 1)
    return GroupStats(list(names), Gram(G.mul_(scale), n),
                      None if C is None else C.mul_(scale), None if R is None else R.mul_(scale))


def stream_stats(model: nn.Module, groups: list[list[str]], calibration, batch_size: int = 4,
                 n_blocks: int | None = None, seq_len: int | None = None,
                 reference: nn.Module | None = None) -> Iterator[GroupStats]:
    """`group_stats` of each group in turn, computed when the caller asks for it (so the
    caller's changes to the model before the next request are seen by it)."""
    for names in groups:
        yield group_stats(model, names, calibration, batch_size, n_blocks, seq_len, reference)
