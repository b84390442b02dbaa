"""What a benchmark run depends on: BenchConfig, the rows it compares, the presets, the checks.

The fine-tuning hyper-parameters of every adaptation row and of the recovery are a
`hylorada.train.TrainConfig` (`BenchConfig.train`), so each exists once. On disk (results.json's
`config`, and the `make_config` / preset keys) the configuration stays flat, as before:
`to_dict` writes the TRAIN_FIELDS next to the other fields and `from_flat` reads them back.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from ...errors import UsageError
from ...train import TrainConfig

METHODS = ("lora", "dora", "lorada", "hylorada")
PEFT_ROWS = ("peft-lora", "peft-dora")
BUDGET_TOLERANCE = 0.10
# Kaiming-uniform(a=sqrt 5) draws A_ij from U(-1/sqrt(d_in), 1/sqrt(d_in)): E||row||² = 1/3 for
# every d_in, so its rows have norm ~0.577; orthogonal rows have norm 1 (docs/METHODS.md).
KAIMING_ROW_NORM = 1.0 / math.sqrt(3.0)

# ablation row -> how it differs from its base method (documented in results.md)
ABLATIONS: dict[str, dict[str, Any]] = {
    "hylorada-kaiming": dict(
        base="hylorada", init="kaiming",
        desc="HyLoRADA with kaiming-uniform A instead of orthogonal (init direction and scale)"),
    "hylorada-orth-scaled": dict(
        base="hylorada", scale_A=KAIMING_ROW_NORM,
        desc="HyLoRADA with orthogonal A rescaled to kaiming's row norm 1/sqrt(3) "
             "(orthogonal direction, kaiming scale)"),
    "hylorada-gate-frozen": dict(
        base="hylorada", freeze=("gate",),
        desc="HyLoRADA with the gate fixed at its init (g = sigmoid(gate_init) = 0.5): "
             "m_eff = g·m + (1-g)·m0 with a constant g, no learned gating"),
    "hylorada-blend-frozen": dict(
        base="hylorada", freeze=("residual",),
        desc="HyLoRADA with the DoRA/LoRA blend fixed at its init (beta = sigmoid(residual_init))"),
    "dora-orthogonal": dict(
        base="dora", init="orthogonal",
        desc="plain DoRA with orthogonal A: HyLoRADA without gate and blend (g = 1, beta = 0)"),
}

# the TrainConfig fields a benchmark sets (the rest keep TrainConfig's defaults), in results.json order
TRAIN_FIELDS = ("steps", "batch_size", "lr", "warmup_steps", "schedule", "min_lr_ratio", "weight_decay",
                "max_grad_norm", "mixed_precision", "compile")


def base_method(row: str) -> str:
    """The adapter method of a row: an ablation's base, peft-<m> -> m, else the row itself."""
    if row in ABLATIONS:
        return ABLATIONS[row]["base"]
    if row in PEFT_ROWS:
        return row.removeprefix("peft-")
    return row


def default_train() -> TrainConfig:
    return TrainConfig(steps=12, batch_size=4, lr=1e-3, warmup_steps=2, log_every=0)


