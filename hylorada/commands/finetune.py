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
(hylorada/data.py, hylorada/evaluate.py); finetune.json records the resolved value. Runs unchanged under `torchrun --nproc_per_node=K` (the
global batch --batch-size x --grad-accum does not depend on K; perplexity on the main process).

Writes into --out: checkpoint-last/, checkpoint-best/ (resumable with --resume),
train_log.jsonl, adapter/ (HyLoRADAModel.save_adapter), merged/ (with --merge) and
finetune.json (config, losses, timing, perplexities).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import time
from pathlib import Path

from ..utils.env import environment
from .data_args import add_data_args, spec_from_args


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("finetune", help="train an adapter (LoRA/DoRA/HyLoRADA/LoRaDA) on a corpus",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="smollm2-135m",
                   help="alias (smollm2-135m), transformers folder, .gguf file or hub id (default: %(default)s)")
    add_data_args(g, default="shakespeare", splits=True, loss_on=True)
    g.add_argument("--seq-len", type=int, default=256, help="training block length (default: %(default)s)")
    g.add_argument("--max-train-tokens", type=int, default=None, help="use only the first N training tokens")
    g.add_argument("--dtype", default="float32", help="base weights dtype (default: %(default)s)")
    g = p.add_argument_group("adapter")
    g.add_argument("--method", default="hylorada", choices=["lora", "dora", "hylorada", "lorada"])
    g.add_argument("--rank", type=int, default=8, help="LoRA rank r (default: %(default)s)")
    g.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha; scale alpha/r (default: %(default)s)")
    g.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout (default: %(default)s)")
    g.add_argument("--target-modules", nargs="+", default=None,
                   help="module names/suffixes, or 'all-linear' (default: the attention projections)")
    g.add_argument("--init", default=None, choices=["kaiming", "orthogonal", "gaussian"],
                   help="init of A (default: orthogonal for hylorada, kaiming otherwise)")
    g.add_argument("--rslora", action="store_true", help="scale alpha/sqrt(r)")
    g.add_argument("--lora-plus-ratio", type=float, default=None,
                   help="enable LoRA+: lr of B = ratio x lr (default: off)")
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=100, help="optimizer steps (default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=8,
                   help="GLOBAL micro-batch in blocks (all processes together) (default: %(default)s)")
    g.add_argument("--grad-accum", type=int, default=1,
                   help="micro-batches per step; global batch = batch-size x grad-accum (default: %(default)s)")
    g.add_argument("--lr", type=float, default=2e-4, help="base learning rate (default: %(default)s)")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--warmup-steps", type=int, default=None, help="default: 5%% of --steps")
    g.add_argument("--schedule", default="cosine", choices=["cosine", "linear", "constant"])
    g.add_argument("--min-lr-ratio", type=float, default=0.0)
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="0 disables clipping")
    g.add_argument("--mixed-precision", default="auto", choices=["auto", "no", "bf16"],
                   help="auto: bf16 autocast on CUDA, fp32 on CPU (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--eval-every", type=int, default=None,
                   help="valid loss every N steps (default: steps/10; 0: never)")
    g.add_argument("--eval-batches", type=int, default=None,
                   help="valid micro-batches per in-training evaluation (default: all valid blocks)")
    g.add_argument("--save-every", type=int, default=None,
                   help="checkpoint every N steps (default: steps/10; 0: only at the end)")
    g.add_argument("--log-every", type=int, default=10)
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g = p.add_argument_group("evaluation and output")
    g.add_argument("--max-eval-tokens", type=int, default=51200,
                   help="tokens of valid/test used for perplexity and valid loss (default: %(default)s; 0: all)")
    g.add_argument("--eval-seq-len", type=int, default=512, help="perplexity window (default: %(default)s)")
    g.add_argument("--eval-batch-size", type=int, default=4, help="perplexity windows per forward")
    g.add_argument("--no-eval-before", action="store_true", help="skip the perplexity before training")
    g.add_argument("--window-prefix", default="auto", choices=["auto", "bos", "none"],
                   help="start every block and window with BOS: auto (when the tokenizer adds one), bos, none")
    g.add_argument("--out", required=True, help="output directory (new, empty, or a previous finetune run "
                   "with --resume or --overwrite)")
    g.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint-last")
    g.add_argument("--overwrite", action="store_true",
                   help="start over in an OUT that holds a previous run; the new run is written beside it "
                        "and replaces it only when complete")
    g.add_argument("--merge", action="store_true", help="also save the merged model (OUT/merged)")
    p.set_defaults(func=run)
    return p


