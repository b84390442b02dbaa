"""CompressConfig: what `compress_model` does, validated when it is built."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from ..errors import UsageError
from ..losses import check_loss
from .allocate import ALLOCATE_CHOICES
from .ranks import POLICIES
from .svd import SOLVERS
from .whiten import CALIB_PRECISIONS, WHITEN_METHODS

METHODS = ("svd", "whiten", "fisher")
CALIBRATIONS = ("dense", "sequential")
UPDATES = ("none", "lstsq")
BUDGET_ENERGY = ("relative", "absolute")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}


def _dtype_name(value, field_name: str, allow_none: bool = True) -> str | None:
    if value is None and allow_none:
        return None
    if isinstance(value, torch.dtype):
        for name, dt in DTYPES.items():
            if dt == value:
                return name
    if isinstance(value, str):
        name = value.removeprefix("torch.")
        name = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16",
                "fp64": "float64", "double": "float64", "float": "float32"}.get(name, name)
        if name in DTYPES:
            return name
    raise UsageError(f"CompressConfig.{field_name} must be one of {sorted(DTYPES)}"
                     f"{' or None' if allow_none else ''}, got {value!r}")


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _one_of(cfg, name: str, allowed: tuple) -> None:
    """UsageError unless field `name` of `cfg` is one of `allowed`."""
    value = getattr(cfg, name)
    if value not in allowed:
        raise UsageError(f"CompressConfig.{name} must be one of {allowed}, got {value!r}")


def _int_at_least(cfg, name: str, minimum: int, allow_none: bool = False) -> None:
    """UsageError unless field `name` of `cfg` is an int >= minimum (or None when allowed)."""
    value = getattr(cfg, name)
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise UsageError(f"CompressConfig.{name} must be {'None or ' if allow_none else ''}an int >= {minimum}, "
                         f"got {value!r}")


@dataclass
class CompressConfig:
    """How to compress the target linear layers of a model.

    method: "svd" (plain truncated SVD of W), "whiten" (SVD-LLM: SVD of W·L with L Lᵀ the
        calibration inputs' Gram matrix; needs calibration) or "fisher" (SVD of Rᵀ·W·L, R Rᵀ
        the Gram of the loss gradients at the layer's output: the K-FAC second-order loss
        model, hylorada/compress/curvature.py; one extra backward per calibration batch;
        calibrate="dense", allocate uniform/loss/auto, update="none").
    Exactly one rank policy (see hylorada.compress.ranks):
        ratio: fraction of each target matrix's parameters REMOVED, in (0, 1); 0.2 keeps 80%,
            k = floor(0.8·m·n/(m+n)) (SVD-LLM's "compression ratio 20%").
        energy: share of Σσ² kept, in (0, 1] (whitened σ for method="whiten").
        alpha: k = floor(alpha·min(m, n)), in (0, 1] (the original HyLoRA knob).
        budget: parameters the target layers keep in total (biases included): an int ≥ 1, or a
            float in (0, 1) read as that fraction of their current parameters (0.8 is the size
            of ratio=0.2, with ranks shared by greedy σ² per parameter instead of per matrix).
    budget_energy: "relative" (σ² as a share of each layer's Σσ²) or "absolute" scores.
    target_modules: names pieces to compress (e.g. ["q_proj", "mlp"]); None = every Linear /
        Conv1D inside the decoder layers. lm_head and embeddings are never targets.
    overrides: name piece -> value for matching layers (longest matching key wins): a float in
        the policy's unit (a ratio under "budget"), an int rank, or "dense".
    svd_solver: "full", "randomized" (oversample, n_iter power iterations, seed) or "gram"
        (eigen-decomposition of the smaller Gram matrix; fastest on a GPU).
    whiten_method: "cholesky" (jitter·tr(G)/n on failure, x10 per retry) or "eigh".
    calib_blocks / calib_seq_len: use at most this many calibration blocks / tokens per block.
    calib_batch_size: blocks per calibration forward pass.
    calib_precision: "exact" (float64 products) or "mixed" (per-batch products in the activation
        dtype with float32 accumulation, summed in float64; the fast GPU setting).
    force: factorise layers even when the rank saves nothing (break-even guard off).
    rank_multiple: round every chosen rank down to a multiple of this, or up to the multiple
        itself when the rank is smaller; 8 keeps bf16/fp16 GEMMs aligned for tensor cores (odd
        ranks run several times slower on a GPU). The break-even guard applies after rounding
        (ranks.round_to_multiple): a rounded-up rank that saves nothing leaves the layer dense.
    dtype: storage dtype of the factors (None: each layer's own); compute_dtype: of the SVD and
        whitening (float64 by default).
    allocate: "uniform" (every matrix at the ratio's rank), "loss" (relative whitened truncation
        loss per parameter; under method="fisher" the predicted loss increase itself) or
        "sensitivity" (measured calibration-loss change per matrix), the last two under the
        uniform ratio's parameter budget (hylorada/compress/allocate.py; need the ratio policy);
        "auto" (default, `allocate.resolve_allocate`): "loss" for method="fisher" with the ratio
        policy, "sensitivity" for method="whiten" with the ratio policy, calibration data and a
        model on a CUDA device, "uniform" otherwise (on a CPU sensitivity costs ~4 full-model forwards of
        sensitivity_blocks blocks per matrix: hours for a 135M model on 2 cores). The report
        records what it resolved to. sensitivity_blocks: calibration blocks its loss is measured on.
    calibrate: "dense" (every layer's statistics from the dense model) or "sequential" (from the
        model compressed so far, one input group at a time; hylorada/compress/sequential.py).
    update: "none" or "lstsq" (re-solve `up` by least squares against the dense layer's outputs;
        hylorada/compress/update.py).
    recover_loss / kd_temperature: the loss of the recovery that follows compression
        (hylorada/losses.py, hylorada/recipes/compress.py); compress_model does not read them.
    """

    method: str = field(default="whiten", metadata={
        "help": "svd: truncated SVD of W; whiten: SVD of W·L (SVD-LLM; needs calibration); "
                "fisher: SVD of Rᵀ·W·L, R from the output gradients (K-FAC loss model)", "choices": METHODS})
    ratio: float | None = field(default=None, metadata={
        "help": "fraction of the target linears' parameters removed, in (0, 1)"})
    energy: float | None = field(default=None, metadata={"help": "share of Σσ² kept per layer, in (0, 1]"})
    alpha: float | None = field(default=None, metadata={"help": "rank = floor(alpha·min(m, n)), in (0, 1]"})
    budget: int | float | None = field(default=None, metadata={
        "help": "parameters the target linears keep: a count, or a fraction in (0, 1) of their current ones"})
    budget_energy: str = field(default="relative", metadata={
        "help": "budget: σ² as a share of each layer's Σσ² (relative) or as is", "choices": BUDGET_ENERGY})
    target_modules: list[str] | None = field(default=None, metadata={
        "help": "module name piece to compress (default: every linear of the decoder layers)", "flag": "--target"})
    overrides: dict[str, float | int | str] = field(default_factory=dict, metadata={
        "help": "NAME=VALUE per-module setting: mlp=0.3, q_proj=64 (a rank), o_proj=dense", "flag": "--override"})
    svd_solver: str = field(default="full", metadata={
        "help": "full SVD, randomized, or gram (eigen-decomposition of the smaller Gram matrix)",
        "choices": SOLVERS, "flag": "--solver"})
    oversample: int = field(default=10, metadata={"help": "randomized solver: extra columns"})
    n_iter: int = field(default=2, metadata={"help": "randomized solver: power iterations"})
    whiten_method: str = field(default="cholesky", metadata={
        "help": "factor of the Gram matrix: Cholesky (jitter on failure) or eigen-decomposition",
        "choices": WHITEN_METHODS})
    jitter: float = field(default=1e-8, metadata={"help": "Cholesky: jitter·tr(G)/n added on failure, x10 per retry"})
    calib_blocks: int | None = field(default=None, metadata={"help": "calibration blocks (None: all given)"})
    calib_seq_len: int | None = field(default=None, metadata={
        "help": "tokens per calibration block (None: as given)"})
    calib_batch_size: int = field(default=4, metadata={"help": "calibration blocks per forward"})
    calib_precision: str = field(default="exact", metadata={
        "help": "Gram products in float64 (exact) or per batch in the activation dtype, summed in float64 "
                "(mixed; fast on a GPU)", "choices": CALIB_PRECISIONS})
    force: bool = field(default=False, metadata={"help": "factorise even layers whose rank saves nothing"})
    rank_multiple: int = field(default=1, metadata={
        "help": "round ranks down to a multiple of this (8 keeps GPU GEMMs aligned)"})
    dtype: str | None = field(default=None, metadata={
        "help": "storage dtype of the factors (default: the model's)", "flag": "--factor-dtype"})
    compute_dtype: str = field(default="float64", metadata={"help": "dtype of the SVD and the whitening"})
    seed: int = field(default=0, metadata={"help": "seed of the randomized solver and the calibration blocks"})
    allocate: str = field(default="auto", metadata={
        "help": "ranks: uniform per matrix, or shared under the same budget by relative truncation loss "
                "or by measured sensitivity; auto = sensitivity for whiten + ratio on a CUDA device (the "
                "best measured, docs/COMPRESSION-OPTIONS.md), uniform otherwise", "choices": ALLOCATE_CHOICES})
    sensitivity_blocks: int = field(default=8, metadata={"help": "calibration blocks the sensitivity is measured on"})
    calibrate: str = field(default="dense", metadata={
        "help": "whitening statistics from the dense model or from the model compressed so far",
        "choices": CALIBRATIONS})
    update: str = field(default="none", metadata={
        "help": "re-solve the up factors by least squares against the dense outputs", "choices": UPDATES})
    recover_loss: str = field(default="lm", metadata={
        "help": "recovery loss: next-token (lm), distillation from the dense model (kd), or both"})
    kd_temperature: float = field(default=1.0, metadata={"help": "distillation temperature T"})

    def __post_init__(self) -> None:
        """Every field checked, in this order; the first bad one is a UsageError naming it, its
        value and what is allowed."""
        _one_of(self, "method", METHODS)
        self._check_policy()
        _one_of(self, "budget_energy", BUDGET_ENERGY)
        self._check_targets()
        self._check_overrides()
        for name, allowed in (("svd_solver", SOLVERS), ("calib_precision", CALIB_PRECISIONS),
                              ("whiten_method", WHITEN_METHODS)):
            _one_of(self, name, allowed)
        self._check_numbers()
        self.dtype = _dtype_name(self.dtype, "dtype")
        self.compute_dtype = _dtype_name(self.compute_dtype, "compute_dtype", allow_none=False)
        _one_of(self, "compute_dtype", ("float32", "float64"))
        self._check_options()

    def _check_policy(self) -> None:
        """Exactly one rank policy is set, to a number in its range (`_check_value`)."""
        set_ = [p for p in POLICIES if getattr(self, p) is not None]
        if len(set_) != 1:
            raise UsageError(f"CompressConfig: set exactly one rank policy of {POLICIES} "
                             f"(ratio, energy, alpha or budget), got {set_ or 'none'}")
        v = getattr(self, set_[0])
        if not _is_number(v):
            raise UsageError(f"CompressConfig.{set_[0]} must be a number, got {v!r}")
        self._check_value(set_[0], v, f"CompressConfig.{set_[0]}")

    def _check_targets(self) -> None:
        """target_modules: None, or a name piece / non-empty list of them (stored as a list)."""
        if self.target_modules is None:
            return
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = list(self.target_modules)
        if not (isinstance(self.target_modules, list) and self.target_modules
                and all(isinstance(t, str) and t.strip(".") for t in self.target_modules)):
            raise UsageError("CompressConfig.target_modules must be None or a non-empty list "
                             f"of module name pieces, got {self.target_modules!r}")

    def _check_overrides(self) -> None:
        """overrides: name piece -> a float in the policy's unit, an int rank >= 1, or "dense"."""
        if not isinstance(self.overrides, dict):
            raise UsageError(f"CompressConfig.overrides must be a dict name -> value, "
                             f"got {type(self.overrides).__name__}")
        for key, val in self.overrides.items():
            where = f"CompressConfig.overrides[{key!r}]"
            if not isinstance(key, str) or not key.strip("."):
                raise UsageError(f"CompressConfig.overrides keys must be module name pieces, got {key!r}")
            if isinstance(val, str):
                if val != "dense":
                    raise UsageError(f"{where} must be a float in the policy's unit, an int rank "
                                     f"or 'dense', got {val!r}")
            elif isinstance(val, int) and not isinstance(val, bool):
                if val < 1:
                    raise UsageError(f"{where}: a rank must be >= 1, got {val}")
            elif isinstance(val, float):
                self._check_value("ratio" if self.policy == "budget" else self.policy, val, where)
            else:
                raise UsageError(f"{where} must be a float, an int rank or 'dense', got {val!r}")

    def _check_numbers(self) -> None:
        """The integer knobs, jitter and force."""
        for name in ("oversample", "n_iter", "seed"):
            _int_at_least(self, name, 0)
        for name in ("calib_blocks", "calib_seq_len"):
            _int_at_least(self, name, 1, allow_none=True)
        _int_at_least(self, "calib_batch_size", 1)
        if not _is_number(self.jitter) or not 0 < self.jitter < float("inf"):
            raise UsageError(f"CompressConfig.jitter must be a finite number > 0, got {self.jitter!r}")
        _int_at_least(self, "rank_multiple", 1)
        if not isinstance(self.force, bool):
            raise UsageError(f"CompressConfig.force must be a bool, got {self.force!r}")

    def _check_options(self) -> None:
        """allocate / calibrate / update and the combinations they need; the recovery loss."""
        for name, allowed in (("allocate", ALLOCATE_CHOICES), ("calibrate", CALIBRATIONS),
                              ("update", UPDATES)):
            _one_of(self, name, allowed)
        if self.allocate not in ("uniform", "auto") and self.policy != "ratio":
            raise UsageError(f"CompressConfig.allocate={self.allocate!r} shares the budget of the ratio "
                             f"policy: set ratio, not {self.policy}")
        if self.method == "fisher":
            self._check_fisher()
        if self.calibrate == "sequential" and self.method != "whiten" and self.update != "lstsq":
            raise UsageError("CompressConfig.calibrate='sequential' changes the whitening and the "
                             "update only: use it with method='whiten' or update='lstsq'")
        _int_at_least(self, "sensitivity_blocks", 1)
        check_loss(self.recover_loss, self.kd_temperature, "CompressConfig.recover_loss",
                   "CompressConfig.kd_temperature")

    def _check_fisher(self) -> None:
        """method="fisher" optimises the K-FAC loss model with dense statistics: the options that
        optimise something else (or would need per-layer output statistics streamed) are refused."""
        for name, allowed in (("calibrate", ("dense",)), ("allocate", ("auto", "uniform", "loss")),
                              ("update", ("none",))):
            if getattr(self, name) not in allowed:
                raise UsageError(f"CompressConfig.{name}={getattr(self, name)!r} does not combine with "
                                 f"method='fisher': allowed {', '.join(map(repr, allowed))}")

    @staticmethod
    def _check_value(policy: str, v, where: str) -> None:
        if policy == "ratio" and not 0 < v < 1:
            raise UsageError(f"{where} must be in (0, 1): the fraction of parameters removed "
                             f"(0.2 keeps 80%), got {v!r}")
        if policy == "energy" and not 0 < v <= 1:
            raise UsageError(f"{where} must be in (0, 1]: the share of Σσ² kept, got {v!r}")
        if policy == "alpha" and not 0 < v <= 1:
            raise UsageError(f"{where} must be in (0, 1]: the rank as a fraction of min(d_in, d_out), "
                             f"got {v!r}")
        if policy == "budget":
            ok = (isinstance(v, float) and 0 < v < 1) or (
                float(v).is_integer() and v >= 1)
            if not ok:
                raise UsageError(f"{where} must be an int >= 1 (parameters kept) or a float in (0, 1) "
                                 f"(fraction of the target layers' parameters kept), got {v!r}")

    @property
    def needs_calibration(self) -> bool:
        """Whether compress_model needs calibration token ids: whitening, the least-squares
        update, sensitivity allocation and sequential calibration all read activations."""
        return (self.whitened or self.update == "lstsq" or self.allocate == "sensitivity"
                or self.calibrate == "sequential")

    @property
    def whitened(self) -> bool:
        """Whether the SVD is of the whitened W·L (method "whiten", or "fisher": Rᵀ·W·L)."""
        return self.method in ("whiten", "fisher")

    @property
    def policy(self) -> str:
        """The rank policy that is set: one of ratio, energy, alpha, budget."""
        return next(p for p in POLICIES if getattr(self, p) is not None)

    @property
    def policy_value(self) -> float:
        return getattr(self, self.policy)

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return None if self.dtype is None else DTYPES[self.dtype]

    @property
    def torch_compute_dtype(self) -> torch.dtype:
        return DTYPES[self.compute_dtype]

    def to_dict(self) -> dict:
        return asdict(self)
