"""Fine-tune an adapter on a corpus: the workflow behind `hylorada finetune`, top to bottom.

    recipe = FinetuneRecipe(adapter_config, train_config, settings)
    recipe.setup(model, tokenizer)    accelerator, the output folder, data blocks and windows
    recipe.perplexity("before")       valid and test perplexity of the base model
    recipe.setup_adapter()            HyLoRADAModel on the base (seeded init of A)
    recipe.train()                    hylorada/train.py: checkpoints, exact resume
    recipe.perplexity("after")
    recipe.save()                     adapter/, merged/ (optional), finetune.json
    recipe.cleanup()

`finetune(...)` runs these in order. Data (hylorada/data/): training blocks are the train
split packed into `seq_len` blocks; in-training validation the valid split packed the same way
(first `max_eval_tokens` tokens); perplexity the valid and test splits, "\\n\\n"-joined,
`eval_seq_len` windows, first `max_eval_tokens` tokens; every block and window starts with BOS
when `window_prefix` resolves to "bos". Under torchrun every process trains, the main one
evaluates and writes. The output folder: `check_run_dir` decides, before any work, whether
--out is new, resumed or replaced; a replaced run is written beside the old one and renamed
over it only when complete (hylorada/utils/io.py).
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import data, evaluate
from ..config import HyLoRADAConfig, option
from ..errors import UsageError
from ..model import HyLoRADAModel
from ..checkpoint import find_checkpoint, read_checkpoint_state
from ..train import NonFiniteLossError, TrainConfig, train
from ..utils import io
from ..utils.env import versions

# The config fields `hylorada finetune` sets by a flag: hylorada/commands/finetune.py generates
# the flags from them, hylorada/recipes/tune.py writes the flags that reproduce a trial.
ADAPTER_FIELDS = ("method", "lora_rank", "lora_alpha", "lora_dropout", "target_modules", "init_lora_weights",
                  "use_rslora", "lora_plus_ratio")
TRAIN_FIELDS = ("steps", "batch_size", "grad_accum", "lr", "weight_decay", "warmup_steps", "schedule",
                "min_lr_ratio", "max_grad_norm", "mixed_precision", "seed", "eval_every", "eval_batches",
                "save_every", "log_every", "compile", "compile_scope")
# what a finetune --out folder may hold (anything else is the user's and blocks --overwrite)
RUN_FILES = ("checkpoint-last", "checkpoint-best", ".old-checkpoint-last", ".old-checkpoint-best",
             ".tmp-checkpoint-last", ".tmp-checkpoint-best", "train_log.jsonl", "adapter", "merged",
             "finetune.json", ".hylorada")


@dataclass
class FinetuneSettings:
    """What a fine-tuning run does besides the adapter (HyLoRADAConfig) and the training
    (TrainConfig). The fields with a help text are `hylorada finetune` flags (RUN_FIELDS)."""

    data: Any  # a hylorada.data.DataSpec, a corpus name or a path
    out: str = field(metadata={"help": "output directory (new, empty, or a previous finetune run with "
                                       "--resume or --overwrite)"})
    mode: str = "new"  # check_run_dir's answer: new | resume | replace
    seq_len: int = option(256, "training block length")
    max_train_tokens: int | None = option(None, "use only the first N training tokens")
    max_eval_tokens: int = option(51200, "tokens of valid/test used for perplexity and valid loss (0: all)")
    eval_seq_len: int = option(512, "perplexity window")
    eval_batch_size: int = option(4, "perplexity windows per forward")
    no_eval_before: bool = option(False, "skip the perplexity before training")
    window_prefix: str = option("auto", "start every block and window with BOS: auto (when the tokenizer adds one), "
                                    "bos, none", choices=data.WINDOW_PREFIXES)
    merge: bool = option(False, "also save the merged model (OUT/merged)")
    progress: bool = True
    record: dict = field(default_factory=dict)  # finetune.json "args": the command's flags


RUN_FIELDS = ("seq_len", "max_train_tokens", "max_eval_tokens", "eval_seq_len", "eval_batch_size",
              "no_eval_before", "window_prefix", "out", "merge")


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during training; `run_dir` is the folder that holds the last checkpoint."""

    def __init__(self, run_dir: Path):
        super().__init__(str(run_dir))
        self.run_dir = run_dir


