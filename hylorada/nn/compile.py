"""A compiled forward for training: the whole model, or each repeated block once ("regional").

`compile_forward(model, scope)` returns a module to call in place of `model`; `model` itself is
left uncompiled (evaluation, merging and saving see the plain modules and the same parameters).

- scope "blocks" (regional compilation, as in PyTorch's regional-compilation recipe): every
  module of a ModuleList whose children are all of one class (a decoder's layers) is wrapped in
  torch.compile; the blocks share one compiled graph (their parameters are graph inputs), so
  compile time is that of one block, not of the whole depth. Everything else (embeddings, final
  norm, head, loss) runs eagerly. The returned module is a shallow copy down to those lists,
  sharing every parameter and buffer with `model`. A DDP wrapper is copied the same way: its
  forward (bucketing, gradient hooks on the shared parameters) runs eagerly around the compiled
  blocks, whose backward produces each block's gradients as one unit, as in eager. Used when the
  model has such a list, and only when the blocks are alike (the same module types, parameter
  names, shapes and dtypes): blocks that differ (ranks allocated per layer, an adapter left out
  of one layer) would each compile a graph of their own and pass dynamo's recompile limit, so
  such a model is compiled whole instead. (accelerate's compile_regions also compiles the other children one by
  one, which makes dynamo recompile one wrapper per module kind.)
- scope "model": torch.compile(model), one graph for the whole forward.
"""
from __future__ import annotations

import logging
from types import MethodType

import torch
from torch import nn

logger = logging.getLogger(__name__)
SCOPES = ("blocks", "model")


def is_fsdp(model: nn.Module) -> bool:
    """True when `model` or a module inside it is wrapped by torch's FullyShardedDataParallel
    (accelerate's FSDP1): its parameters are then flat shards outside the units' forwards."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    return any(isinstance(m, FullyShardedDataParallel) for m in model.modules())


def has_repeated_blocks(model: nn.Module) -> bool:
    """True when some nn.ModuleList holds >= 2 modules, all of one class."""
    return any(_is_repeated(m) for m in model.modules())


def blocks_alike(model: nn.Module) -> bool:
    """True when, in every repeated-block list, the blocks have the same module types and the
    same parameter names, shapes and dtypes (so one compiled graph serves them all)."""
    return all(len({_signature(c) for c in m}) == 1 for m in model.modules() if _is_repeated(m))


def _signature(block: nn.Module) -> tuple:
    return (tuple((n, type(m).__name__) for n, m in block.named_modules()),
            tuple((n, tuple(p.shape), p.dtype) for n, p in block.named_parameters()))


def compile_forward(model: nn.Module, scope: str = "model", **compile_kwargs) -> nn.Module:
    """The module to call for compiled forwards (see the module docstring); `compile_kwargs`
    go to torch.compile (backend, dynamic, mode, ...). Falls back to scope "model" when the
    model has no repeated blocks, when its blocks are not alike (`blocks_alike`), or when it is
    wrapped by FSDP (its units' state would be shared by shallow copies); the fallback is
    logged. A DDP wrapper keeps scope "blocks" (module doc)."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if scope == "blocks":
        why = ("it is wrapped by FSDP" if is_fsdp(model) else "it has no repeated blocks" if not has_repeated_blocks(model)
               else "its blocks differ in shape (e.g. ranks per layer)" if not blocks_alike(model) else None)
        if why is None:
            return _regional(model, compile_kwargs)
        logger.info("compile scope 'blocks' -> 'model': %s", why)
    return torch.compile(model, **compile_kwargs)


def _is_repeated(m: nn.Module) -> bool:
    return isinstance(m, nn.ModuleList) and len(m) > 1 and len({type(c) for c in m}) == 1


def _regional(module: nn.Module, kw: dict) -> nn.Module:
    """A shallow copy of `module` whose repeated-block lists hold compiled blocks."""
    if _is_repeated(module):
        return nn.ModuleList(torch.compile(c, **kw) for c in module)
    if not has_repeated_blocks(module):
        return module
    new = module.__class__.__new__(module.__class__)
    new.__dict__.update(module.__dict__)  # shares _parameters, _buffers, hooks
    for name, value in list(new.__dict__.items()):  # methods bound to the original instance
        if getattr(value, "__self__", None) is module and hasattr(value, "__func__"):
            new.__dict__[name] = MethodType(value.__func__, new)
    new._modules = {name: _regional(child, kw) if child is not None else None
                    for name, child in module._modules.items()}
    return new
