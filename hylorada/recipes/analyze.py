"""Spectra of a model's linear layers, written to a folder: the workflow behind `hylorada analyze`.

    result = analyze_and_save(model, tokenizer, AnalyzeSettings(calib="kjv", out="out/analyze"))

Calibration blocks (only with `calib`; hylorada.data.calibration_blocks, too little text is refused
naming --calib) -> hylorada.compress.analyze.analyze_model (plain and whitened σ per target layer)
-> OUT/analysis.md, analysis.json, spectra.safetensors (every σ) and spectrum.png, written
atomically (hylorada/utils/io.py atomic_output_dir, output kind "analyze"); the table is printed.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..compress.analyze import Analysis, analyze_model
from ..utils.io import atomic_output_dir
from .compress import calibration_ids


@dataclass
class AnalyzeSettings:
    calib: str | None = None  # calibration corpora, comma-separated; None: plain spectra only
    calib_blocks: int = 16
    calib_seq_len: int = 512
    calib_batch_size: int = 4
    whiten_method: str = "cholesky"
    seed: int = 0
    targets: list[str] | None = None  # module name pieces (None: every linear of the decoder layers)
    out: str = "out/analyze"
    overwrite: bool = False
    progress: bool = True
    model_name: str = ""


def analyze_and_save(model, tokenizer, s: AnalyzeSettings) -> Analysis:
    """The whole run (see the module doc); returns the analysis."""
    from safetensors.torch import save_file

    calibration = None
    if s.calib:
        calibration = calibration_ids(tokenizer, s.calib, s.calib, s.calib_blocks, s.calib_seq_len, s.seed)
    result = analyze_model(model, calibration, s.targets, s.whiten_method, batch_size=s.calib_batch_size,
                           progress=s.progress,
                           model_name=s.model_name + (f", whitened on {s.calib}" if s.calib else ""))
    md = result.to_markdown()
    with atomic_output_dir(Path(s.out), kind="analyze", overwrite=s.overwrite) as tmp:
        (tmp / "analysis.md").write_text(f"# Spectra of {s.model_name}\n\n{md}")
        (tmp / "analysis.json").write_text(json.dumps(result.to_dict(), indent=2))
        save_file(result.spectra(), str(tmp / "spectra.safetensors"))
        result.plot(tmp / "spectrum.png")
    print(md)
    return result
