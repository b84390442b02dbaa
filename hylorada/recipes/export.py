"""Export a saved hylorada adapter: as a peft adapter folder, or merged into a plain model.

    load base model -> HyLoRADAModel.from_pretrained(base, adapter) ->
        "peft":   export_peft(out)                   (loads with peft.PeftModel.from_pretrained)
        "merged": merge_and_unload() -> save_pretrained(out) + tokenizer
                  (a compressed base is saved with save_compressed and loads with load_model)

The output folder must not exist yet (or be empty); it is written under a temporary sibling name
and renamed into place (hylorada/utils/io.py), so an interrupted export leaves nothing
half-written at `out`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import UsageError
from ..utils.io import atomic_output_dir

EXPORT_KINDS = ("peft", "merged")


def adapter_base_name(adapter_dir: str | os.PathLike) -> str | None:
    """The base model recorded in a saved adapter (None if not recorded)."""
    from ..model import adapter_files

    config_path, _ = adapter_files(Path(adapter_dir))
    return json.loads(config_path.read_text()).get("base_model_name_or_path")


def load_adapted(model_name: str | None, adapter_dir: str | os.PathLike, dtype="float32", device="cpu"):
    """(HyLoRADAModel, tokenizer): the base model (`model_name`, else the one the adapter records)
    with the adapter loaded."""
    from ..loading import load_model
    from ..model import HyLoRADAModel

    name = model_name or adapter_base_name(adapter_dir)
    if not name:
        raise UsageError(f"--model is missing: the adapter in {adapter_dir} records no base model; "
                         "pass the model it was trained on")
    model, tokenizer = load_model(name, dtype=dtype, device=device)
    return HyLoRADAModel.from_pretrained(model, adapter_dir), tokenizer


def export_adapter(adapter_dir: str | os.PathLike, to: str, out: str | os.PathLike,
                   model_name: str | None = None, dtype="float32") -> Path:
    """Write the adapter at `adapter_dir` as `to` ("peft" or "merged") into the new folder `out`."""
    if to not in EXPORT_KINDS:
        raise UsageError(f"--to={to!r} is invalid: allowed {list(EXPORT_KINDS)}")
    out = Path(out)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise UsageError(f"output {out} already exists: choose a new folder (nothing was written)")
    wrapped, tokenizer = load_adapted(model_name, adapter_dir, dtype=dtype)
    with atomic_output_dir(out, kind=f"export-{to}", flag="OUT") as tmp:
        _write(wrapped, tokenizer, to, tmp)
    return out


def _write(wrapped, tokenizer, to: str, folder: Path) -> None:
    from ..compress.api import factorized_layers, save_compressed

    if to == "peft":
        wrapped.export_peft(folder)
        return
    merged = wrapped.merge_and_unload()
    if factorized_layers(merged):
        save_compressed(merged, folder, tokenizer=tokenizer)
    else:
        merged.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
