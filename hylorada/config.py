"""The validated configs: HyLoRADAConfig (which adapter goes where) and TrainConfig (how the
trainer of hylorada/train.py runs). Every field carries its help text (`option`), from which
the commands generate their flags (hylorada/commands/flags.py).

Field names of the original project are kept (`lora_rank`, `lora_alpha`, `lora_dropout`,
`lora_plus_enabled`, `lora_plus_ratio`, `gate_init`, `residual_init`); its `use_hylorada` switch
is still accepted as an argument and read as a property of `method`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import InitVar, dataclass, field
from pathlib import Path
from typing import Any

from .errors import UsageError
from .losses import LOSSES, check_loss
from .nn.compile import SCOPES

METHODS = ("lora", "dora", "hylorada", "lorada")
INITS = ("kaiming", "orthogonal", "gaussian")
ALL_LINEAR = "all-linear"

# The attention projections of common architectures (the default targets).
ATTENTION_TARGETS: dict[str, list[str]] = {
    "gpt2": ["attn.c_attn", "attn.c_proj"],
    "default": ["q_proj", "k_proj", "v_proj", "o_proj"],
}


def field_flag(f: dataclasses.Field) -> str:
    """The command-line flag of a config field: `metadata["flag"]`, else `--name-with-dashes`.
    hylorada/commands/flags.py generates flags from config fields with it, and
    hylorada/recipes/tune.py writes `hylorada finetune` flags with it."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def option(default, help: str, **more) -> Any:
    """A dataclass field whose metadata holds its help text (and "choices", "flag"): a field that
    hylorada/commands/flags.py turns into a command-line flag."""
    return field(default=default, metadata={"help": help, **more})


def _fail(field_name: str, value: Any, allowed: str) -> None:
    raise UsageError(f"HyLoRADAConfig.{field_name}={value!r} is invalid: allowed {allowed}")


