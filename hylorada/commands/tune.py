"""`hylorada tune`: Optuna (TPE, seeded; median pruning) over an adapter's hyper-parameters.

    hylorada tune --method hylorada --n-trials 20 --out runs/tune
    hylorada tune --n-trials 10 --storage sqlite:////mnt/nfs/tune.db --study hyl   # one more worker

docs/CLI.md#tune: the objective, the search space, workers, OUT/best_config.json.
"""
from __future__ import annotations

import argparse

from ..recipes.tune import TUNE_FIELDS, TuneSettings
from .flags import POS_INT, add_common_flags, add_config_flags, as_flags, command_parser, config_flags, config_values


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = command_parser(subparsers, "tune", "Optuna hyper-parameter search (parallel workers share a study)", __doc__)
    p.add_argument("--n-trials", type=int, default=20, help="trials THIS worker runs (default: %(default)s)")
    p.add_argument("--storage", default=None,
                   help="Optuna storage URL shared by the workers (default: sqlite:///OUT/tune.db)")
    p.add_argument("--study", default=None, help="study name (default: <method>-<model>-<data>)")
    add_config_flags(p, TuneSettings, TUNE_FIELDS, defaults={"eval_every": None, "targets": ["all-linear"]},
                     types={"eval_every": POS_INT},
                     helps={"eval_every": "valid loss (reported to the pruner) every N steps (default: steps/4)"})
    p.add_argument("--sampler-seed", type=int, default=None,
                   help="TPE seed (default: --seed for a new study; derived from the pid for extra workers)")
    p.add_argument("--startup-trials", type=int, default=4,
                   help="random trials before TPE, and trials before pruning starts (default: %(default)s)")
    add_common_flags(p, "out", "threads", "no_progress", defaults={"out": "runs/tune"},
                     helps={"out": "output folder (default: %(default)s)"})
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from ..recipes.tune import check_storage, run_tune
    from .checks import check_out_dir, load_docs
    from .load import load_for_run, set_threads

    set_threads(args.threads)
    values = config_values(TuneSettings, args, TUNE_FIELDS)
    values.update(eval_every=args.eval_every or max(1, args.steps // 4),
                  targets="all-linear" if args.target_modules == ["all-linear"] else args.target_modules)
    with as_flags(config_flags(TuneSettings, TUNE_FIELDS)):
        settings = TuneSettings(**values)
    if args.storage is not None:
        with as_flags({"storage": "--storage"}):
            check_storage(args.storage)
    check_out_dir(args.out)
    load_docs(args.data, "train")
    load_docs(args.data, "valid")

    def model_factory():
        return load_for_run(args.model, settings.dtype, args.device, {"--seq-len": args.seq_len})[:2]

    res = run_tune(settings, n_trials=args.n_trials, storage=args.storage, study_name=args.study,
                   out_dir=args.out, sampler_seed=args.sampler_seed, n_startup_trials=args.startup_trials,
                   model_factory=model_factory, progress=not args.no_progress)
    print(f"this worker ran trials {res.trial_numbers}; the study has {res.n_trials_total} trial(s)")
    return 0
