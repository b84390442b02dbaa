"""compress_model / CompressReport / save_compressed / load_compressed.

    report = compress_model(model, CompressConfig(method="whiten", ratio=0.2), calibration=ids)
    print(report.to_markdown())
    save_compressed(model, "out/smollm2-whiten-20", report=report)
    model = load_compressed("out/smollm2-whiten-20")

compress_model is in factorize.py (the options of CompressConfig: allocation, sequential
calibration, the least-squares update), the reports in report.py, target discovery in
targets.py; recovery is a recipe (hylorada/recipes/compress.py).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from ..layers import in_out_features
from .config import DTYPES, CompressConfig
from .factorize import compress_model
from .factorized import FactorizedLinear
from .report import CompressReport, LayerReport
from .targets import factorized_layers, find_target_layers, set_module as _set_module, stored_size

# the public names: save/load here; the others are defined in config.py, factorize.py, report.py and
# targets.py and re-exported, so that `from hylorada.compress.api import compress_model, ...` works
__all__ = ["CompressConfig", "compress_model", "CompressReport", "LayerReport", "find_target_layers",
           "factorized_layers", "stored_size", "save_compressed", "load_compressed", "read_compressed_meta",
           "base_config", "RECOVER_SCHEDULES", "RECOVER_TARGETS"]

log = logging.getLogger(__name__)

FORMAT = "hylorada.compressed"
FORMAT_VERSION = 2  # 2: config.json is a marker transformers refuses; the real one is base_config.json
WEIGHTS_NAME = "model.safetensors"
META_NAME = "compress.json"
CONFIG_NAME = "config.json"
BASE_CONFIG_NAME = "base_config.json"
MARKER_MODEL_TYPE = "hylorada_compressed"
RESERVED_NAMES = (CONFIG_NAME, BASE_CONFIG_NAME, META_NAME, WEIGHTS_NAME, ".hylorada")


# --------------------------------------------------------------------------------------------
# save / load
# --------------------------------------------------------------------------------------------
def save_compressed(model: nn.Module, directory: str | os.PathLike, report: CompressReport | None = None,
                    tokenizer=None, extra: dict[str, str | bytes] | None = None, *, overwrite: bool = False) -> Path:
    """Write `directory` through hylorada.utils.io.atomic_output_dir (a temporary sibling renamed
    into place; an existing folder that is not a previous output of ours is refused, a previous
    output is replaced only with `overwrite=True`). Files:
    - config.json: a marker transformers refuses (model_type "hylorada_compressed"), so that a
      plain `AutoModelForCausalLM.from_pretrained` fails instead of loading random linears;
    - base_config.json: the base model's HF config (no quantization_config);
    - model.safetensors: the whole state dict, tied tensors stored once;
    - compress.json: format, per-layer ranks and shapes, optionally the report;
    - the tokenizer's files when given, and `extra` files (name -> text, or bytes written as is).
    No pickle anywhere. Load with hylorada.load_model / load_compressed."""
    from safetensors.torch import save_model

    from ..utils.io import atomic_output_dir

    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise ValueError("save_compressed needs a transformers model with a .config")
    for fname in extra or {}:
        if Path(fname).name != fname or fname in RESERVED_NAMES:
            raise ValueError(f"extra file name {fname!r} must be a plain, unused file name")
    cfg = config.to_dict()
    cfg.pop("quantization_config", None)
    layers = {name: {"rank": m.rank, "d_in": m.in_features, "d_out": m.out_features,
                     "bias": m.bias is not None}
              for name, m in factorized_layers(model).items()}
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "layers": layers,
            "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
            "report": None if report is None else report.to_dict()}
    directory = Path(directory)
    with atomic_output_dir(directory, kind="compressed", overwrite=overwrite, flag="output folder") as tmp:
        (tmp / BASE_CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str) + "\n")
        (tmp / META_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        save_model(model, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        for fname, content in (extra or {}).items():
            if isinstance(content, bytes):
                (tmp / fname).write_bytes(content)
            else:
                (tmp / fname).write_text(content)
        # last: the tokenizer may have written a config.json of its own
        (tmp / CONFIG_NAME).write_text(json.dumps(_marker_config(cfg), indent=2) + "\n")
    return directory


def _marker_config(cfg: dict) -> dict:
    return {"model_type": MARKER_MODEL_TYPE, "architectures": ["HyloradaCompressedForCausalLM"],
            "base_model_type": cfg.get("model_type"),
            "hylorada": {"format": FORMAT, "version": FORMAT_VERSION, "base_config": BASE_CONFIG_NAME,
                         "note": "a hylorada compressed model: load it with hylorada.load_model(folder) "
                                 "or hylorada.compress.load_compressed(folder); plain transformers "
                                 "cannot build its factorised layers"}}


def read_compressed_meta(directory: str | os.PathLike) -> dict:
    meta = json.loads((Path(directory) / META_NAME).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{directory}: not a hylorada compressed model (format {meta.get('format')!r})")
    if meta.get("version", 0) > FORMAT_VERSION:
        raise ValueError(f"{directory}: format version {meta['version']} is newer than this "
                         f"hylorada ({FORMAT_VERSION})")
    return meta


def base_config(directory: str | os.PathLike):
    """The base model's transformers config of a compressed folder (base_config.json; the
    config.json of folders written before format version 2)."""
    from transformers import AutoConfig

    directory = Path(directory)
    if (directory / BASE_CONFIG_NAME).is_file():
        cfg = json.loads((directory / BASE_CONFIG_NAME).read_text())
        model_type = cfg.pop("model_type")
        config = AutoConfig.for_model(model_type, **cfg)
    else:
        config = AutoConfig.from_pretrained(str(directory), trust_remote_code=False, local_files_only=True)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


def load_compressed(directory: str | os.PathLike, dtype: torch.dtype | str | None = None,
                    device: torch.device | str | None = None) -> nn.Module:
    """Rebuild the model from base_config.json (AutoModelForCausalLM.from_config, no remote code),
    swap in FactorizedLinear layers of the saved ranks, load model.safetensors (each tensor in its
    saved dtype; tied weights re-tied by the architecture), then cast to `dtype` / move to
    `device` if given. The model is built in its final dtype, as from_pretrained(dtype=...)
    builds it, so non-persistent buffers (RoPE inv_freq: float32 always) come out as
    transformers makes them. Returns the model in eval mode. A missing, unexpected or misshapen
    tensor raises HyloradaError naming the file and the keys."""
    from transformers import AutoModelForCausalLM

    directory = Path(directory)
    meta = read_compressed_meta(directory)
    weights = directory / WEIGHTS_NAME
    saved_dtypes = _saved_dtypes(weights)
    floating = [d for d in saved_dtypes.values() if d is not None]
    if dtype is not None:
        dtype = DTYPES[dtype.removeprefix("torch.")] if isinstance(dtype, str) else dtype
    build = dtype or (max(set(floating), key=floating.count) if floating else torch.float32)
    model = AutoModelForCausalLM.from_config(base_config(directory), trust_remote_code=False, dtype=build)
    for name, spec in meta["layers"].items():
        old = model.get_submodule(name)
        d_in, d_out = in_out_features(old)
        if (d_in, d_out) != (spec["d_in"], spec["d_out"]):
            raise ValueError(f"{name}: saved shape {spec['d_out']} x {spec['d_in']} does not match "
                             f"the architecture's {d_out} x {d_in}")
        _set_module(model, name, FactorizedLinear(d_in, d_out, spec["rank"], bias=spec["bias"],
                                                  dtype=build))
    _load_weights_strict(model, weights, saved_dtypes)
    if dtype is not None:
        from ..nn.cast import cast_weights
        cast_weights(model, dtype)
    if device is not None:
        model.to(device)
    return model.eval()


_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def _saved_dtypes(weights: Path) -> dict[str, torch.dtype | None]:
    """{tensor name: its floating dtype in the safetensors file (None if not floating)}."""
    from safetensors import safe_open

    from ..errors import HyloradaError

    try:
        with safe_open(str(weights), framework="pt") as f:
            return {k: _ST_DTYPES.get(f.get_slice(k).get_dtype()) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise HyloradaError(f"{weights}: not a readable safetensors file ({e})") from e


def _load_weights_strict(model: nn.Module, weights: Path, saved_dtypes: dict) -> None:
    """Load a safetensors file into `model`, each tensor in its saved dtype; every key must match."""
    from safetensors.torch import load_model

    from ..errors import HyloradaError

    named = dict(model.named_parameters(remove_duplicate=False))
    named.update(dict(model.named_buffers(remove_duplicate=False)))
    with torch.no_grad():
        for k, want in saved_dtypes.items():
            t = named.get(k)
            if t is not None and want is not None and t.dtype != want:
                t.data = t.data.to(want)
    try:
        missing, unexpected = load_model(model, str(weights), strict=False)
    except RuntimeError as e:  # shape mismatches
        raise HyloradaError(f"{weights}: tensors do not fit the model ({e})") from e
    if missing or unexpected:
        raise HyloradaError(f"{weights}: missing tensors {sorted(missing)[:10]}, unexpected tensors "
                            f"{sorted(unexpected)[:10]}; the file does not belong to this model or is "
                            "incomplete (write it again)")


# --------------------------------------------------------------------------------------------
# recovery: a workflow, in hylorada/recipes/compress.py (imported on first use: recipes sit above)
# --------------------------------------------------------------------------------------------
RECOVER_SCHEDULES = ("sequential", "joint")
RECOVER_TARGETS = ("factors", "layers")