@dataclass
class BenchConfig:
    """Everything a benchmark run depends on. See PRESETS for the sized configurations."""

    preset: str = "cpu-quick"
    model: str = "smollm2-135m"
    data: str = "shakespeare"
    dtype: str = "float32"
    device: str = "cpu"
    seeds: int = 1
    # fine-tuning of the adaptation rows and of the recovery (TRAIN_FIELDS are used)
    train: TrainConfig = field(default_factory=default_train)
    seq_len: int = 128
    # adapters
    target_rank: int = 8
    alpha_ratio: float = 2.0
    dropout: float = 0.05
    targets: str | list[str] = "all-linear"
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    peft: bool = True
    ablations: list[str] = field(default_factory=lambda: list(ABLATIONS))
    # evaluation
    eval_seq_len: int = 512
    eval_max_tokens: int | None = 4096
    eval_batch_size: int = 2
    lim_buckets: int = 10
    # "auto" | "bos" | "none": BOS at the start of every window/block (hylorada/data/blocks.py); cells
    # record the resolved value; the cell key holds it only when it is not "auto"
    window_prefix: str = "auto"
    # frontier
    ratios: list[float] = field(default_factory=lambda: [0.2])
    compress_methods: list[str] = field(default_factory=lambda: ["svd", "whiten"])
    recovery: list[bool] = field(default_factory=lambda: [False, True])
    recovery_method: str = "lora"
    recovery_rank: int = 8
    calib_blocks: int = 16
    calib_seq_len: int = 256
    svd_solver: str = "full"
    # a sample generation from every cell's model (greedy; "" = none): recorded in the cells,
    # shown side by side in results.md
    sample_prompt: str = ""
    sample_tokens: int = 32
    sample_chat: bool = False
    # what results.md says about the size of the run
    caveat: str = ""

    def __post_init__(self) -> None:
        validate_config(self)

    @classmethod
    def from_flat(cls, **values: Any) -> "BenchConfig":
        """A BenchConfig from flat keys (the TRAIN_FIELDS among them go into `train`)."""
        train = {k: values.pop(k) for k in TRAIN_FIELDS if k in values}
        return cls(train=dataclasses.replace(default_train(), **train), **values)

    def to_dict(self) -> dict[str, Any]:
        """The flat dict results.json stores: the TRAIN_FIELDS in place of `train`, after `seeds`."""
        d = dataclasses.asdict(self)
        train = d.pop("train")
        out: dict[str, Any] = {}
        for k, v in d.items():
            out[k] = v
            if k == "seeds":
                out.update((f, train[f]) for f in TRAIN_FIELDS)
        return out

    @property
    def seed_list(self) -> list[int]:
        return list(range(self.seeds))


CPU_QUICK_CAVEAT = (
    "This is the `cpu-quick` preset: one seed, {steps} steps of {batch_size} x {seq_len} tokens "
    "({tokens:,} training tokens per row), test perplexity on the first {eval_tokens} test tokens, "
    "compression at ratio(s) {ratios}. It shows that every cell runs end to end on this machine, "
    "the matched trainable-parameter budgets, the relative cost (time, tokens/s, memory) of each "
    "method, and the gross effects of compression (plain SVD collapsing, whitening holding up, "
    "recovery helping). It CANNOT rank the adaptation methods: with one seed there is no seed "
    "spread, a few thousand training tokens move the model very little, and differences of a "
    "few percent in perplexity on a few thousand test tokens are noise. Use the `full` preset "
    "(>= 3 seeds, hundreds of steps, the full test split) on a GPU for that.")

FULL_CAVEAT = (
    "This is the `full` preset: {seeds} seeds, {steps} steps of {batch_size} x {seq_len} tokens "
    "({tokens:,} training tokens per row and seed), the test split evaluated in windows of "
    "{eval_seq_len} tokens. A difference between two rows means something only where it is "
    "larger than the spread over seeds shown next to it.")

QUICK_CAVEAT = (
    "This is the `quick` preset, the first command's demonstration: one seed, {steps} steps of "
    "{batch_size} x {seq_len} tokens ({tokens:,} training tokens) for each of LoRA, HyLoRADA and the "
    "recovery, test perplexity on the first {eval_tokens} test tokens, whitened compression at "
    "ratio(s) {ratios}. It shows the whole pipeline and the direction of each effect (adaptation "
    "lowers perplexity, compression raises it, recovery takes part of that back); it does not rank "
    "LoRA against HyLoRADA (one seed, a few thousand tokens). `--preset cpu-quick` (~15 min, every "
    "method, plain SVD too) and `--preset full` (a GPU) are the longer runs.")

SAMPLE_PROMPT = "ROMEO:\nWhat light through yonder window breaks?"

