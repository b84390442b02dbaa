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
import json
import time
from pathlib import Path

from ..errors import UsageError
from ..utils.env import environment
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


def _table(rows: list[tuple[str, str]]) -> str:
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{w}}  {v}" for k, v in rows)


def run(args: argparse.Namespace) -> int:
    import torch

    from .. import data, evaluate
    from ._common import (check_out_file, check_positions, check_tokens, load_docs, load_model_checked,
                          write_text_atomic)

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.stride is not None and not 1 <= args.stride <= args.seq_len:
        raise UsageError(f"--stride {args.stride}: allowed 1..--seq-len ({args.seq_len})")
    check_out_file(args.json_out, "--json", "eval")
    timings: dict[str, float] = {}

    spec = spec_from_args(args, default="kjv")
    load_docs(spec, args.split)  # bad data stops here, before the model loads (memoised)
    t0 = time.perf_counter()
    model, tokenizer = load_model_checked(args.model, dtype=args.dtype, device=args.device)
    check_positions(model, {"--seq-len": args.seq_len})
    timings["load_s"] = time.perf_counter() - t0
    window_prefix = data.resolve_window_prefix(tokenizer, args.window_prefix)
    bos_id = tokenizer.bos_token_id if window_prefix == "bos" else None
    if bos_id is not None and args.stride is not None and args.stride > args.seq_len - 1:
        raise UsageError(f"--stride {args.stride}: with a BOS window prefix it must be in "
                         f"[1, --seq-len - 1 = {args.seq_len - 1}] (or use --window-prefix none)")

    t0 = time.perf_counter()
    docs, ids = data.eval_split(tokenizer, spec, args.split)
    total_tokens = ids.shape[1]
    if args.max_tokens is not None:
        ids = ids[:, : args.max_tokens]
    check_tokens(int(ids.shape[1]), 2, "--data", f"{args.data} ({args.split} split)")
    timings["data_s"] = time.perf_counter() - t0

    progress = not args.no_progress
    size = evaluate.model_size(model)
    t0 = time.perf_counter()
    lim = None
    if args.lim and args.stride is None:  # one pass gives both
        lim = evaluate.lim_perplexity(model, ids, args.seq_len, n_buckets=args.n_buckets,
                                      batch_size=args.batch_size, progress=progress, bos_id=bos_id)
        ppl = {"ppl": lim.ppl, "nll": lim.nll, "n_tokens": lim.n_tokens, "total_nll": lim.total_nll,
               "n_windows": lim.n_windows, "seq_len": args.seq_len, "stride": None, "seconds": lim.seconds,
               "window_prefix": lim.window_prefix}
    else:
        res = evaluate.perplexity(model, ids, args.seq_len, stride=args.stride, batch_size=args.batch_size,
                                  progress=progress, bos_id=bos_id)
        ppl = res.to_dict()
        ppl.pop("window_tokens")
        ppl.pop("window_nll")
        if args.lim:
            lim = evaluate.lim_perplexity(model, ids, args.seq_len, n_buckets=args.n_buckets,
                                          batch_size=args.batch_size, progress=progress, bos_id=bos_id)
    timings["eval_s"] = time.perf_counter() - t0

    rows = [
        ("model", str(args.model)),
        ("data", f"{spec} / {args.split} ({len(docs)} documents, {total_tokens:,} tokens)"),
        ("evaluated tokens", f"{ids.shape[1]:,}" + (f" (--max-tokens {args.max_tokens})" if args.max_tokens else "")),
        ("windows", f"{ppl['n_windows']} x {args.seq_len}" + (f", stride {args.stride}" if args.stride else
                                                            " (non-overlapping)")),
        ("window prefix", window_prefix + (f" (BOS id {bos_id} starts every window)" if bos_id is not None else "")),
        ("scored tokens", f"{ppl['n_tokens']:,}"),
        ("perplexity", f"{ppl['ppl']:.4f}"),
        ("NLL / token", f"{ppl['nll']:.5f} nats"),
        ("model size", f"{size.n_bytes / 2**20:.1f} MiB, {size.n_params:,} parameters"),
        ("load / data / eval", f"{timings['load_s']:.1f} s / {timings['data_s']:.1f} s / {timings['eval_s']:.1f} s"),
    ]
    if lim is not None:
        rows.append(("LiM perplexity", f"{lim.lim_ppl:.4f} (mean of {lim.n_buckets} bucket PPLs)"))
    print(_table(rows))
    if lim is not None:
        print("\n  bucket  positions      tokens        ppl")
        for b, (p, c) in enumerate(zip(lim.bucket_ppl, lim.bucket_tokens)):
            lo, hi = b / lim.n_buckets, (b + 1) / lim.n_buckets
            print(f"  {b:>6}  {lo:4.2f}-{hi:4.2f}  {c:>10,}  {p:>9.4f}")

    if args.json_out:
        out = {
            "command": "eval",
            "args": {k: v for k, v in vars(args).items() if k != "func"},
            "data": {"name": str(spec), "split": args.split, "documents": len(docs),
                     "tokens_total": int(total_tokens), "tokens_evaluated": int(ids.shape[1])},
            "window_prefix": window_prefix,
            "perplexity": ppl,
            "lim": lim.to_dict() if lim is not None else None,
            "size": size.to_dict(),
            "timings": timings,
            "env": environment(args.device),
        }
        path = Path(args.json_out)
        write_text_atomic(path, json.dumps(evaluate.jsonable(out), indent=2))
        print(f"\n  wrote {path}")
    return 0


