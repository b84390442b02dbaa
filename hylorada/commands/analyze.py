"""`hylorada analyze`: singular-value spectra of a model's linear layers (plain and whitened).

    hylorada analyze --model smollm2-135m [--calib kjv] [--calib-blocks N] [--out DIR]

Writes DIR/analysis.md, analysis.json, spectra.safetensors and spectrum.png; docs/CLI.md#analyze.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from .data_args import add_calib_args
from .flags import add_common_flags, command_parser


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = command_parser(subparsers, "analyze", "singular-value spectra of the linear layers (plain, whitened)", __doc__)
    add_common_flags(p, "model")
    add_calib_args(p, default=None, blocks=16, whiten=True, helps={"seed": "seed of the calibration blocks"},
                   help="calibration corpora, comma-separated (e.g. kjv,shakespeare); none: plain spectra only")
    p.add_argument("--target", action="append", default=None, help="module name piece (repeatable)")
    add_common_flags(p, "out", "overwrite", "dtype", "device", "threads", "no_progress",
                     defaults={"out": "out/analyze"}, helps={"out": "output folder (default: %(default)s)"})
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from ..recipes.analyze import AnalyzeSettings, analyze_and_save
    from .checks import check_output, check_targets, load_docs
    from .load import load_for_run, set_threads

    set_threads(args.threads)
    check_output(args.out, args.overwrite, kind="analyze")  # before any work
    for name in filter(None, (n.strip() for n in (args.calib or "").split(","))):
        load_docs(name, "train", "--calib")
    t0 = time.perf_counter()
    model, tokenizer, _ = load_for_run(args.model, args.dtype, args.device,
                                       {"--calib-seq-len": args.calib_seq_len if args.calib else None})
    check_targets(model, args.target)
    analyze_and_save(model, tokenizer, AnalyzeSettings(
        calib=args.calib, calib_blocks=args.calib_blocks, calib_seq_len=args.calib_seq_len,
        calib_batch_size=args.calib_batch_size, whiten_method=args.whiten_method, seed=args.seed,
        targets=args.target, out=args.out, overwrite=args.overwrite, progress=not args.no_progress,
        model_name=str(args.model)))
    print(f"wrote {Path(args.out)}/analysis.md, analysis.json, spectra.safetensors, spectrum.png "
          f"({time.perf_counter() - t0:.1f} s)")
    return 0
