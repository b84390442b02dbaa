"""Which layers of a model are compression targets, how big a model is, and module surgery."""
from __future__ import annotations

from torch import nn

from .factorized import FactorizedLinear


def _conv1d_type():
    from transformers.pytorch_utils import Conv1D
    return Conv1D


def _dense_types():
    return (nn.Linear, _conv1d_type())


def decoder_layer_lists(model: nn.Module) -> list[str]:
    """Names of the ModuleLists holding the decoder blocks (length = config.num_hidden_layers)."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if not n:
        return []
    return [name for name, mod in model.named_modules()
            if isinstance(mod, nn.ModuleList) and len(mod) == n and name]


def split_layer_name(name: str) -> tuple[str, int, str] | None:
    """'model.layers.3.self_attn.q_proj' -> ('model.layers', 3, 'self_attn.q_proj'): the name cut
    at its first all-digit piece, the decoder-layer index (target layers sit inside the decoder
    ModuleList, see decoder_layer_lists; a later digit piece is e.g. an expert's index); None
    when no piece is a number."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[:i]), int(part), ".".join(parts[i + 1:])
    return None


def layer_index(name: str) -> int | None:
    """The decoder-layer index in a module name (split_layer_name), or None."""
    split = split_layer_name(name)
    return None if split is None else split[1]


def find_target_layers(model: nn.Module, target_modules: list[str] | None = None
                       ) -> dict[str, nn.Module]:
    """name -> nn.Linear / Conv1D to compress, in module order.

    Candidates are the dense linears inside the decoder layers (every dense linear except the
    output embeddings when no decoder list is found); `target_modules` (dotted name pieces,
    see ranks.match_key) narrows them. lm_head / embeddings are never targets.
    """
    from .ranks import match_key

    excluded = set()
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    in_emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    for m in (out_emb, in_emb):
        if m is not None:
            excluded.add(id(m))
    prefixes = [p + "." for p in decoder_layer_lists(model)]
    types = _dense_types()
    found: dict[str, nn.Module] = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, types) or id(mod) in excluded or name.split(".")[-1] == "lm_head":
            continue
        if prefixes and not any(name.startswith(p) for p in prefixes):
            continue
        if target_modules is not None and not any(match_key(name, t) for t in target_modules):
            continue
        found[name] = mod
    if not found:
        raise ValueError(f"target_modules {target_modules!r} matched no Linear/Conv1D layer inside "
                         "the decoder layers")
    return found


def stored_size(model: nn.Module) -> tuple[int, int]:
    """(parameters, bytes) of everything a saved model stores: every parameter and persistent
    buffer, tensors shared by several names (tied embeddings) counted once."""
    params = {id(p) for p in model.parameters()}
    seen: set[tuple] = set()
    n_params = n_bytes = 0
    for t in model.state_dict(keep_vars=True).values():
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), t.numel(), t.dtype) \
            if t.device.type != "meta" else (id(t),)
        if key in seen:
            continue
        seen.add(key)
        n_bytes += t.numel() * t.element_size()
        if id(t) in params:
            n_params += t.numel()
    return n_params, n_bytes



def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule called `name` (dotted) by `new`."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def factorized_layers(model: nn.Module) -> dict[str, FactorizedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, FactorizedLinear)}
