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
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..layers import in_out_features
from .config import DTYPES, CompressConfig  # noqa: F401
from .factorized import FactorizedLinear

log = logging.getLogger(__name__)

FORMAT = "hylorada.compressed"
FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
META_NAME = "compress.json"
CONFIG_NAME = "config.json"


# --------------------------------------------------------------------------------------------
# compress_model and its pieces live in factorize.py / report.py / targets.py; imported here so
# that `from hylorada.compress.api import compress_model, CompressReport, ...` keeps working
# --------------------------------------------------------------------------------------------
from .factorize import compress_model  # noqa: E402,F401
from .report import CompressReport, LayerReport  # noqa: E402,F401
from .targets import (decoder_layer_lists, factorized_layers, find_target_layers,  # noqa: E402,F401
                      set_module as _set_module, stored_size)


# --------------------------------------------------------------------------------------------
# save / load
# --------------------------------------------------------------------------------------------
def _write_atomically(directory: Path, fill) -> None:
    """Fill a temporary sibling directory, then rename it onto `directory` (replacing it)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    umask = os.umask(0)
    os.umask(umask)
    try:
        fill(tmp)
        # mkdtemp (and safetensors) create owner-only entries; give them the usual umask modes
        os.chmod(tmp, 0o777 & ~umask)
        for f in tmp.iterdir():
            if f.is_file():
                os.chmod(f, 0o666 & ~umask)
        if directory.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=directory.parent))
            os.replace(directory, old / "d")
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_compressed(model: nn.Module, directory: str | os.PathLike, report: CompressReport | None = None,
                    tokenizer=None, extra: dict[str, str] | None = None) -> Path:
    """Write `directory` (atomically: a temporary sibling renamed into place, replacing an
    existing one): config.json (the base model's HF config, no quantization_config),
    model.safetensors (the whole state dict, tied tensors stored once) and compress.json
    (format, per-layer ranks and shapes, optionally the report); the tokenizer's files when
    given, and `extra` text files (name -> content). No pickle anywhere."""
    from safetensors.torch import save_model

    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise ValueError("save_compressed needs a transformers model with a .config")
    cfg = config.to_dict()
    cfg.pop("quantization_config", None)
    layers = {name: {"rank": m.rank, "d_in": m.in_features, "d_out": m.out_features,
                     "bias": m.bias is not None}
              for name, m in factorized_layers(model).items()}
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "layers": layers,
            "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
            "report": None if report is None else report.to_dict()}

    def fill(tmp: Path) -> None:
        (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str) + "\n")
        (tmp / META_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        save_model(model, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        for fname, text in (extra or {}).items():
            if Path(fname).name != fname or fname in (CONFIG_NAME, META_NAME, WEIGHTS_NAME):
                raise ValueError(f"extra file name {fname!r} must be a plain, unused file name")
            (tmp / fname).write_text(text)

    directory = Path(directory)
    _write_atomically(directory, fill)
    return directory


def read_compressed_meta(directory: str | os.PathLike) -> dict:
    meta = json.loads((Path(directory) / META_NAME).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{directory}: not a hylorada compressed model (format {meta.get('format')!r})")
    if meta.get("version", 0) > FORMAT_VERSION:
        raise ValueError(f"{directory}: format version {meta['version']} is newer than this "
                         f"hylorada ({FORMAT_VERSION})")
    return meta


def load_compressed(directory: str | os.PathLike, dtype: torch.dtype | str | None = None,
                    device: torch.device | str | None = None) -> nn.Module:
    """Rebuild the model from config.json (AutoModelForCausalLM.from_config, no remote code),
    swap in FactorizedLinear layers of the saved ranks, load model.safetensors strictly
    (each tensor in its saved dtype; tied weights re-tied by the architecture), then cast to
    `dtype` / move to `device` if given. Returns the model in eval mode."""
    from safetensors import safe_open
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    meta = read_compressed_meta(directory)
    config = AutoConfig.from_pretrained(str(directory), trust_remote_code=False,
                                        local_files_only=True)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    weights = directory / WEIGHTS_NAME
    st_dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                 "F64": torch.float64}
    with safe_open(str(weights), framework="pt") as f:
        saved_dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    floating = [st_dtypes[c] for c in saved_dtypes.values() if c in st_dtypes]
    if dtype is not None:
        dtype = DTYPES[dtype.removeprefix("torch.")] if isinstance(dtype, str) else dtype
    # built in the final dtype as from_pretrained(dtype=...) builds it: non-persistent buffers
    # (RoPE inv_freq: float32 always) come out as transformers makes them
    build = dtype or (max(set(floating), key=floating.count) if floating else torch.float32)
    model = AutoModelForCausalLM.from_config(config, trust_remote_code=False, dtype=build)
    for name, spec in meta["layers"].items():
        old = model.get_submodule(name)
        d_in, d_out = in_out_features(old)
        if (d_in, d_out) != (spec["d_in"], spec["d_out"]):
            raise ValueError(f"{name}: saved shape {spec['d_out']} x {spec['d_in']} does not match "
                             f"the architecture's {d_out} x {d_in}")
        _set_module(model, name, FactorizedLinear(d_in, d_out, spec["rank"], bias=spec["bias"],
                                                  dtype=build))
    named = dict(model.named_parameters(remove_duplicate=False))
    named.update(dict(model.named_buffers(remove_duplicate=False)))
    with torch.no_grad():
        for k, code in saved_dtypes.items():
            t = named.get(k)
            want = st_dtypes.get(code)
            if t is not None and want is not None and t.dtype != want:
                t.data = t.data.to(want)
    load_model(model, str(weights), strict=True)
    if dtype is not None:
        from ..loading import cast_weights
        cast_weights(model, dtype)
    if device is not None:
        model.to(device)
    return model.eval()


# --------------------------------------------------------------------------------------------
# recovery: a workflow, in hylorada/recipes/compress.py (imported on first use: recipes sit above)
# --------------------------------------------------------------------------------------------
RECOVER_SCHEDULES = ("sequential", "joint")
RECOVER_TARGETS = ("factors", "layers")


def recover_compressed(model: nn.Module, train_blocks: dict, **kwargs) -> dict:
    """hylorada.recipes.compress.recover_compressed (see there)."""
    from ..recipes.compress import recover_compressed as recover
    return recover(model, train_blocks, **kwargs)
