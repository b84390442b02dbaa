"""`hylorada finetune`: train an adapter on a corpus; perplexity before and after.

    hylorada finetune --model smollm2-135m --method hylorada --data shakespeare --steps 200 \\
        --seq-len 256 --batch-size 16 --grad-accum 1 --lr 2e-4 [--rank 8 --alpha 16 \\
        --dropout 0.05 --target-modules q_proj v_proj --lora-plus-ratio 16] --out DIR \\
        [--resume] [--merge] [--eval-every N --save-every N --seed S --max-eval-tokens N]

Data: --data (a corpus, a .txt/.json/.jsonl/.csv/.parquet file, a folder, a hub dataset; a
user's data is split 90/5/5 in order, docs/DATA.md) or --train/--valid/--test FILE; --text-field
COLUMN. Chat rows (a "messages" column) are rendered with the tokenizer's chat template, with
the loss on the assistant turns only (--loss-on assistant, the default for chat) or on all.
Training blocks: the train split's documents joined by EOS, cut into --seq-len blocks
(conversations are kept whole where they fit, hylorada.data.pack_conversations).
In-training validation: the valid split packed the same way (first --max-eval-tokens tokens).
Perplexity (before/after): valid and test splits, "\\n\\n"-joined, --eval-seq-len windows,
first --max-eval-tokens tokens. --window-prefix auto|bos|none (default auto: when the
tokenizer adds a BOS by default) starts every training block and perplexity window with BOS
(hylorada/data/blocks.py, hylorada/evaluate.py); finetune.json records the resolved value. Runs unchanged under `torchrun --nproc_per_node=K` (the
global batch --batch-size x --grad-accum does not depend on K; perplexity on the main process).

Writes into --out: checkpoint-last/, checkpoint-best/ (resumable with --resume),
train_log.jsonl, adapter/ (HyLoRADAModel.save_adapter), merged/ (with --merge) and
finetune.json (config, losses, timing, perplexities).
"""
from __future__ import annotations

import argparse
import time

from ..config import HyLoRADAConfig
from ..recipes.finetune import ADAPTER_FIELDS, RUN_FIELDS, TRAIN_FIELDS, FinetuneSettings
from ..train import MIXED_PRECISION, SCHEDULES, TrainConfig
from .data_args import add_data_args, spec_from_args
from .flags import add_config_flags, as_flags, config_flags, config_values

# finetune's defaults that differ from the configs' (None: derived from --steps in `configs`)
DEFAULTS = {"method": "hylorada", "warmup_steps": None, "eval_every": None, "save_every": None,
            "lora_plus_ratio": None}
HELPS = {
    "lora_plus_ratio": "enable LoRA+: lr of B = ratio x lr (default: off)",
    "batch_size": "GLOBAL micro-batch in blocks (all processes together) (default: %(default)s)",
    "grad_accum": "micro-batches per step; global batch = batch-size x grad-accum (default: %(default)s)",
    "warmup_steps": "default: 5%% of --steps", "max_grad_norm": "0 disables clipping",
    "mixed_precision": "auto: bf16 autocast on CUDA, fp32 on CPU (default: %(default)s)",
    "eval_every": "valid loss every N steps (default: steps/10; 0: never)",
    "eval_batches": "valid micro-batches per in-training evaluation (default: all valid blocks)",
    "save_every": "checkpoint every N steps (default: steps/10; 0: only at the end)",
}


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("finetune", help="train an adapter (LoRA/DoRA/HyLoRADA/LoRaDA) on a corpus",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="smollm2-135m",
                   help="alias (smollm2-135m), transformers folder, .gguf file or hub id (default: %(default)s)")
    add_data_args(g, default="shakespeare", splits=True, loss_on=True)
    add_config_flags(g, FinetuneSettings, RUN_FIELDS[:2])
    g.add_argument("--dtype", default="float32", help="base weights dtype (default: %(default)s)")
    add_config_flags(p.add_argument_group("adapter"), HyLoRADAConfig, ADAPTER_FIELDS, defaults=DEFAULTS, helps=HELPS)
    g = p.add_argument_group("training")
    add_config_flags(g, TrainConfig, TRAIN_FIELDS, defaults=DEFAULTS, helps=HELPS,
                     choices={"schedule": SCHEDULES, "mixed_precision": MIXED_PRECISION})
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g = p.add_argument_group("evaluation and output")
    add_config_flags(g, FinetuneSettings, RUN_FIELDS[2:-1])
    g.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint-last")
    g.add_argument("--overwrite", action="store_true", help="start over in an OUT that holds a previous run; the "
                   "new run is written beside it and replaces it only when complete")
    add_config_flags(g, FinetuneSettings, RUN_FIELDS[-1:])
    p.set_defaults(func=run)
    return p


def configs(args: argparse.Namespace) -> tuple[HyLoRADAConfig, TrainConfig]:
    """The adapter and training configs of the flags, with finetune's derived defaults
    (warm-up 5% of the steps, evaluation and checkpoints every tenth, LoRA+ off without a ratio)."""
    steps, a = args.steps, config_values(HyLoRADAConfig, args, ADAPTER_FIELDS)
    if a["target_modules"] == ["all-linear"]:
        a["target_modules"] = "all-linear"
    a.update(lora_plus_enabled=a["lora_plus_ratio"] is not None, lora_plus_ratio=a["lora_plus_ratio"] or 16.0)
    t = config_values(TrainConfig, args, TRAIN_FIELDS)
    t.update(warmup_steps=steps // 20 if t["warmup_steps"] is None else t["warmup_steps"],
             eval_every=max(1, steps // 10) if t["eval_every"] is None else t["eval_every"],
             save_every=max(1, steps // 10) if t["save_every"] is None else t["save_every"],
             max_grad_norm=t["max_grad_norm"] or None, out_dir=str(args.out), resume=args.resume,
             progress=not args.no_progress)
    with as_flags({**config_flags(HyLoRADAConfig, ADAPTER_FIELDS), **config_flags(TrainConfig, TRAIN_FIELDS),
                   "resume": "--resume"}):
        return HyLoRADAConfig(**a), TrainConfig(**t)


def run(args: argparse.Namespace) -> int:
    import torch

    from .. import data
    from ..recipes.finetune import Interrupted, check_run_dir, finetune
    from .checks import check_positions, finetune_interrupted, load_docs
    from .load import load_model_checked

    if args.threads:
        torch.set_num_threads(args.threads)
    adapter_config, train_config = configs(args)
    mode = check_run_dir(args.out, resume=args.resume, overwrite=args.overwrite)  # before any work
    spec = spec_from_args(args, default="shakespeare")
    for split in data.SPLITS:  # bad data stops here, before anything is written or loaded (memoised)
        load_docs(spec, split)
    data.resolve_loss_on(spec.loss_on, any(d.messages is not None for d in data.load_documents(spec, "train")))
    t0 = time.perf_counter()
    model, tokenizer = load_model_checked(args.model, dtype=args.dtype, device="cpu")
    check_positions(model, {"--seq-len": args.seq_len, "--eval-seq-len": args.eval_seq_len})
    settings = FinetuneSettings(**config_values(FinetuneSettings, args, RUN_FIELDS), data=spec, mode=mode,
                                progress=not args.no_progress, record={k: v for k, v in vars(args).items()
                                                                       if k != "func"})
    try:
        return finetune(model, tokenizer, adapter_config, train_config, settings, load_s=time.perf_counter() - t0)
    except Interrupted as e:
        raise finetune_interrupted(args, e.run_dir) from None
