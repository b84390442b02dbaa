"""`hylorada analyze`: singular-value spectra of a model's linear layers (plain and whitened).

    hylorada analyze --model smollm2-135m [--calib kjv] [--calib-blocks N] [--out DIR]

Per target layer: the ranks that keep 90/95/99% of Σσ² (of W, and of W·L with calibration
data, where σ² is output energy on the calibration tokens), the break-even rank m·n/(m+n),
and the energy kept at 20% compression. Writes DIR/spectrum.png, DIR/analysis.md,
DIR/analysis.json and DIR/spectra.safetensors (every σ), atomically (an existing DIR is refused
unless it is a previous analyze output and --overwrite is given), and prints the table.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("analyze", help="singular-value spectra of the linear layers (plain, whitened)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m",
                   help="alias (smollm2-135m), transformers folder, .gguf file or hub id (default: %(default)s)")
    p.add_argument("--calib", default=None,
                   help="calibration corpora, comma-separated (e.g. kjv,shakespeare); none: plain spectra only")
    p.add_argument("--calib-blocks", type=int, default=16, help="calibration blocks (default: %(default)s)")
    p.add_argument("--calib-seq-len", type=int, default=512, help="tokens per block (default: %(default)s)")
    p.add_argument("--calib-batch-size", type=int, default=4)
    p.add_argument("--whiten-method", default="cholesky", choices=["cholesky", "eigh"])
    p.add_argument("--target", action="append", default=None, help="module name piece (repeatable)")
    p.add_argument("--out", default="out/analyze", help="output directory (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a previous analyze output at --out (atomically)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    import torch
    from safetensors.torch import save_file

    from ..compress.analyze import analyze_model
    from ..data import calibration_blocks
    from ..compress.api import find_target_layers
    from ..errors import UsageError
    from .checks import check_out_dir, check_positions, load_docs
    from .load import load_model_checked

    from ..utils.io import atomic_output_dir, check_output_dir, clean_stale

    if args.threads:
        torch.set_num_threads(args.threads)
    check_out_dir(args.out)
    clean_stale(args.out)  # restores an output a killed run was replacing, removes its temp folder
    check_output_dir(args.out, overwrite=args.overwrite, kind="analyze")  # before any work
    for name in filter(None, (n.strip() for n in (args.calib or "").split(","))):
        load_docs(name, "train", "--calib")
    t0 = time.perf_counter()
    model, tokenizer = load_model_checked(args.model, dtype=args.dtype, device=args.device)
    check_positions(model, {"--calib-seq-len": args.calib_seq_len if args.calib else None})
    try:
        find_target_layers(model, args.target)
    except ValueError as e:
        raise UsageError(f"--target {' '.join(args.target or [])}: {e}") from None
    calibration = None
    if args.calib:
        try:
            calibration = calibration_blocks(tokenizer, args.calib, args.calib_blocks, args.calib_seq_len,
                                             seed=args.seed)
        except ValueError as e:  # "<corpus> (train) has N blocks of L tokens, M asked"
            raise UsageError(f"--calib {args.calib}: {e}; lower --calib-blocks or --calib-seq-len") from None
    result = analyze_model(model, calibration, args.target, args.whiten_method,
                           batch_size=args.calib_batch_size, progress=not args.no_progress,
                           model_name=f"{args.model}" + (f", whitened on {args.calib}" if args.calib else ""))
    out = Path(args.out)
    md = result.to_markdown()
    with atomic_output_dir(out, kind="analyze", overwrite=args.overwrite) as tmp:
        (tmp / "analysis.md").write_text(f"# Spectra of {args.model}\n\n{md}")
        (tmp / "analysis.json").write_text(json.dumps(result.to_dict(), indent=2))
        save_file(result.spectra(), str(tmp / "spectra.safetensors"))
        result.plot(tmp / "spectrum.png")
    print(md)
    print(f"wrote {out}/analysis.md, analysis.json, spectra.safetensors, spectrum.png "
          f"({time.perf_counter() - t0:.1f} s)")
    return 0