def check_run_dir(out: str | os.PathLike, *, resume: bool, overwrite: bool) -> str:
    """Before any work: "new" (missing or empty --out), "resume" (a previous run, --resume) or
    "replace" (a previous run, --overwrite); anything else raises UsageError (a file, a folder we
    did not write, another kind of hylorada output, a previous run without --resume/--overwrite)."""
    p = Path(out).expanduser()
    io.clean_stale(p)  # a run killed while replacing --out: its old output is put back first
    if resume and overwrite:
        raise UsageError("--resume and --overwrite exclude each other: --resume continues the run in "
                         "--out, --overwrite starts a new one")
    if p.is_dir() and not any(p.iterdir()):
        return "new"
    if p.is_dir() and io.ours(p) not in (None, "finetune"):
        raise UsageError(f"--out {p}: holds a hylorada {io.ours(p)} output, not a finetune run; choose "
                         "another --out")
    if p.is_dir() and io.ours(p) == "finetune" and not overwrite:
        if resume:
            return "resume"
        ckpt = find_checkpoint(p)
        at = f" (checkpoint-last at step {read_checkpoint_state(ckpt).get('step')})" if ckpt else ""
        raise UsageError(f"--out {p}: holds a previous finetune run{at}; pass --resume to continue it, "
                         "--overwrite to start over (the old run stays until the new one is complete), "
                         "or choose another --out")
    existed = io.check_output_dir(p, overwrite=overwrite, known=RUN_FILES, kind="finetune")  # refuses files, foreign folders
    return "replace" if existed else "new"


