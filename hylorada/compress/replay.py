"""Replaying the decoder blocks below a changed matrix (the speed-up of allocate="sensitivity").

Sensitivity allocation (hylorada/compress/allocate.py) measures the calibration loss once per
(matrix, candidate rank) with only that matrix truncated. The decoder blocks below the
matrix's block see the same inputs and weights as in the dense run, so they produce the same
outputs. `BlockReplay` records every block's output once (a forward hook per block of the
decoder ModuleList, batch by batch) and, while a matrix of block l is measured, puts stand-ins
in place of blocks 0..l-1 that return the recorded outputs. The loss is the same number. The
work per measurement drops from all L blocks to the L - l above it, about half on average
(the embeddings and the head still run).

The replay only holds while nothing but the blocks' own outputs flows between them (true of
the transformers decoders: masks and rotary tables are made before the loop). `BlockReplay.check`
compares the loss with every block but the last replayed against the full forward's; any
difference (or error) switches the replay off, so a model that breaks the assumption is measured the slow,
exact way.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
from torch import nn

from .targets import decoder_layer_lists, split_layer_name


class _Recorded(nn.Module):
    """Stands in for a block: returns the recorded outputs, one per call, in recording order.
    Other attributes are the block's (a decoder loop may read e.g. `layer.attention_type`)."""

    def __init__(self, outputs: list, block: nn.Module) -> None:
        super().__init__()
        self.outputs, self.calls = outputs, 0
        self.__dict__["_block"] = block  # not a submodule: its parameters stay the model's

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_block"], name)

    def forward(self, *args, **kwargs):
        out = self.outputs[self.calls % len(self.outputs)]
        self.calls += 1
        return _copied(out)  # a later in-place change must not reach the record


class BlockReplay:
    """The recorded outputs of one decoder list's blocks (see the module docstring)."""

    def __init__(self, model: nn.Module) -> None:
        lists = decoder_layer_lists(model)
        self.name = lists[0] if len(lists) == 1 else None
        self.blocks = model.get_submodule(self.name) if self.name else None
        self.outputs: list[list] = []
        self.enabled = False

    def record(self, loss_fn: Callable[[], float], max_bytes: int) -> float:
        """Run `loss_fn` (the full forward) recording each block's outputs; the loss. The replay
        is enabled when there is one decoder list and the records fit in `max_bytes`."""
        if self.blocks is None:
            return loss_fn()
        self.outputs = [[] for _ in self.blocks]
        hooks = [b.register_forward_hook(lambda m, a, out, i=i: self.outputs[i].append(_copied(out)))
                 for i, b in enumerate(self.blocks)]
        try:
            loss = loss_fn()
        finally:
            for h in hooks:
                h.remove()
        self.enabled = sum(_nbytes(o) for outs in self.outputs for o in outs) <= max_bytes
        if not self.enabled:
            self.outputs = []
        return loss

    def check(self, loss_fn: Callable[[], float], full_loss: float, rel_tol: float = 1e-6) -> bool:
        """Replay every block but the last; keep the replay only if the loss equals `full_loss`."""
        if self.enabled:
            try:
                with self.below(len(self.blocks) - 1):
                    loss = loss_fn()
            except Exception:  # noqa: BLE001 - a decoder loop that needs more of a block than its output
                loss = math.nan
            self.enabled = math.isclose(loss, full_loss, rel_tol=rel_tol, abs_tol=1e-9)
            if not self.enabled:
                self.outputs = []
        return self.enabled

    def index_of(self, name: str) -> int | None:
        """The block index of target `name` when it lies in the replayed list, else None."""
        split = split_layer_name(name)
        return split[1] if self.enabled and split is not None and split[0] == self.name else None

    @contextlib.contextmanager
    def below(self, index: int | None):
        """Blocks 0..index-1 replaced by their recorded outputs inside the block (no-op for None)."""
        if not self.enabled or not index:
            yield
            return
        kept = [self.blocks[i] for i in range(index)]
        try:
            for i in range(index):
                self.blocks[i] = _Recorded(self.outputs[i], kept[i])
            yield
        finally:
            for i, block in enumerate(kept):
                self.blocks[i] = block


def _copied(out):
    if isinstance(out, torch.Tensor):
        return out.detach().clone()
    if isinstance(out, tuple):
        return tuple(_copied(o) for o in out)
    return out


def _nbytes(out) -> int:
    if isinstance(out, torch.Tensor):
        return out.numel() * out.element_size()
    if isinstance(out, tuple):
        return sum(_nbytes(o) for o in out)
    return 0
