"""`hylorada tune`: Optuna (TPE, seeded; median pruning) over an adapter's hyper-parameters.

    hylorada tune --method hylorada --n-trials 20 --out runs/tune
    # several workers on one study (start the same command in several shells or machines):
    hylorada tune --n-trials 10 --storage sqlite:////mnt/nfs/tune.db --study hyl-smollm2
    hylorada tune --n-trials 10 --storage postgresql://user@host/db --study hyl-smollm2

Objective: the validation loss after --steps steps; reported every --eval-every steps so that
bad trials are pruned early. Search space: rank, alpha ratio, LoRA+ ratio, learning rate,
dropout, and for hylorada gate_init and residual_init (see hylorada/recipes/tune.py). The best trial
is printed and written to OUT/best_config.json with the `hylorada finetune` flags.
"""
from __future__ import annotations

import argparse

from ..config import HyLoRADAConfig
from .flags import add_config_flags


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("tune", help="Optuna hyper-parameter search (parallel workers share a study)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flags(p, HyLoRADAConfig, ["method"], defaults={"method": "hylorada"})
    p.add_argument("--n-trials", type=int, default=20, help="trials THIS worker runs (default: %(default)s)")
    p.add_argument("--storage", default=None,
                   help="Optuna storage URL shared by the workers (default: sqlite:///OUT/tune.db)")
    p.add_argument("--study", default=None, help="study name (default: <method>-<model>-<data>)")
    p.add_argument("--model", default="smollm2-135m", help="model alias or folder (default: %(default)s)")
    p.add_argument("--data", default="shakespeare", help="kjv, shakespeare or a .txt/.jsonl file or folder")
    p.add_argument("--steps", type=int, default=40, help="training steps per trial (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=4, help="blocks per step (default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=128, help="block length (default: %(default)s)")
    p.add_argument("--eval-every", type=int, default=None,
                   help="valid loss (reported to the pruner) every N steps (default: steps/4)")
    p.add_argument("--valid-blocks", type=int, default=16, help="valid blocks per evaluation (default: %(default)s)")
    p.add_argument("--target-modules", nargs="+", default=["all-linear"],
                   help="module names/suffixes or 'all-linear' (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="training seed (data order, init; the same for every trial) and TPE seed (default: %(default)s)")
    p.add_argument("--sampler-seed", type=int, default=None,
                   help="TPE seed (default: --seed for a new study; derived from the pid for extra workers)")
    p.add_argument("--startup-trials", type=int, default=4,
                   help="random trials before TPE, and trials before pruning starts (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu | cuda (default: %(default)s)")
    p.add_argument("--out", default="runs/tune", help="output folder (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="quiet")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    import torch

    from ..recipes.tune import TuneSettings, check_storage, run_tune
    from .checks import check_out_dir, check_positions, load_docs
    from .flags import as_flags
    from .load import load_model_checked

    if args.threads:
        torch.set_num_threads(args.threads)
    targets = args.target_modules
    targets = "all-linear" if targets == ["all-linear"] else targets
    with as_flags({"steps": "--steps", "batch_size": "--batch-size", "seq_len": "--seq-len",
                   "eval_every": "--eval-every", "valid_blocks": "--valid-blocks", "targets": "--target-modules"}):
        settings = TuneSettings(method=args.method, model=args.model, data=args.data, steps=args.steps,
                                batch_size=args.batch_size, seq_len=args.seq_len,
                                eval_every=args.eval_every or max(1, args.steps // 4),
                                valid_blocks=args.valid_blocks, seed=args.seed, targets=targets,
                                device=args.device)
    if args.storage is not None:
        with as_flags({"storage": "--storage"}):
            check_storage(args.storage)
    check_out_dir(args.out)
    load_docs(args.data, "train")
    load_docs(args.data, "valid")

    def model_factory():
        model, tokenizer = load_model_checked(args.model, dtype=settings.dtype, device=args.device)
        check_positions(model, {"--seq-len": args.seq_len})
        return model, tokenizer

    res = run_tune(settings, n_trials=args.n_trials, storage=args.storage, study_name=args.study,
                   out_dir=args.out, sampler_seed=args.sampler_seed, n_startup_trials=args.startup_trials,
                   model_factory=model_factory, progress=not args.no_progress)
    print(f"this worker ran trials {res.trial_numbers}; the study has {res.n_trials_total} trial(s)")
    return 0