class FinetuneRecipe:
    """The steps of one run; state shared between them lives on the instance (see the module doc)."""

    def __init__(self, adapter_config: HyLoRADAConfig, train_config: TrainConfig, settings: FinetuneSettings):
        self.adapter_config, self.train_config, self.s = adapter_config, train_config, settings
        self.timings: dict[str, float] = {}
        self.ppl: dict[str, dict] = {"before": {}, "after": {}}

    def say(self, msg: str) -> None:
        if self.is_main:
            print(msg, flush=True)

    # ------------------------------------------------------------------------- setup
    def setup(self, model, tokenizer) -> None:
        from accelerate import Accelerator
        from accelerate.utils import InitProcessGroupKwargs

        self.model, self.tokenizer = model, tokenizer
        # a long timeout: the other processes wait at a barrier while the main one computes perplexity
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no",
                                       kwargs_handlers=[InitProcessGroupKwargs(timeout=_dt.timedelta(hours=12))])
        self.is_main = self.accelerator.is_main_process
        logging.basicConfig(level=logging.INFO if self.is_main else logging.WARNING,
                            format="%(asctime)s %(name)s: %(message)s")
        self._setup_out_dir()
        t0 = time.perf_counter()
        self._setup_data()
        self.timings["data_s"] = time.perf_counter() - t0

    def _setup_out_dir(self) -> None:
        self.final_out = self.out = Path(self.s.out).expanduser()
        if self.s.mode == "replace":  # the new run goes beside the old one and replaces it at the end
            if self.is_main:
                io.clean_stale(self.final_out)
            self.out = io.new_temp_sibling(self.final_out) if self.is_main else self.final_out
            self.train_config.out_dir = str(self.out)
        elif self.is_main:
            io.claim_work_dir(self.out, "finetune")

    def _setup_data(self) -> None:
        s, tok = self.s, self.tokenizer
        self.window_prefix = data.resolve_window_prefix(tok, s.window_prefix)
        self.bos_id = tok.bos_token_id if self.window_prefix == "bos" else None
        self.train_blocks, self.train_info = data.training_blocks(
            tok, s.data, "train", s.seq_len, bos_id=self.bos_id, max_tokens=s.max_train_tokens)
        self.valid_blocks, _ = data.training_blocks(tok, s.data, "valid", s.seq_len, bos_id=self.bos_id,
                                                    max_tokens=s.max_eval_tokens or None)
        self.eval_sets = {split: data.eval_split(tok, s.data, split)[1] for split in ("valid", "test")}
        if s.max_eval_tokens:
            self.eval_sets = {k: v[:, :s.max_eval_tokens] for k, v in self.eval_sets.items()}
        self.n_blocks = int(self.train_blocks["input_ids"].shape[0])
        self.say(f"data: {s.data}: {self.train_info['tokens']:,} train tokens -> {self.n_blocks} blocks of "
                 f"{s.seq_len}{f' (first {s.max_train_tokens:,} tokens)' if s.max_train_tokens else ''}"
                 f"{'; chat, loss on ' + self.train_info['loss_on'] if self.train_info['chat'] else ''}; "
                 f"{int(self.valid_blocks['input_ids'].shape[0])} valid blocks; ppl on "
                 + ", ".join(f"{k} {v.shape[1]:,}" for k, v in self.eval_sets.items()) + " tokens")
        tc = self.train_config
        epochs = tc.steps * tc.global_batch / max(self.n_blocks, 1)
        self.say(f"global batch {tc.batch_size} x {tc.grad_accum} = {tc.global_batch} blocks "
                 f"({tc.global_batch * s.seq_len:,} tokens) on {self.accelerator.num_processes} process(es); "
                 f"{tc.steps} steps = {epochs:.2f} epochs")

    def setup_adapter(self) -> None:
        torch.manual_seed(self.train_config.seed)  # the adapter init (A) is drawn from torch's RNG
        self.wrapped = HyLoRADAModel(self.model, self.adapter_config)
        n_trainable = sum(p.numel() for p in self.wrapped.trainable_parameters())
        n_total = sum(p.numel() for p in {id(p): p for p in self.wrapped.parameters()}.values())
        self.params = {"trainable": n_trainable, "total": n_total}
        ac = self.adapter_config
        self.say(f"adapter: {ac.method} r={ac.lora_rank} alpha={ac.lora_alpha} on {len(self.wrapped.target_names)} "
                 f"layers; {n_trainable:,} trainable of {n_total:,} parameters ({100 * n_trainable / n_total:.3f}%)"
                 + (f"; LoRA+ ratio {ac.lora_plus_ratio}" if ac.lora_plus_enabled else ""))

    # ------------------------------------------------------------------------- evaluate, train
    def perplexity(self, when: str) -> dict:
        """Perplexity of the valid and test windows (main process; the others wait)."""
        t0 = time.perf_counter()
        model = self.model if when == "before" else self.wrapped.eval()
        device, res = self.accelerator.device, {}
        if self.is_main:
            model.to(device)
            for split, ids in self.eval_sets.items():
                with torch.no_grad():
                    r = evaluate.perplexity(model, ids, self.s.eval_seq_len, batch_size=self.s.eval_batch_size,
                                            device=device, progress=self.s.progress, bos_id=self.bos_id)
                res[split] = {"ppl": r.ppl, "nll": r.nll, "n_tokens": r.n_tokens, "seconds": r.seconds}
                self.say(f"{when}: {split} perplexity {r.ppl:.4f} ({r.n_tokens:,} tokens, {r.seconds:.1f} s)")
        self.accelerator.wait_for_everyone()
        self.ppl[when] = res
        self.timings[f"eval_{when}_s"] = time.perf_counter() - t0
        return res

    def train(self) -> bool:
        """Train the adapter; False when the loss stopped being finite (recorded in finetune.json)."""
        self.log = self._log_start()
        t0 = time.perf_counter()
        try:
            self.result = train(self.wrapped, self.train_blocks, self.valid_blocks, self.train_config,
                                accelerator=self.accelerator)
        except KeyboardInterrupt:
            raise Interrupted(self.out) from None
        except NonFiniteLossError as e:
            self.say(f"error: {e}")
            if self.is_main:
                self.log["error"] = str(e)
                _write_json(self.out / "finetune.json", self.log)
            return False
        self.timings["train_s"] = time.perf_counter() - t0
        r = self.result
        run_steps = r.steps - r.start_step
        self.say(f"trained {run_steps} steps (from step {r.start_step}) in {r.train_time_s:.1f} s "
                 f"({r.train_time_s / max(run_steps, 1):.2f} s/step), {r.mean_tokens_per_s:.0f} tokens/s; "
                 f"final loss {r.losses[-1] if r.losses else float('nan'):.4f}"
                 + (f"; best valid loss {r.best_valid_loss:.4f} at step {r.best_step}"
                    if r.best_valid_loss is not None else ""))
        return True

    def _log_start(self) -> dict:
        s, info = self.s, self.train_info
        return {
            "command": "finetune",
            "args": s.record,
            "adapter_config": self.adapter_config.to_dict(),
            "train_config": self.train_config.to_dict(),
            "data": {"name": str(s.data), "train_tokens": info["tokens"], "train_blocks": self.n_blocks,
                     "chat": info["chat"], "loss_on": info["loss_on"], "train_targets": info["targets"],
                     "seq_len": s.seq_len, "valid_blocks": int(self.valid_blocks["input_ids"].shape[0]),
                     "eval_tokens": {k: int(v.shape[1]) for k, v in self.eval_sets.items()}},
            "params": self.params,
            "world_size": self.accelerator.num_processes,
            "device": str(self.accelerator.device),
            "ppl_before": self.ppl["before"],
            "window_prefix": self.window_prefix,
        }

    # ------------------------------------------------------------------------- save
    def save(self, t_start: float) -> None:
        """adapter/, merged/ (with `merge`), finetune.json; then the replaced run, last (main only)."""
        if not self.is_main:
            return
        self.wrapped.save_adapter(self.out / "adapter", overwrite=True)  # the run folder is ours (check_run_dir)
        self.say(f"adapter saved to {self.final_out / 'adapter'}")
        if self.s.merge:
            self._save_merged()
        self.timings["total_s"] = time.perf_counter() - t_start
        self.log.update({
            "ppl_after": self.ppl["after"],
            "train": self.result.to_dict(),
            "timings": self.timings,
            "versions": versions(),
            "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        })
        _write_json(self.out / "finetune.json", self.log)
        if self.out != self.final_out:
            io.commit_dir(self.out, self.final_out, "finetune", files=RUN_FILES)
        before, after = self.ppl["before"], self.ppl["after"]
        for split in self.eval_sets:
            if split in before and split in after:
                self.say(f"{split} perplexity: {before[split]['ppl']:.4f} -> {after[split]['ppl']:.4f}")
        self.say(f"log: {self.final_out / 'finetune.json'}")

    def _save_merged(self) -> None:
        t0 = time.perf_counter()
        probe = self.eval_sets["test"][:, :64].to(self.accelerator.device)
        with torch.no_grad():
            before_merge = self.wrapped(input_ids=probe).logits.float()
            merged = self.wrapped.merge_and_unload()
            after_merge = merged(input_ids=probe).logits.float()
        merge_err = float((after_merge - before_merge).abs().max())
        save_merged(merged, self.tokenizer, self.out / "merged")
        self.timings["merge_s"] = time.perf_counter() - t0
        self.log["merge_max_abs_logit_diff"] = merge_err
        self.say(f"merged model saved to {self.final_out / 'merged'} (max |logit diff| after merge {merge_err:.2e})")

    def cleanup(self) -> None:
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()


def finetune(model, tokenizer, adapter_config: HyLoRADAConfig, train_config: TrainConfig,
             settings: FinetuneSettings, *, load_s: float = 0.0) -> int:
    """The whole run (see the module doc); 0, or 1 when the loss stopped being finite.
    `load_s`: the seconds the caller spent loading `model`, recorded in finetune.json."""
    t_start = time.perf_counter() - load_s
    recipe = FinetuneRecipe(adapter_config, train_config, settings)
    recipe.timings["load_s"] = load_s
    recipe.setup(model, tokenizer)
    if not settings.no_eval_before:
        recipe.perplexity("before")
    recipe.setup_adapter()
    if not recipe.train():
        return 1
    recipe.perplexity("after")
    recipe.save(t_start)
    recipe.cleanup()
    return 0


def save_merged(merged, tokenizer, folder: Path) -> None:
    """OUT/merged, atomically: a compressed base (FactorizedLinear layers) is saved with
    save_compressed (so hylorada.load_model rebuilds its factors exactly and plain transformers
    refuses it); a dense one as a plain transformers folder."""
    from ..compress.api import factorized_layers, save_compressed

    if factorized_layers(merged):
        save_compressed(merged, folder, tokenizer=tokenizer, overwrite=True)
        return
    with io.atomic_output_dir(folder, kind="merged", overwrite=True, flag="merged folder") as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def _write_json(path: Path, obj) -> None:
    io.atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")