@dataclass
class HyLoRADAConfig:
    """Adapter configuration.

    scale s = lora_alpha / lora_rank, or lora_alpha / sqrt(lora_rank) with `use_rslora`.
    `fused` runs the fused autograd Function (adapters/fused.py) on dense bases; `fused=False`
    runs the plain autograd reference.
    `method` is the one source of the method. `use_hylorada` (the original project's switch) is
    a read-only property, `method == "hylorada"`; it is still accepted as an argument (saved
    adapter configs and older code pass it): with `method=None`, False means "lora" and True or
    None "hylorada"; an explicit `method` wins.
    """

    lora_rank: int = field(default=8, metadata={"help": "LoRA rank r", "flag": "--rank"})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha; scale alpha/r", "flag": "--alpha"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout", "flag": "--dropout"})
    use_hylorada: InitVar[bool | None] = None  # legacy switch; see the docstring
    method: str | None = field(default=None, metadata={"help": "the adapter", "choices": METHODS})
    target_modules: list[str] | str | None = field(default=None, metadata={
        "help": "module names/suffixes, or 'all-linear' (default: the attention projections)"})
    use_rslora: bool = field(default=False, metadata={"help": "scale alpha/sqrt(r)", "flag": "--rslora"})
    init_lora_weights: str | None = field(default=None, metadata={
        "help": "init of A (default: orthogonal for hylorada, kaiming otherwise)", "flag": "--init",
        "choices": INITS})
    lora_plus_enabled: bool = field(default=False, metadata={"help": "LoRA+: lr of B = lora_plus_ratio x lr"})
    lora_plus_ratio: float = field(default=16.0, metadata={"help": "LoRA+: lr of B = ratio x lr"})
    gate_init: float = field(default=0.0, metadata={"help": "hylorada: the gate's sigmoid input at init"})
    residual_init: float = field(default=0.1, metadata={
        "help": "hylorada: the residual weight's sigmoid input at init"})
    temperature_init: float = field(default=1.0, metadata={"help": "lorada: the attention temperature at init"})
    norm_eps: float = field(default=1e-6, metadata={"help": "epsilon of the weight norms (DoRA, HyLoRADA)"})
    fused: bool = field(default=True, metadata={
        "help": "the fused autograd Function on dense bases (False: the plain autograd reference)"})
    extra: dict[str, Any] = field(default_factory=dict, metadata={"help": "free-form entries kept with the config (saved, not read)"})

    def __post_init__(self, use_hylorada: bool | None) -> None:
        if use_hylorada is not None and not isinstance(use_hylorada, bool):
            _fail("use_hylorada", use_hylorada, "True or False")
        for name in ("use_rslora", "lora_plus_enabled", "fused"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "True or False")
        if not isinstance(self.extra, dict):
            _fail("extra", self.extra, "a dict")
        if self.method is None:
            self.method = "lora" if use_hylorada is False else "hylorada"
        if self.method not in METHODS:
            _fail("method", self.method, f"one of {list(METHODS)}")
        if self.init_lora_weights is None:
            self.init_lora_weights = "orthogonal" if self.method == "hylorada" else "kaiming"
        if self.init_lora_weights not in INITS:
            _fail("init_lora_weights", self.init_lora_weights, f"one of {list(INITS)}")
        if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int) or self.lora_rank <= 0:
            _fail("lora_rank", self.lora_rank, "a positive integer (<= min(d_in, d_out) of every target)")
        if not _finite(self.lora_alpha) or self.lora_alpha <= 0:
            _fail("lora_alpha", self.lora_alpha, "a finite number > 0")
        if self.scaling <= 0:  # a subnormal alpha: alpha / r underflows and the adapter would do nothing
            _fail("lora_alpha", self.lora_alpha, f"a number > 0 whose scale alpha/r (r={self.lora_rank}) is > 0")
        if not _finite(self.lora_dropout) or not 0.0 <= self.lora_dropout < 1.0:
            _fail("lora_dropout", self.lora_dropout, "a number in [0, 1)")
        if not _finite(self.lora_plus_ratio) or self.lora_plus_ratio <= 0:
            _fail("lora_plus_ratio", self.lora_plus_ratio, "a finite number > 0")
        for name in ("gate_init", "residual_init"):
            if not _finite(getattr(self, name)):
                _fail(name, getattr(self, name), "a finite number (a sigmoid input)")
        if not _finite(self.temperature_init) or self.temperature_init <= 0:
            _fail("temperature_init", self.temperature_init, "a finite number > 0")
        if not _finite(self.norm_eps) or self.norm_eps <= 0:
            _fail("norm_eps", self.norm_eps, "a small number > 0")
        tm = self.target_modules
        if isinstance(tm, (list, tuple)):
            if not tm or not all(isinstance(t, str) and t for t in tm):
                _fail("target_modules", tm, f"a non-empty list of module names/suffixes, a regex string, '{ALL_LINEAR}' or None")
            self.target_modules = list(tm)
        elif tm is not None and not (isinstance(tm, str) and tm):
            _fail("target_modules", tm, f"a non-empty list of module names/suffixes, a regex string, '{ALL_LINEAR}' or None")

    @property
    def scaling(self) -> float:
        """s = alpha / r (alpha / sqrt(r) with rsLoRA)."""
        r = self.lora_rank
        return self.lora_alpha / (math.sqrt(r) if self.use_rslora else r)

    def to_dict(self) -> dict[str, Any]:
        """The fields, with the derived `use_hylorada` in its old place before `method` (so saved
        configs keep their keys and older versions read them)."""
        d = dataclasses.asdict(self)
        keys = list(d)
        at = keys.index("method")
        return {**{k: d[k] for k in keys[:at]}, "use_hylorada": self.use_hylorada, **{k: d[k] for k in keys[at:]}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "HyLoRADAConfig":
        known = {f.name for f in dataclasses.fields(cls)} | {"use_hylorada"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UsageError(f"HyLoRADAConfig got unknown fields {unknown}; allowed fields: {sorted(known)}")
        return cls(**data)

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> "HyLoRADAConfig":
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            text = Path(text).read_text()
        return cls.from_dict(json.loads(text))


# `use_hylorada` is an init-only argument above (InitVar); its read-only property is attached
# after the class is built, because a property of that name in the class body would become the
# argument's default value.
HyLoRADAConfig.use_hylorada = property(lambda self: self.method == "hylorada",
                                       doc='method == "hylorada" (read-only; set `method`)')


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# ----------------------------------------------------------------------------------------------
# the trainer (hylorada/train.py)
# ----------------------------------------------------------------------------------------------
SCHEDULES = ("cosine", "linear", "constant")
MIXED_PRECISION = ("auto", "no", "bf16")
COMPILE = ("auto", "yes", "no")


@dataclass
class TrainConfig:
    """Training hyper-parameters; each field's metadata["help"] says what it does and allows."""

    steps: int = option(100, "Optimizer steps in total, an integer >= 1 (a resumed run continues "
                             "up to this number).")
    batch_size: int = option(8, "GLOBAL micro-batch in blocks, summed over the processes: an "
                                "integer >= 1 and >= the number of processes.")
    grad_accum: int = option(1, "Micro-batches per optimizer step, an integer >= 1 (the global "
                                "batch is batch_size * grad_accum blocks).")
    lr: float = option(2e-4, "Base learning rate, a finite number > 0 (lora_A and scalars; lora_B "
                             "gets lr * lora_plus_ratio when the model's LoRA+ is on).")
    weight_decay: float = option(0.0, "AdamW weight decay of the low-rank factors (the scalars "
                                      "group gets 0), a finite number >= 0.")
    warmup_steps: int = option(0, "Linear warm-up steps, an integer >= 0: the lr factor is "
                                  "(s+1)/(warmup_steps+1) for step index s < warmup_steps.")
    schedule: str = option("cosine", "Decay after warm-up down to min_lr_ratio: 'cosine', "
                                     "'linear' or 'constant'.", choices=SCHEDULES)

    min_lr_ratio: float = option(0.0, "Final lr factor of the cosine and linear schedules, a "
                                      "number in [0, 1].")
    max_grad_norm: float | None = option(1.0, "Clip the global gradient norm to this finite "
                                              "number >= 0; None or 0: no clipping (the norm is "
                                              "still logged).")
    seed: int = option(0, "Seed of python/numpy/torch (plus the process index) and of the data "
                          "order, an integer >= 0.")
    eval_every: int = option(0, "Evaluate on the valid blocks every N steps and at the end, an "
                                "integer >= 0 (0: never).")
    eval_batches: int | None = option(None, "Valid micro-batches of batch_size blocks per "
                                            "evaluation, an integer >= 1, or None for all.")
    save_every: int = option(0, "Write checkpoint-last every N steps, an integer >= 0 (0: only at "
                                "the end); needs out_dir.")
    out_dir: str | None = option(None, "Folder of the checkpoints and train_log.jsonl, or None to "
                                       "write nothing.")
    resume: bool = option(False, "True: continue from out_dir/checkpoint-last when it exists (a "
                                 "fresh start otherwise); needs out_dir.")
    mixed_precision: str = option("auto", "'auto' (bf16 autocast on CUDA with bf16 support, fp32 "
                                          "otherwise), 'no' or 'bf16'.", choices=MIXED_PRECISION)

    log_every: int = option(10, "Write a train_log.jsonl line and a log message every N steps, an "
                                "integer >= 0 (0: never).")
    progress: bool = option(True, "True or False: show a tqdm progress bar (main process only).")
    shuffle: bool = option(True, "True or False: shuffle the blocks with a seeded permutation per "
                                 "epoch.")
    find_unused_parameters: bool | None = option(None, "DDP's find_unused_parameters: True, False, "
                                                       "or None to probe it once with a "
                                                       "forward/backward (distributed runs only).")
    loss: str = option("lm", "Objective: 'lm' (next-token cross-entropy), 'kd' or 'kd+lm' "
                             "(distillation from the teacher given to train(), hylorada/losses.py); "
                             "validation stays the LM loss.", choices=LOSSES)

    kd_temperature: float = option(1.0, "Temperature T of the distillation softmax (the KL is "
                                        "scaled by T²), a finite number > 0.")
    compile: str = option("auto", "torch.compile the training forward: 'auto' (on when the device "
                                  "is CUDA), 'yes' or 'no'; results agree with eager up to float "
                                  "rounding.", choices=COMPILE)

    compile_scope: str = option("model", "What compile covers: 'model' (one graph for the whole "
                                         "forward: the fastest steps) or 'blocks' (each repeated "
                                         "decoder block compiled once and reused: a fraction of the "
                                         "compile time, slower steps); docs/PERFORMANCE.md, "
                                         "hylorada/nn/compile.py.", choices=SCOPES)

    compile_backend: str = option("inductor", "The torch.compile backend when compile is on, e.g. "
                                              "'inductor' or 'aot_eager' (the CPU tests).")

    def __post_init__(self) -> None:
        def bad(name: str, allowed: str) -> None:
            raise UsageError(f"TrainConfig.{name}={getattr(self, name)!r} is invalid: allowed {allowed}")

        def is_int(x: Any) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        def is_num(x: Any) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

        for name in ("steps", "batch_size", "grad_accum"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 1:
                bad(name, "an integer >= 1")
        for name in ("warmup_steps", "eval_every", "save_every", "log_every", "seed"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 0:
                bad(name, "an integer >= 0")
        if not is_num(self.lr) or self.lr <= 0:
            bad("lr", "a finite number > 0")
        if not is_num(self.weight_decay) or self.weight_decay < 0:
            bad("weight_decay", "a finite number >= 0")
        if self.schedule not in SCHEDULES:
            bad("schedule", f"one of {list(SCHEDULES)}")
        if not is_num(self.min_lr_ratio) or not 0.0 <= self.min_lr_ratio <= 1.0:
            bad("min_lr_ratio", "a number in [0, 1]")
        if self.max_grad_norm is not None and (not is_num(self.max_grad_norm) or self.max_grad_norm < 0):
            bad("max_grad_norm", "None or a finite number >= 0 (0 or None: no clipping)")
        if self.eval_batches is not None and (not is_int(self.eval_batches) or self.eval_batches < 1):
            bad("eval_batches", "None (all valid blocks) or an integer >= 1")
        if self.mixed_precision not in MIXED_PRECISION:
            bad("mixed_precision", f"one of {list(MIXED_PRECISION)}")
        if self.resume and not self.out_dir:
            bad("resume", "False unless out_dir is set (checkpoints live in out_dir)")
        for name in ("resume", "progress", "shuffle"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "True or False")
        if self.out_dir is not None:
            if not isinstance(self.out_dir, (str, os.PathLike)) or str(self.out_dir) == "":
                bad("out_dir", "None or a folder path")
            self.out_dir = str(self.out_dir)
        if self.find_unused_parameters not in (None, True, False):
            bad("find_unused_parameters", "None (auto), True or False")
        check_loss(self.loss, self.kd_temperature, "TrainConfig.loss", "TrainConfig.kd_temperature")
        if self.compile not in COMPILE:
            bad("compile", f"one of {list(COMPILE)}")
        if self.compile_scope not in SCOPES:
            bad("compile_scope", f"one of {list(SCOPES)}")
        if not isinstance(self.compile_backend, str) or not self.compile_backend:
            bad("compile_backend", "the name of a torch.compile backend, e.g. 'inductor'")

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
