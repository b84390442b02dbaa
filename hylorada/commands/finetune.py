"""`hylorada finetune`: train an adapter on a corpus; perplexity before and after.

    hylorada finetune --method hylorada --data shakespeare --steps 200 --seq-len 256 --out DIR [--resume]

docs/CLI.md#finetune: data and chat, blocks, evaluation, torchrun, the files in DIR.
"""
from __future__ import annotations

import argparse

from ..config import HyLoRADAConfig
from ..recipes.finetune import ADAPTER_FIELDS, RUN_FIELDS, TRAIN_FIELDS, FinetuneSettings
from ..train import TrainConfig
from .data_args import add_data_args, spec_from_args
from .flags import add_common_flags, add_config_flags, as_flags, command_parser, config_flags, config_values, parsed

# None: derived from --steps in `configs` (warm-up 5% of the steps, evaluation and checkpoints every tenth)
DERIVED = {"warmup_steps": lambda s: s // 20, "eval_every": lambda s: max(1, s // 10),
           "save_every": lambda s: max(1, s // 10)}
DEFAULTS = {"method": "hylorada", "lora_plus_ratio": None, **dict.fromkeys(DERIVED)}
HELPS = {
    "lora_plus_ratio": "enable LoRA+: lr of B = ratio x lr (default: off)",
    "warmup_steps": "default: 5%% of --steps", "max_grad_norm": "0 disables clipping",
    "eval_every": "valid loss every N steps (default: steps/10; 0: never)",
    "eval_batches": "valid micro-batches per in-training evaluation (default: all valid blocks)",
    "save_every": "checkpoint every N steps (default: steps/10; 0: only at the end)",
    "overwrite": "start over in an OUT that holds a previous run; the new run is written beside it and replaces "
                 "it only when complete"}


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = command_parser(subparsers, "finetune", "train an adapter (LoRA/DoRA/HyLoRADA/LoRaDA) on a corpus", __doc__)
    g = p.add_argument_group("model and data")
    add_common_flags(g, "model")
    add_data_args(g, default="shakespeare", splits=True, loss_on=True)
    add_config_flags(g, FinetuneSettings, RUN_FIELDS[:2])
    add_common_flags(g, "dtype")
    add_config_flags(p.add_argument_group("adapter"), HyLoRADAConfig, ADAPTER_FIELDS, defaults=DEFAULTS, helps=HELPS)
    g = p.add_argument_group("training")
    add_config_flags(g, TrainConfig, TRAIN_FIELDS, defaults=DEFAULTS, helps=HELPS)
    add_common_flags(g, "threads", "no_progress")
    g = p.add_argument_group("evaluation and output")
    add_config_flags(g, FinetuneSettings, RUN_FIELDS[2:-1])
    g.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint-last")
    add_common_flags(g, "overwrite", helps=HELPS)
    add_config_flags(g, FinetuneSettings, RUN_FIELDS[-1:])
    p.set_defaults(func=run)
    return p


def configs(args: argparse.Namespace) -> tuple[HyLoRADAConfig, TrainConfig]:
    """The adapter and training configs of the flags, with the DERIVED defaults (LoRA+ off without a ratio)."""
    a, t = config_values(HyLoRADAConfig, args, ADAPTER_FIELDS), config_values(TrainConfig, args, TRAIN_FIELDS)
    a.update(target_modules="all-linear" if a["target_modules"] == ["all-linear"] else a["target_modules"],
             lora_plus_enabled=a["lora_plus_ratio"] is not None, lora_plus_ratio=a["lora_plus_ratio"] or 16.0)
    t.update({k: f(args.steps) for k, f in DERIVED.items() if t[k] is None})
    t.update(max_grad_norm=t["max_grad_norm"] or None, out_dir=str(args.out), resume=args.resume,
             progress=not args.no_progress)
    with as_flags({**config_flags(HyLoRADAConfig, ADAPTER_FIELDS), **config_flags(TrainConfig, TRAIN_FIELDS),
                   "resume": "--resume"}):
        return HyLoRADAConfig(**a), TrainConfig(**t)


def run(args: argparse.Namespace) -> int:
    from .. import data
    from ..recipes.finetune import Interrupted, check_run_dir, finetune
    from .checks import finetune_interrupted, load_docs
    from .load import load_for_run, set_threads

    set_threads(args.threads)
    adapter_config, train_config = configs(args)
    mode = check_run_dir(args.out, resume=args.resume, overwrite=args.overwrite)  # before any work
    spec = spec_from_args(args, default="shakespeare")
    for split in data.SPLITS:  # bad data stops here, before anything is written or loaded (memoised)
        load_docs(spec, split)
    data.resolve_loss_on(spec.loss_on, any(d.messages is not None for d in data.load_documents(spec, "train")))
    model, tokenizer, load_s = load_for_run(args.model, args.dtype, "cpu",
                                            {"--seq-len": args.seq_len, "--eval-seq-len": args.eval_seq_len})
    settings = FinetuneSettings(**config_values(FinetuneSettings, args, RUN_FIELDS), data=spec, mode=mode,
                                progress=not args.no_progress, record=parsed(args))
    try:
        return finetune(model, tokenizer, adapter_config, train_config, settings, load_s=load_s)
    except Interrupted as e:
        raise finetune_interrupted(args, e.run_dir) from None