# config field -> the flag that sets it (for the one-line error of a config check)
CONFIG_FLAGS = {
    "lora_rank": "--rank", "lora_alpha": "--alpha", "lora_dropout": "--dropout", "target_modules": "--target-modules",
    "init_lora_weights": "--init", "lora_plus_ratio": "--lora-plus-ratio", "steps": "--steps",
    "batch_size": "--batch-size", "grad_accum": "--grad-accum", "lr": "--lr", "weight_decay": "--weight-decay",
    "warmup_steps": "--warmup-steps", "min_lr_ratio": "--min-lr-ratio", "max_grad_norm": "--max-grad-norm",
    "eval_every": "--eval-every", "eval_batches": "--eval-batches", "save_every": "--save-every",
    "log_every": "--log-every", "seed": "--seed", "resume": "--resume",
}


def _write_json_atomic(path: Path, obj) -> None:
    from ..utils.io import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


# what a finetune --out folder may hold (anything else is the user's and blocks --overwrite)
RUN_FILES = ("checkpoint-last", "checkpoint-best", ".old-checkpoint-last", ".old-checkpoint-best",
             ".tmp-checkpoint-last", ".tmp-checkpoint-best", "train_log.jsonl", "adapter", "merged",
             "finetune.json", ".hylorada")


def check_run_dir(out: str | os.PathLike, *, resume: bool, overwrite: bool) -> str:
    """Before any work: "new" (missing or empty --out), "resume" (a previous run, --resume) or
    "replace" (a previous run, --overwrite); anything else raises UsageError (a file, a folder we
    did not write, another kind of hylorada output, a previous run without --resume/--overwrite)."""
    from ..errors import UsageError
    from ..train import find_checkpoint, read_checkpoint_state
    from ..utils.io import check_output_dir, clean_stale, ours

    p = Path(out).expanduser()
    clean_stale(p)  # a run killed while replacing --out: its old output is put back first
    if resume and overwrite:
        raise UsageError("--resume and --overwrite exclude each other: --resume continues the run in "
                         "--out, --overwrite starts a new one")
    if p.is_dir() and not any(p.iterdir()):
        return "new"
    if p.is_dir() and ours(p) not in (None, "finetune"):
        raise UsageError(f"--out {p}: holds a hylorada {ours(p)} output, not a finetune run; choose "
                         "another --out")
    if p.is_dir() and ours(p) == "finetune" and not overwrite:
        if resume:
            return "resume"
        ckpt = find_checkpoint(p)
        at = f" (checkpoint-last at step {read_checkpoint_state(ckpt).get('step')})" if ckpt else ""
        raise UsageError(f"--out {p}: holds a previous finetune run{at}; pass --resume to continue it, "
                         "--overwrite to start over (the old run stays until the new one is complete), "
                         "or choose another --out")
    existed = check_output_dir(p, overwrite=overwrite, known=RUN_FILES, kind="finetune")  # refuses files, foreign folders
    return "replace" if existed else "new"


