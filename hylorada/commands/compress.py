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
import json
import sys
import time
from pathlib import Path

from ..errors import UsageError
from ..utils.env import environment
from .data_args import add_data_args, spec_from_args


def _budget(text: str) -> float:
    t = text.strip().lower().replace("_", "").replace(",", "")
    try:
        if t.endswith("%"):
            v = float(t[:-1]) / 100
            if not 0 < v < 1:
                raise ValueError
            return v
        mult = {"k": 1e3, "m": 1e6, "g": 1e9, "b": 1e9}.get(t[-1:], 1)
        v = float(t[:-1] if mult != 1 else t) * mult
        if v < 1:
            raise ValueError
        return int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--budget {text!r}: give a parameter count (120M, 80000000) or a percentage kept (80%)") from None


def _override(text: str) -> tuple[str, object]:
    key, sep, val = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--override {text!r}: expected NAME=VALUE (mlp=0.3, q_proj=64, "
                                         "o_proj=dense)")
    if val == "dense":
        return key, val
    try:
        return key, int(val)
    except ValueError:
        try:
            return key, float(val)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--override {text!r}: VALUE must be a float, an int rank or "
                                             "'dense'") from None


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
    g.add_argument("--method", default="whiten", choices=["svd", "whiten"])
    pol = g.add_mutually_exclusive_group()
    pol.add_argument("--ratio", type=float, default=None,
                     help="fraction of the target linears' parameters removed, in (0, 1) (default: 0.2)")
    pol.add_argument("--energy", type=float, default=None, help="share of Σσ² kept per layer, in (0, 1]")
    pol.add_argument("--alpha", type=float, default=None, help="rank = floor(alpha·min(m, n)), in (0, 1]")
    pol.add_argument("--budget", type=_budget, default=None,
                     help="parameters the target linears keep: a count (120M) or a percentage (80%%)")
    g.add_argument("--target", action="append", default=None,
                   help="module name piece to compress (repeatable; default: every linear of the decoder layers)")
    g.add_argument("--override", action="append", type=_override, default=[],
                   help="NAME=VALUE per-module setting (repeatable): mlp=0.3, q_proj=64 (a rank), o_proj=dense")
    g.add_argument("--solver", default="full", choices=["full", "randomized", "gram"])
    g.add_argument("--whiten-method", default="cholesky", choices=["cholesky", "eigh"])
    g.add_argument("--calib-precision", default="exact", choices=["exact", "mixed"],
                   help="Gram products in float64 (exact) or per batch in the activation dtype, summed in float64 (mixed; fast on a GPU)")
    g.add_argument("--factor-dtype", default=None, help="storage dtype of the factors (default: the model's)")
    g.add_argument("--force", action="store_true", help="factorise even layers whose rank saves nothing")
    g.add_argument("--rank-multiple", type=int, default=1,
                   help="round ranks down to a multiple of this (8 keeps GPU GEMMs aligned)")
    # issue 15 options (hylorada/compress/allocate.py, sequential.py, update.py; hylorada/losses.py)
    g.add_argument("--allocate", default="uniform", choices=["uniform", "loss", "sensitivity"],
                   help="ranks: uniform per matrix, or shared under the same budget by relative "
                        "truncation loss or by measured sensitivity (default: %(default)s)")
    g.add_argument("--calibrate", default="dense", choices=["dense", "sequential"],
                   help="whitening statistics from the dense model or from the model compressed so far")
    g.add_argument("--update", default="none", choices=["none", "lstsq"],
                   help="re-solve the up factors by least squares against the dense outputs")
    g.add_argument("--calib", default="kjv", help="calibration corpora, comma-separated: kjv, shakespeare, files, "
                                                  "folders or dataset names (default: %(default)s)")
    g.add_argument("--calib-blocks", type=int, default=64, help="calibration blocks (default: %(default)s)")
    g.add_argument("--calib-seq-len", type=int, default=512, help="tokens per block (default: %(default)s)")
    g.add_argument("--calib-batch-size", type=int, default=4, help="blocks per forward (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("data (for the user's files and datasets named by --calib, --eval, --recover-data)")
    add_data_args(g, data=False)
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval", default="kjv,shakespeare", help="test corpora for perplexity (default: %(default)s)")
    g.add_argument("--no-eval", action="store_true", help="skip perplexity")
    g.add_argument("--eval-seq-len", type=int, default=512, help="perplexity window (default: %(default)s)")
    g.add_argument("--max-eval-tokens", type=int, default=51200,
                   help="first N test tokens per corpus (default: %(default)s; 0: all)")
    g.add_argument("--eval-batch-size", type=int, default=4)
    g.add_argument("--window-prefix", default="auto", choices=["auto", "bos", "none"],
                   help="start every calibration/recovery block and window with BOS: auto (when the "
                        "tokenizer adds one), bos, none")
    g = p.add_argument_group("recovery (adapters on the factors, merged back)")
    g.add_argument("--recover-steps", type=int, default=0, help="optimizer steps (default: 0 = none)")
    g.add_argument("--recover-method", default="hylorada", choices=["lora", "dora", "hylorada", "lorada"])
    g.add_argument("--recover-data", default="kjv", help="training corpora, comma-separated (default: %(default)s)")
    g.add_argument("--recover-rank", type=int, default=8)
    g.add_argument("--recover-lr", type=float, default=2e-4)
    g.add_argument("--recover-batch-size", type=int, default=16)
    g.add_argument("--recover-seq-len", type=int, default=256)
    g.add_argument("--recover-schedule", default="sequential", choices=["sequential", "joint"],
                   help="sequential: up factors then down factors (SVD-LLM); joint: both at once")
    g.add_argument("--recover-loss", default="lm", choices=["lm", "kd", "kd+lm"],
                   help="next-token loss, distillation from the dense model, or both (default: %(default)s)")
    g.add_argument("--kd-temperature", type=float, default=1.0, help="distillation temperature T")
    g.add_argument("--recover-targets", default="factors", choices=["factors", "layers"],
                   help="factors: adapters on up/down (rank stays k); layers: on whole layers (rank k + r)")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None, help="output directory (default: do not save); an existing "
                   "path is refused unless it is a previous hylorada output and --overwrite is given")
    g.add_argument("--overwrite", action="store_true",
                   help="replace a previous hylorada output at --out (atomically, once the new one is complete)")
    g.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)
    return p


