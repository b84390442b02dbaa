"""`hylorada compress`: factorise the linear layers of a model with (whitened) truncated SVD.

    hylorada compress --model smollm2-135m --ratio 0.2 --method whiten --calib kjv --out DIR \\
        [--energy E | --alpha A | --budget P] [--override mlp=0.3] [--recover-steps N] [--no-eval]

docs/CLI.md#compress: the policies, calibration, recovery, perplexity and the files in DIR.
"""
from __future__ import annotations

import argparse
import sys

from ..compress import CompressConfig
from ..losses import LOSSES
from ..recipes.compress import (COMPRESS_FIELDS, CONFIG_FIELDS, EVAL_FIELDS, POLICY, RECOVER_FIELDS,
                                SETTINGS_FIELDS, CompressSettings)
from .data_args import add_calib_args, add_data_args, checked_specs
from .flags import (SHARE, add_common_flags, add_config_flags, as_flags, budget, command_parser, config_flags,
                    config_values, override, parsed)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = command_parser(subparsers, "compress", "low-rank (whitened) SVD compression of the linear layers", __doc__)
    add_common_flags(p.add_argument_group("model"), "model", "dtype", "device", "threads")
    g = p.add_argument_group("compression")
    add_config_flags(g, CompressConfig, ["method"])
    add_config_flags(g.add_mutually_exclusive_group(), CompressConfig, POLICY, types={"alpha": SHARE, "budget": budget},
                     helps={"ratio": "fraction of the target linears' parameters removed, in (0, 1) (default: 0.2)",
                            "budget": "parameters the target linears keep: a count (120M) or a percentage (80%%)"})
    g.add_argument("--target", action="append", default=None,
                   help="module name piece to compress (repeatable; default: every linear of the decoder layers)")
    g.add_argument("--override", action="append", type=override, default=[],
                   help="NAME=VALUE per-module setting (repeatable): mlp=0.3, q_proj=64 (a rank), o_proj=dense")
    add_config_flags(g, CompressConfig, COMPRESS_FIELDS)
    add_calib_args(g, default="kjv", blocks=64, help="calibration corpora, comma-separated: kjv, shakespeare, "
                                                     "files, folders or dataset names (default: %(default)s)")
    add_data_args(p.add_argument_group("data (for the user's files and datasets named by --calib, --eval, "
                                       "--recover-data)"), data=False)
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval", default="kjv,shakespeare", help="test corpora for perplexity (default: %(default)s)")
    g.add_argument("--no-eval", action="store_true", help="skip perplexity")
    add_config_flags(g, CompressSettings, EVAL_FIELDS)
    g = p.add_argument_group("recovery (adapters on the factors, merged back)")
    add_config_flags(g, CompressSettings, RECOVER_FIELDS[:2])
    g.add_argument("--recover-data", default="kjv", help="training corpora, comma-separated (default: %(default)s)")
    add_config_flags(g, CompressSettings, RECOVER_FIELDS[2:-1])
    add_config_flags(g, CompressConfig, ("recover_loss", "kd_temperature"), choices={"recover_loss": LOSSES})
    add_config_flags(g, CompressSettings, RECOVER_FIELDS[-1:])
    g = p.add_argument_group("output")
    add_config_flags(g, CompressSettings, ("out", "overwrite"))
    add_common_flags(g, "no_progress")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from ..recipes.compress import compress_and_save
    from .checks import check_compress_targets, check_output
    from .load import load_for_run, set_threads

    set_threads(args.threads)
    values = config_values(CompressConfig, args, CONFIG_FIELDS)
    values["ratio"] = 0.2 if all(values[f] is None for f in POLICY) else values["ratio"]
    with as_flags(config_flags(CompressConfig, CONFIG_FIELDS) | {"target_modules": "--target",
                                                                  "overrides": "--override"}):
        config = CompressConfig(**values, target_modules=args.target, overrides=dict(args.override))
    check_output(args.out, args.overwrite, kind="compressed")  # before any work: never lose what is at --out
    specs = checked_specs(args, {"--calib": (args.calib, "train", config.needs_calibration),  # bad data stops here
                                 "--eval": (args.eval, "test", not args.no_eval),
                                 "--recover-data": (args.recover_data, "train", args.recover_steps > 0)})
    model, tokenizer, load_s = load_for_run(args.model, args.dtype, args.device, {
        "--eval-seq-len": None if args.no_eval else args.eval_seq_len,
        "--calib-seq-len": args.calib_seq_len if args.method in ("whiten", "fisher") else None,
        "--recover-seq-len": args.recover_seq_len if args.recover_steps > 0 else None})
    check_compress_targets(model, config)
    compress_and_save(model, tokenizer, config, CompressSettings(
        **config_values(CompressSettings, args, SETTINGS_FIELDS), calib=specs["--calib"], calib_label=args.calib,
        eval=None if args.no_eval else specs["--eval"], recover_data=specs["--recover-data"], seed=args.seed,
        progress=not args.no_progress, record={"argv": sys.argv, "args": parsed(args)}), load_s=load_s)
    return 0