def run(args: argparse.Namespace) -> int:
    import logging

    import torch
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    from .. import data, evaluate
    from ..config import HyLoRADAConfig
    from ..model import HyLoRADAModel
    from ..train import NonFiniteLossError, TrainConfig, train
    from ._common import as_flags, check_out_dir, check_positions, check_tokens, finetune_interrupted, load_docs, \
        load_model_checked

    t_total = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = args.steps
    eval_every = args.eval_every if args.eval_every is not None else max(1, steps // 10)
    save_every = args.save_every if args.save_every is not None else max(1, steps // 10)
    warmup = args.warmup_steps if args.warmup_steps is not None else steps // 20
    max_eval = args.max_eval_tokens or None
    target_modules = args.target_modules
    if target_modules is not None and len(target_modules) == 1 and target_modules[0] == "all-linear":
        target_modules = "all-linear"
    with as_flags(CONFIG_FLAGS):
        adapter_config = HyLoRADAConfig(
            method=args.method, lora_rank=args.rank, lora_alpha=args.alpha, lora_dropout=args.dropout,
            target_modules=target_modules, use_rslora=args.rslora, init_lora_weights=args.init,
            lora_plus_enabled=args.lora_plus_ratio is not None,
            lora_plus_ratio=args.lora_plus_ratio if args.lora_plus_ratio is not None else 16.0)
        train_config = TrainConfig(
            steps=steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
            weight_decay=args.weight_decay, warmup_steps=warmup, schedule=args.schedule,
            min_lr_ratio=args.min_lr_ratio, max_grad_norm=args.max_grad_norm or None, seed=args.seed,
            eval_every=eval_every, eval_batches=args.eval_batches, save_every=save_every,
            out_dir=str(args.out), resume=args.resume, mixed_precision=args.mixed_precision,
            log_every=args.log_every, progress=not args.no_progress)
    mode = check_run_dir(args.out, resume=args.resume, overwrite=args.overwrite)  # before any work

    spec = spec_from_args(args, default="shakespeare")
    for split in data.SPLITS:  # bad data stops here, before anything is written or loaded (memoised)
        load_docs(spec, split)
    data.resolve_loss_on(spec.loss_on, any(d.messages is not None for d in data.load_documents(spec, "train")))
    # a long timeout: the other processes wait at a barrier while the main one computes perplexity
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no",
                              kwargs_handlers=[InitProcessGroupKwargs(timeout=_dt.timedelta(hours=12))])
    is_main = accelerator.is_main_process
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    final_out = out = Path(args.out).expanduser()
    if mode == "replace":  # the new run goes beside the old one and replaces it at the end
        from ..utils.io import clean_stale, new_temp_sibling

        if is_main:
            clean_stale(final_out)
        out = new_temp_sibling(final_out) if is_main else final_out
        train_config.out_dir = str(out)
    elif is_main:
        from ..utils.io import claim_work_dir

        claim_work_dir(out, "finetune")

    def say(msg: str) -> None:
        if is_main:
            print(msg, flush=True)

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    model, tokenizer = load_model_checked(args.model, dtype=args.dtype, device="cpu")
    check_positions(model, {"--seq-len": args.seq_len, "--eval-seq-len": args.eval_seq_len})
    timings["load_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    window_prefix = data.resolve_window_prefix(tokenizer, args.window_prefix)
    bos_id = tokenizer.bos_token_id if window_prefix == "bos" else None
    train_blocks, train_info = data.training_blocks(tokenizer, spec, "train", args.seq_len, pad_id, bos_id=bos_id,
                                                    max_tokens=args.max_train_tokens)
    n_train_tokens = train_info["tokens"]
    valid_blocks, _ = data.training_blocks(tokenizer, spec, "valid", args.seq_len, pad_id, bos_id=bos_id,
                                           max_tokens=max_eval)
    eval_sets = {s: data.eval_split(tokenizer, spec, s)[1] for s in ("valid", "test")}
    if max_eval:
        eval_sets = {k: v[:, :max_eval] for k, v in eval_sets.items()}
    for split, ids in eval_sets.items():
        check_tokens(int(ids.numel()), 2, "--data", f"{args.data} ({split} split)")
    timings["data_s"] = time.perf_counter() - t0
    n_blocks = int(train_blocks["input_ids"].shape[0])
    say(f"data: {spec}: {n_train_tokens:,} train tokens -> {n_blocks} blocks of {args.seq_len}"
        f"{f' (first {args.max_train_tokens:,} tokens)' if args.max_train_tokens else ''}"
        f"{'; chat, loss on ' + train_info['loss_on'] if train_info['chat'] else ''}; "
        f"{int(valid_blocks['input_ids'].shape[0])} valid blocks; ppl on "
        + ", ".join(f"{k} {v.shape[1]:,}" for k, v in eval_sets.items()) + " tokens")
    global_batch = args.batch_size * args.grad_accum
    epochs = steps * global_batch / max(n_blocks, 1)
    say(f"global batch {args.batch_size} x {args.grad_accum} = {global_batch} blocks "
        f"({global_batch * args.seq_len:,} tokens) on {accelerator.num_processes} process(es); "
        f"{steps} steps = {epochs:.2f} epochs")

    device = accelerator.device

    def ppl_all(m, when: str) -> dict:
        res = {}
        if is_main:
            m.to(device)
            for split, ids in eval_sets.items():
                r = evaluate.perplexity(m, ids, args.eval_seq_len, batch_size=args.eval_batch_size,
                                        device=device, progress=not args.no_progress, bos_id=bos_id)
                res[split] = {"ppl": r.ppl, "nll": r.nll, "n_tokens": r.n_tokens, "seconds": r.seconds}
                say(f"{when}: {split} perplexity {r.ppl:.4f} ({r.n_tokens:,} tokens, {r.seconds:.1f} s)")
        accelerator.wait_for_everyone()
        return res

    ppl_before = {}
    if not args.no_eval_before:
        t0 = time.perf_counter()
        with torch.no_grad():
            ppl_before = ppl_all(model, "before")
        timings["eval_before_s"] = time.perf_counter() - t0

    torch.manual_seed(args.seed)  # the adapter init (A) is drawn from torch's RNG
    wrapped = HyLoRADAModel(model, adapter_config)
    n_trainable = sum(p.numel() for p in wrapped.trainable_parameters())
    n_total = sum(p.numel() for p in {id(p): p for p in wrapped.parameters()}.values())
    say(f"adapter: {args.method} r={args.rank} alpha={args.alpha} on {len(wrapped.target_names)} layers; "
        f"{n_trainable:,} trainable of {n_total:,} parameters ({100 * n_trainable / n_total:.3f}%)"
        + (f"; LoRA+ ratio {args.lora_plus_ratio}" if args.lora_plus_ratio is not None else ""))

    t0 = time.perf_counter()
    log: dict = {
        "command": "finetune",
        "args": {k: v for k, v in vars(args).items() if k != "func"},
        "adapter_config": adapter_config.to_dict(),
        "train_config": train_config.to_dict(),
        "data": {"name": str(spec), "train_tokens": n_train_tokens, "train_blocks": n_blocks,
                 "chat": train_info["chat"], "loss_on": train_info["loss_on"],
                 "train_targets": train_info["targets"],
                 "seq_len": args.seq_len, "valid_blocks": int(valid_blocks["input_ids"].shape[0]),
                 "eval_tokens": {k: int(v.shape[1]) for k, v in eval_sets.items()}},
        "params": {"trainable": n_trainable, "total": n_total},
        "world_size": accelerator.num_processes,
        "device": str(device),
        "ppl_before": ppl_before,
        "window_prefix": window_prefix,
    }
    try:
        result = train(wrapped, train_blocks, valid_blocks, train_config, accelerator=accelerator)
    except KeyboardInterrupt:
        raise finetune_interrupted(args, out) from None
    except NonFiniteLossError as e:
        say(f"error: {e}")
        if is_main:
            log["error"] = str(e)
            _write_json_atomic(out / "finetune.json", log)
        return 1
    timings["train_s"] = time.perf_counter() - t0
    run_steps = result.steps - result.start_step
    say(f"trained {run_steps} steps (from step {result.start_step}) in {result.train_time_s:.1f} s "
        f"({result.train_time_s / max(run_steps, 1):.2f} s/step), {result.mean_tokens_per_s:.0f} tokens/s; "
        f"final loss {result.losses[-1] if result.losses else float('nan'):.4f}"
        + (f"; best valid loss {result.best_valid_loss:.4f} at step {result.best_step}"
           if result.best_valid_loss is not None else ""))

    t0 = time.perf_counter()
    wrapped.eval()
    with torch.no_grad():
        ppl_after = ppl_all(wrapped, "after")
    timings["eval_after_s"] = time.perf_counter() - t0

    if is_main:
        wrapped.save_adapter(out / "adapter", overwrite=True)  # the run folder is ours (check_run_dir)
        say(f"adapter saved to {final_out / 'adapter'}")
        if args.merge:
            t0 = time.perf_counter()
            probe = eval_sets["test"][:, :64].to(device)
            with torch.no_grad():
                before_merge = wrapped(input_ids=probe).logits.float()
                merged = wrapped.merge_and_unload()
                after_merge = merged(input_ids=probe).logits.float()
            merge_err = float((after_merge - before_merge).abs().max())
            _save_merged(merged, tokenizer, out / "merged")
            timings["merge_s"] = time.perf_counter() - t0
            log["merge_max_abs_logit_diff"] = merge_err
            say(f"merged model saved to {final_out / 'merged'} (max |logit diff| after merge {merge_err:.2e})")
        timings["total_s"] = time.perf_counter() - t_total
        log.update({
            "ppl_after": ppl_after,
            "train": result.to_dict(),
            "timings": timings,
            "versions": environment(str(device))["versions"],
            "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        })
        _write_json_atomic(out / "finetune.json", log)
        if out != final_out:
            from ..utils.io import commit_dir

            commit_dir(out, final_out, "finetune", files=RUN_FILES)
        for split in eval_sets:
            if split in ppl_before and split in ppl_after:
                say(f"{split} perplexity: {ppl_before[split]['ppl']:.4f} -> {ppl_after[split]['ppl']:.4f}")
        say(f"log: {final_out / 'finetune.json'}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


def _save_merged(merged, tokenizer, folder: Path) -> None:
    """OUT/merged, atomically: a compressed base (FactorizedLinear layers) is saved with
    save_compressed (so hylorada.load_model rebuilds its factors exactly and plain transformers
    refuses it); a dense one as a plain transformers folder."""
    from ..compress.api import factorized_layers, save_compressed
    from ..utils.io import atomic_output_dir

    if factorized_layers(merged):
        save_compressed(merged, folder, tokenizer=tokenizer, overwrite=True)
        return
    with atomic_output_dir(folder, kind="merged", overwrite=True, flag="merged folder") as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