def evaluate_corpora(model, tokenizer, corpora, seq_len: int, max_tokens: int | None,
                     batch_size: int = 4, progress: bool = False, window_prefix: str = "auto") -> dict[str, dict]:
    """{corpus: perplexity result dict} on the test split of each corpus."""
    from .. import data, evaluate

    bos_id = data.window_bos_id(tokenizer, window_prefix)
    out = {}
    for name in _sources(corpora):
        ids = data.eval_split(tokenizer, name, "test")[1]
        if max_tokens:
            ids = ids[:, :max_tokens]
        res = evaluate.perplexity(model, ids, seq_len, batch_size=batch_size, progress=progress,
                                  bos_id=bos_id).to_dict()
        res.pop("window_tokens", None)
        res.pop("window_nll", None)
        out[str(name)] = res
    return out


def recovery_blocks(tokenizer, corpora, seq_len: int, window_prefix: str = "auto") -> dict:
    """Training blocks (hylorada.data.training_blocks) of the train split of each corpus, concatenated."""
    import torch

    from .. import data

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    bos_id = data.window_bos_id(tokenizer, window_prefix)
    parts = [data.training_blocks(tokenizer, n, "train", seq_len, pad, bos_id=bos_id)[0] for n in _sources(corpora)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _sources(corpora) -> list:
    """Corpora as a list: "kjv,my.txt" -> ["kjv", "my.txt"]; a list (of names or DataSpecs) as is."""
    return [c.strip() for c in corpora.split(",") if c.strip()] if isinstance(corpora, str) else list(corpora)


def data_specs(args: argparse.Namespace, corpora: str) -> list:
    """DataSpecs of comma-separated corpora, with --text-field / --data-config."""
    return [spec_from_args(args, source=n) for n in _sources(corpora)]


def run(args: argparse.Namespace) -> int:
    import torch

    from ..compress import CompressConfig, compress_model, save_compressed
    from ..recipes.compress import recover_compressed
    from ..compress.whiten import calibration_blocks
    from ..evaluate import jsonable, model_size
    from ._common import as_flags, check_compress_targets, check_out_dir, check_positions, load_docs, load_model_checked

    if args.threads:
        torch.set_num_threads(args.threads)
    policy = {k: getattr(args, k) for k in ("ratio", "energy", "alpha", "budget") if getattr(args, k) is not None}
    if not policy:
        policy = {"ratio": 0.2}
    with as_flags({"ratio": "--ratio", "energy": "--energy", "alpha": "--alpha", "budget": "--budget",
                   "target_modules": "--target", "overrides": "--override", "dtype": "--factor-dtype",
                   "rank_multiple": "--rank-multiple", "calib_blocks": "--calib-blocks",
                   "calib_seq_len": "--calib-seq-len", "calib_batch_size": "--calib-batch-size", "seed": "--seed",
                   "allocate": "--allocate", "calibrate": "--calibrate", "update": "--update",
                   "recover_loss": "--recover-loss", "kd_temperature": "--kd-temperature"}):
        config = CompressConfig(method=args.method, **policy, target_modules=args.target,
                                overrides=dict(args.override), svd_solver=args.solver, calib_precision=args.calib_precision, rank_multiple=args.rank_multiple,
                                whiten_method=args.whiten_method, calib_blocks=args.calib_blocks,
                                calib_seq_len=args.calib_seq_len, calib_batch_size=args.calib_batch_size,
                                force=args.force, dtype=args.factor_dtype, seed=args.seed,
                                allocate=args.allocate, calibrate=args.calibrate, update=args.update,
                                recover_loss=args.recover_loss, kd_temperature=args.kd_temperature)
    check_out_dir(args.out)  # writable (a temp file in the nearest existing folder)
    if args.out:  # before any work: never lose what is at --out (hylorada.utils.io)
        from ..utils.io import check_output_dir, clean_stale

        for line in clean_stale(args.out):  # first: restores an output a killed run was replacing
            print(f"  note: {line}", file=sys.stderr)
        check_output_dir(args.out, overwrite=args.overwrite, kind="compressed")
    for names, split, used, flag in ((args.calib, "train", config.needs_calibration, "--calib"),
                                     (args.eval, "test", not args.no_eval, "--eval"),
                                     (args.recover_data, "train", args.recover_steps > 0, "--recover-data")):
        for spec in data_specs(args, names) if used else ():  # bad data stops here, before the model loads
            load_docs(spec, split, flag)
    progress = not args.no_progress
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    model, tokenizer = load_model_checked(args.model, dtype=args.dtype, device=args.device)
    timings["load_s"] = time.perf_counter() - t0
    from ..data import resolve_window_prefix
    window_prefix = resolve_window_prefix(tokenizer, args.window_prefix)
    check_positions(model, {"--eval-seq-len": None if args.no_eval else args.eval_seq_len,
                            "--calib-seq-len": args.calib_seq_len if args.method == "whiten" else None,
                            "--recover-seq-len": args.recover_seq_len if args.recover_steps > 0 else None})
    check_compress_targets(model, config)
    max_eval = args.max_eval_tokens or None
    ppl: dict[str, dict] = {}

    def measure(stage: str) -> None:
        if args.no_eval:
            return
        t = time.perf_counter()
        ppl[stage] = evaluate_corpora(model, tokenizer, data_specs(args, args.eval), args.eval_seq_len, max_eval,
                                      args.eval_batch_size, progress, window_prefix)
        timings[f"eval_{stage}_s"] = time.perf_counter() - t
        print(f"  perplexity {stage:>10}: " + ", ".join(f"{k} {v['ppl']:.3f}" for k, v in ppl[stage].items()))

    calibration = None
    if config.needs_calibration:
        # before any perplexity: too little calibration text is refused first
        t = time.perf_counter()
        try:
            calibration = calibration_blocks(tokenizer, data_specs(args, args.calib), args.calib_blocks,
                                             args.calib_seq_len, seed=args.seed, window_prefix=window_prefix)
        except ValueError as e:  # "<corpus> (train) has N blocks of L tokens, M asked"
            raise UsageError(f"--calib {args.calib}: {e}; lower --calib-blocks or --calib-seq-len") from None
        timings["calib_data_s"] = time.perf_counter() - t
    measure("dense")
    size_dense = model_size(model).n_bytes
    teacher = None
    if args.recover_steps > 0 and config.recover_loss != "lm":  # the dense model, kept for KD
        import copy
        teacher = copy.deepcopy(model)
    t = time.perf_counter()
    report = compress_model(model, config, calibration=calibration, progress=progress)
    timings["compress_s"] = time.perf_counter() - t
    print(report.to_markdown())
    print(report.summary())
    measure("compressed")
    recovery = None
    if args.recover_steps > 0:
        blocks = recovery_blocks(tokenizer, data_specs(args, args.recover_data), args.recover_seq_len, window_prefix)
        t = time.perf_counter()
        recovery = recover_compressed(
            model, blocks, method=args.recover_method, steps=args.recover_steps,
            lora_rank=args.recover_rank, schedule=args.recover_schedule, targets=args.recover_targets,
            loss=config.recover_loss, kd_temperature=config.kd_temperature, teacher=teacher,
            train_config={"batch_size": args.recover_batch_size, "lr": args.recover_lr,
                          "progress": progress, "seed": args.seed})
        timings["recover_s"] = time.perf_counter() - t
        print(f"  recovery: {recovery['method']} r={recovery['lora_rank']}, {args.recover_steps} steps "
              f"({recovery['schedule']}), size {recovery['bytes_before'] / 2**20:.1f} -> "
              f"{recovery['bytes_after'] / 2**20:.1f} MiB")
        measure("recovered")
    size_after = model_size(model).n_bytes
    print(f"  model size: {size_dense / 2**20:.1f} MiB dense -> {size_after / 2**20:.1f} MiB")

    results = {"command": "compress", "argv": sys.argv, "args": {k: v for k, v in vars(args).items() if k != "func"},
               "report": report.to_dict(), "window_prefix": window_prefix, "perplexity": ppl, "recovery": recovery,
               "size_bytes": {"dense": size_dense, "final": size_after}, "timings": timings, "env": environment(args.device)}
    if args.out:
        out = save_compressed(model, args.out, report=report, tokenizer=tokenizer, overwrite=args.overwrite,
                              extra={"report.md": report.to_markdown(),
                                     "results.json": json.dumps(jsonable(results), indent=2, default=str)})
        print(f"  wrote {Path(out)}")
    return 0
