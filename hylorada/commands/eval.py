"""`hylorada eval`: perplexity (and optionally LiM perplexity) of a model on a corpus split.

    hylorada eval --model smollm2-135m --data kjv --split test --seq-len 512 [--lim] [--json out.json]

docs/CLI.md#eval: windows, --stride, --window-prefix, the JSON record.
"""
from __future__ import annotations

import argparse

from ..errors import UsageError
from ..recipes.evaluate import EVAL_FIELDS, EvalSettings
from .data_args import add_data_args, spec_from_args
from .flags import add_common_flags, add_config_flags, command_parser, config_values, parsed


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = command_parser(subparsers, "eval", "perplexity / LiM perplexity of a model on a corpus split", __doc__)
    add_common_flags(p, "model")
    add_data_args(p, default="kjv")
    add_config_flags(p, EvalSettings, EVAL_FIELDS[:-1])
    add_common_flags(p, "dtype", "device", "threads")
    p.add_argument("--json", dest="json_out", default=None, help="write the results to this JSON file")
    add_common_flags(p, "no_progress")
    add_config_flags(p, EvalSettings, EVAL_FIELDS[-1:])  # --window-prefix (last: the order of the JSON's "args")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from .. import data
    from ..recipes.evaluate import evaluate_split
    from .checks import check_out_file, load_docs
    from .load import load_for_run, set_threads

    set_threads(args.threads)
    if args.stride is not None and not 1 <= args.stride <= args.seq_len:
        raise UsageError(f"--stride {args.stride}: allowed 1..--seq-len ({args.seq_len})")
    check_out_file(args.json_out, "--json", "eval")
    spec = spec_from_args(args, default="kjv")
    load_docs(spec, args.split)  # bad data stops here, before the model loads (memoised)
    model, tokenizer, load_s = load_for_run(args.model, args.dtype, args.device, {"--seq-len": args.seq_len})
    bos = data.resolve_window_prefix(tokenizer, args.window_prefix) == "bos"
    if bos and args.stride is not None and args.stride > args.seq_len - 1:
        raise UsageError(f"--stride {args.stride}: with a BOS window prefix it must be in "
                         f"[1, --seq-len - 1 = {args.seq_len - 1}] (or use --window-prefix none)")
    settings = EvalSettings(**config_values(EvalSettings, args, EVAL_FIELDS), data=spec, progress=not args.no_progress,
                            json_out=args.json_out, model_name=str(args.model), record=parsed(args))
    evaluate_split(model, tokenizer, settings, load_s=load_s)
    return 0
