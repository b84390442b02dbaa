"""`hylorada compress`: factorise the linear layers of a model with (whitened) truncated SVD.

    hylorada compress --model smollm2-135m --ratio 0.2 --method whiten --calib kjv \\
        --calib-blocks 64 --calib-seq-len 512 --out DIR \\
        [--energy E | --alpha A | --budget P] [--solver full|randomized|gram] \\
        [--override mlp=0.3 --override self_attn=0.1] [--target q_proj --target mlp] \\
        [--recover-steps N --recover-method hylorada --recover-data kjv] \\
        [--eval kjv,shakespeare --max-eval-tokens N | --no-eval]

--ratio r removes the fraction r of the target linears' parameters (SVD-LLM convention:
0.2 keeps 80%, k = floor(0.8·m·n/(m+n)) per matrix). --budget takes a parameter count for the
target linears (120M, 80000000) or a percentage of their current parameters kept (80%).
Calibration: --calib-blocks random non-overlapping blocks of --calib-seq-len tokens from the
train split of --calib (comma-separated corpora share the blocks). Perplexity: the test split
of each --eval corpus, "\\n\\n"-joined, --eval-seq-len windows, the first --max-eval-tokens
tokens, before and after compression (and after recovery). --window-prefix auto|bos|none
(default auto: when the tokenizer adds a BOS by default) starts every calibration block,
recovery block and perplexity window with BOS; results.json records the resolved value. Recovery trains adapters on the
factors (hylorada.recipes.compress.recover_compressed) and merges them back; the rank stays k.

Writes --out atomically (a temporary sibling renamed into place; an existing path is refused
unless it is a previous hylorada output and --overwrite is given): config.json (a marker that
plain transformers refuses), base_config.json, model.safetensors, compress.json (ranks and the
report), the tokenizer, report.md and results.json. Load it with hylorada.load_model(DIR).
"""
from __future__ import annotations

import argparse
import sys
import time

from ..compress import CompressConfig
from ..losses import LOSSES
from ..recipes.compress import EVAL_FIELDS, RECOVER_FIELDS, CompressSettings, sources
from .data_args import add_data_args, spec_from_args
from .flags import SHARE, add_config_flags, as_flags, budget, config_flags, config_values, override

POLICY = ("ratio", "energy", "alpha", "budget")
COMPRESS_FIELDS = ("svd_solver", "whiten_method", "calib_precision", "dtype", "force", "rank_multiple",
                   "allocate", "calibrate", "update")
CALIB_FIELDS = ("calib_blocks", "calib_seq_len", "calib_batch_size", "seed")
CONFIG_FIELDS = ("method", *POLICY, *COMPRESS_FIELDS, *CALIB_FIELDS, "recover_loss", "kd_temperature")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("compress", help="low-rank (whitened) SVD compression of the linear layers",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", default="smollm2-135m",
                   help="alias (smollm2-135m), transformers folder, .gguf file or hub id (default: %(default)s)")
    g.add_argument("--dtype", default="float32", help="model weights dtype (default: %(default)s)")
    g.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads")
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
    g.add_argument("--calib", default="kjv", help="calibration corpora, comma-separated: kjv, shakespeare, files, "
                                                  "folders or dataset names (default: %(default)s)")
    add_config_flags(g, CompressConfig, CALIB_FIELDS, defaults={"calib_blocks": 64, "calib_seq_len": 512})
    add_data_args(p.add_argument_group("data (for the user's files and datasets named by --calib, --eval, "
                                       "--recover-data)"), data=False)
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval", default="kjv,shakespeare", help="test corpora for perplexity (default: %(default)s)")
    g.add_argument("--no-eval", action="store_true", help="skip perplexity")
    add_config_flags(g, CompressSettings, EVAL_FIELDS)
    g = p.add_argument_group("recovery (adapters on the factors, merged back)")
    add_config_flags(g, CompressSettings, RECOVER_FIELDS[:2])
    g.add_argument("--recover-data", default="kjv", help="training corpora, comma-separated (default: %(default)s)")
    add_config_flags(g, CompressSettings, RECOVER_FIELDS[2:])
    add_config_flags(g, CompressConfig, ("recover_loss", "kd_temperature"), choices={"recover_loss": LOSSES})
    add_config_flags(g, CompressSettings, ("recover_targets",))
    g = p.add_argument_group("output")
    add_config_flags(g, CompressSettings, ("out", "overwrite"))
    g.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    import torch

    from ..recipes.compress import compress_and_save
    from ..utils.io import check_output_dir, clean_stale
    from .checks import check_compress_targets, check_out_dir, check_positions, load_docs
    from .load import load_model_checked

    if args.threads:
        torch.set_num_threads(args.threads)
    values = config_values(CompressConfig, args, CONFIG_FIELDS)
    if all(values[f] is None for f in POLICY):
        values["ratio"] = 0.2
    with as_flags(config_flags(CompressConfig, CONFIG_FIELDS) | {"target_modules": "--target",
                                                                  "overrides": "--override"}):
        config = CompressConfig(**values, target_modules=args.target, overrides=dict(args.override))
    check_out_dir(args.out)  # writable (a temp file in the nearest existing folder)
    if args.out:  # before any work: never lose what is at --out (hylorada.utils.io)
        for line in clean_stale(args.out):  # first: restores an output a killed run was replacing
            print(f"  note: {line}", file=sys.stderr)
        check_output_dir(args.out, overwrite=args.overwrite, kind="compressed")
    specs = {flag: [spec_from_args(args, source=n) for n in sources(names)]
             for flag, names in (("--calib", args.calib), ("--eval", args.eval), ("--recover-data", args.recover_data))}
    for flag, split, used in (("--calib", "train", config.needs_calibration), ("--eval", "test", not args.no_eval),
                              ("--recover-data", "train", args.recover_steps > 0)):
        for spec in specs[flag] if used else ():  # bad data stops here, before the model loads
            load_docs(spec, split, flag)
    t0 = time.perf_counter()
    model, tokenizer = load_model_checked(args.model, dtype=args.dtype, device=args.device)
    load_s = time.perf_counter() - t0
    check_positions(model, {"--eval-seq-len": None if args.no_eval else args.eval_seq_len,
                            "--calib-seq-len": args.calib_seq_len if args.method == "whiten" else None,
                            "--recover-seq-len": args.recover_seq_len if args.recover_steps > 0 else None})
    check_compress_targets(model, config)
    settings = CompressSettings(
        **config_values(CompressSettings, args, EVAL_FIELDS + RECOVER_FIELDS + ("recover_targets", "out", "overwrite")),
        calib=specs["--calib"], calib_label=args.calib, eval=None if args.no_eval else specs["--eval"],
        recover_data=specs["--recover-data"], seed=args.seed, progress=not args.no_progress,
        record={"argv": sys.argv, "args": {k: v for k, v in vars(args).items() if k != "func"}})
    compress_and_save(model, tokenizer, config, settings, load_s=load_s)
    return 0
