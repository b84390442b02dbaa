"""`hylorada eval`: perplexity (and optionally LiM perplexity) of a model on a corpus split.

    hylorada eval --model smollm2-135m --data kjv --split test --seq-len 512 \\
        [--text-field COLUMN] [--stride S] [--max-tokens N] [--batch-size B] [--lim] [--json out.json] \\
        [--window-prefix auto|bos|none]

--window-prefix: auto (default) starts every window with the tokenizer's BOS when the tokenizer
adds one by default (the BOS is context, not scored; see hylorada/evaluate.py), bos always,
none never. The resolved value is printed and recorded in the JSON.
"""
from __future__ import annotations

import argparse
import time

from ..errors import UsageError
from .data_args import add_data_args, spec_from_args


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("eval", help="perplexity / LiM perplexity of a model on a corpus split",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m",
                   help="alias (smollm2-135m), transformers folder, .gguf file or hub id (default: %(default)s)")
    add_data_args(p, default="kjv")
    p.add_argument("--split", default="test", choices=["train", "valid", "test", "all"],
                   help="which part of --data; a user's data is split 90/5/5 in order (docs/DATA.md) "
                        "(default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=512, help="window length in tokens (default: %(default)s)")
    p.add_argument("--stride", type=int, default=None,
                   help="sliding-window stride (default: non-overlapping windows)")
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate only the first N tokens")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward (default: %(default)s)")
    p.add_argument("--lim", action="store_true", help="also report LiM perplexity (position buckets)")
    p.add_argument("--n-buckets", type=int, default=10, help="LiM buckets (default: %(default)s)")
    p.add_argument("--dtype", default="float32", help="model weights dtype (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", dest="json_out", default=None, help="write the results to this JSON file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--window-prefix", default="auto", choices=["auto", "bos", "none"],
                   help="start every window with BOS: auto (when the tokenizer adds one), bos, none")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    import torch

    from .. import data
    from ..recipes.evaluate import EvalSettings, evaluate_split
    from .checks import check_out_file, check_positions, load_docs
    from .load import load_model_checked

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.stride is not None and not 1 <= args.stride <= args.seq_len:
        raise UsageError(f"--stride {args.stride}: allowed 1..--seq-len ({args.seq_len})")
    check_out_file(args.json_out, "--json", "eval")
    spec = spec_from_args(args, default="kjv")
    load_docs(spec, args.split)  # bad data stops here, before the model loads (memoised)
    t0 = time.perf_counter()
    model, tokenizer = load_model_checked(args.model, dtype=args.dtype, device=args.device)
    check_positions(model, {"--seq-len": args.seq_len})
    load_s = time.perf_counter() - t0
    bos = data.resolve_window_prefix(tokenizer, args.window_prefix) == "bos"
    if bos and args.stride is not None and args.stride > args.seq_len - 1:
        raise UsageError(f"--stride {args.stride}: with a BOS window prefix it must be in "
                         f"[1, --seq-len - 1 = {args.seq_len - 1}] (or use --window-prefix none)")
    settings = EvalSettings(
        data=spec, split=args.split, seq_len=args.seq_len, stride=args.stride, max_tokens=args.max_tokens,
        batch_size=args.batch_size, lim=args.lim, n_buckets=args.n_buckets, window_prefix=args.window_prefix,
        progress=not args.no_progress, json_out=args.json_out, model_name=str(args.model),
        record={k: v for k, v in vars(args).items() if k != "func"})
    evaluate_split(model, tokenizer, settings, load_s=load_s)
    return 0