PRESETS: dict[str, dict[str, Any]] = {
    # the README's first command: ~4 min on a 2-core CPU with SmolLM2-135M (docs/BENCHMARK.md)
    "quick": dict(
        seeds=1, steps=8, batch_size=4, seq_len=128, lr=1e-3, warmup_steps=1,
        eval_max_tokens=2048, eval_batch_size=2, mixed_precision="no",
        methods=["lora", "hylorada"], peft=False, ablations=[],
        ratios=[0.2], compress_methods=["whiten"], calib_blocks=8, calib_seq_len=256,
        sample_prompt=SAMPLE_PROMPT, sample_tokens=24, caveat=QUICK_CAVEAT),
    # ~15 minutes on a 2-core CPU with SmolLM2-135M (see docs/BENCHMARK.md for the arithmetic)
    "cpu-quick": dict(
        seeds=1, steps=12, batch_size=4, seq_len=128, lr=1e-3, warmup_steps=2,
        eval_max_tokens=3072, eval_batch_size=2, mixed_precision="no",
        ablations=["hylorada-kaiming", "dora-orthogonal"],
        ratios=[0.2], calib_blocks=16, calib_seq_len=256, caveat=CPU_QUICK_CAVEAT),
    # one H100 (measured there at 150 steps: LoRA ~18k, HyLoRADA ~9k training tokens/s, ~40 min for
    # the 46 cells): ~55 min at 200 steps, so it runs as --only pieces of <= 10 min (docs/BENCHMARK.md)
    "full": dict(
        device="cuda", seeds=3, steps=200, batch_size=16, seq_len=256, lr=2e-4, warmup_steps=20,
        eval_max_tokens=None, eval_batch_size=8, mixed_precision="auto",
        ablations=list(ABLATIONS), ratios=[0.2, 0.4, 0.6], calib_blocks=64, calib_seq_len=512,
        caveat=FULL_CAVEAT),
}


DEFAULT_PRESET = "quick"


def make_config(preset: str = DEFAULT_PRESET, **overrides: Any) -> BenchConfig:
    """The preset's BenchConfig with `overrides` (flat keys, as in PRESETS; None values are ignored)."""
    if preset not in PRESETS:
        raise UsageError(f"unknown preset {preset!r}; allowed: {sorted(PRESETS)}")
    known = ({f.name for f in dataclasses.fields(BenchConfig)} - {"train"}) | set(TRAIN_FIELDS)
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise UsageError(f"unknown benchmark settings {unknown}; allowed: {sorted(known)}")
    values = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
    return BenchConfig.from_flat(preset=preset, **values)


def _bad(cfg: BenchConfig, name: str, allowed: str) -> None:
    raise UsageError(f"benchmark {name}={getattr(cfg, name)!r} is invalid: allowed {allowed}")


def validate_config(cfg: BenchConfig) -> None:
    """One line naming the field, its value and what is allowed (UsageError); the training
    fields are checked by TrainConfig (rebuilt here, so that a changed field is checked too)."""
    dataclasses.replace(cfg.train)
    for name in ("seeds", "seq_len", "target_rank", "eval_seq_len", "eval_batch_size", "lim_buckets",
                 "recovery_rank", "calib_blocks", "calib_seq_len", "sample_tokens"):
        v = getattr(cfg, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            _bad(cfg, name, "an integer >= 1")
    for name in ("seq_len", "eval_seq_len", "calib_seq_len"):  # one token predicts nothing
        if getattr(cfg, name) < 2:
            _bad(cfg, name, "an integer >= 2")
    if cfg.eval_max_tokens is not None and (not isinstance(cfg.eval_max_tokens, int) or cfg.eval_max_tokens < 2):
        _bad(cfg, "eval_max_tokens", "None or an integer >= 2")
    _check_choices(cfg)


def _check_choices(cfg: BenchConfig) -> None:
    for m in cfg.methods:
        if m not in METHODS:
            _bad(cfg, "methods", f"a list from {list(METHODS)}")
    for a in cfg.ablations:
        if a not in ABLATIONS:
            _bad(cfg, "ablations", f"a list from {list(ABLATIONS)}")
    if cfg.recovery_method not in METHODS:
        _bad(cfg, "recovery_method", f"one of {list(METHODS)}")
    for r in cfg.ratios:
        if not isinstance(r, (int, float)) or not 0 < r < 1:
            _bad(cfg, "ratios", "fractions in (0, 1) (of each target matrix's parameters removed)")
    for m in cfg.compress_methods:
        if m not in ("svd", "whiten"):
            _bad(cfg, "compress_methods", "a list from ['svd', 'whiten']")
    if cfg.window_prefix not in ("auto", "bos", "none"):
        _bad(cfg, "window_prefix", "'auto', 'bos' or 'none'")
    if cfg.device not in ("cpu", "cuda") and not str(cfg.device).startswith("cuda:"):
        _bad(cfg, "device", "'cpu', 'cuda' or 'cuda:N'")
