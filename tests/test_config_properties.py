"""Property tests of config parsing (issue 11): any dict of field values either builds a config
that satisfies its documented contract, or raises ValueError (UsageError) naming a field.
Never a TypeError/AttributeError from deep inside, never a config that holds nonsense.

The contracts checked after a successful build are written out here from the docstrings of
hylorada/config.py, hylorada/compress/config.py and hylorada/train.py, not taken from the code.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hylorada.compress.config import CompressConfig
from hylorada.config import HyLoRADAConfig
from hylorada.errors import UsageError
from hylorada.train import TrainConfig

WORDS = ["lora", "dora", "hylorada", "lorada", "kaiming", "orthogonal", "gaussian", "all-linear", "q_proj",
         "mlp", "svd", "whiten", "full", "randomized", "gram", "cholesky", "eigh", "exact", "mixed", "relative",
         "absolute", "float32", "bf16", "fp16", "float64", "cosine", "linear", "constant", "auto", "no", "bf16",
         "dense", "", " ", "out"]

# the values that break validators most often, drawn about half of the time
EDGES = st.sampled_from([None, True, False, 0, 1, -1, 2, 0.0, 0.5, 1.0, -0.5, 1.5, math.nan, math.inf, -math.inf,
                         "", "x", [], {}, ["q_proj"], "float32"])
VALUES = st.one_of(
    EDGES, EDGES, EDGES, EDGES, EDGES, EDGES, EDGES, EDGES, st.integers(-3, 70), st.integers(-2**63, 2**63),
    st.floats(allow_nan=True, allow_infinity=True), st.floats(0, 1), st.sampled_from(WORDS), st.text(max_size=6),
    st.lists(st.one_of(st.sampled_from(WORDS), st.integers(0, 3)), max_size=3),
    st.dictionaries(st.one_of(st.sampled_from(WORDS), st.integers(0, 2)),
                    st.one_of(st.floats(), st.integers(-2, 300), st.sampled_from(["dense", "x"]), st.none()),
                    max_size=2),
)
SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def field_dicts(cls, extra_keys=(), max_size=3):
    names = [f.name for f in dataclasses.fields(cls)] + list(extra_keys)
    return st.dictionaries(st.sampled_from(names), VALUES, max_size=max_size)


def builds_or_names_a_field(cls, build, values: dict, init_only=()):
    names = [f.name for f in dataclasses.fields(cls)] + list(init_only)
    try:
        cfg = build(values)
    except ValueError as e:
        assert isinstance(e, UsageError), f"{type(e).__name__}: {e}"
        assert any(n in str(e) for n in names), str(e)
        return None
    return cfg


def finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def pos_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1


def nonneg_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def names(x) -> bool:
    return (isinstance(x, str) and x != "") or (isinstance(x, list) and len(x) > 0
                                                 and all(isinstance(t, str) and t for t in x))


@SETTINGS
@given(field_dicts(HyLoRADAConfig, extra_keys=["rank", "bogus", "use_hylorada"]))
def test_hylorada_config(values):
    check_hylorada(values)


def check_hylorada(values):
    cfg = builds_or_names_a_field(HyLoRADAConfig, HyLoRADAConfig.from_dict, values, init_only=["use_hylorada"])
    if cfg is None:
        return
    assert cfg.method in ("lora", "dora", "hylorada", "lorada")
    assert cfg.use_hylorada is (cfg.method == "hylorada")
    assert cfg.init_lora_weights in ("kaiming", "orthogonal", "gaussian")
    assert pos_int(cfg.lora_rank)
    assert finite(cfg.lora_alpha) and cfg.lora_alpha > 0
    assert finite(cfg.lora_dropout) and 0 <= cfg.lora_dropout < 1
    assert finite(cfg.lora_plus_ratio) and cfg.lora_plus_ratio > 0
    assert finite(cfg.gate_init) and finite(cfg.residual_init)
    assert finite(cfg.temperature_init) and cfg.temperature_init > 0
    assert finite(cfg.norm_eps) and cfg.norm_eps > 0
    for flag in ("use_rslora", "lora_plus_enabled", "fused"):
        assert isinstance(getattr(cfg, flag), bool), flag
    assert cfg.target_modules is None or names(cfg.target_modules)
    assert isinstance(cfg.extra, dict)
    assert math.isfinite(cfg.scaling) and cfg.scaling > 0
    assert HyLoRADAConfig.from_dict(cfg.to_dict()) == cfg  # a built config round-trips


POLICY = {"ratio": (0, 1, False), "energy": (0, 1, True), "alpha": (0, 1, True)}


@SETTINGS
@given(field_dicts(CompressConfig), st.sampled_from(["ratio", "energy", "alpha", "budget", None]),
       st.floats(-0.5, 1.5) | st.integers(-2, 10**9))
def test_compress_config(values, policy, value):
    # a valid policy underneath, so that the other fields' checks are reached
    check_compress({"ratio": 0.2, **values} if policy is None else {**values, policy: value})


def check_compress(values):
    cfg = builds_or_names_a_field(CompressConfig, lambda v: CompressConfig(**v), values)
    if cfg is None:
        return
    set_ = [p for p in ("ratio", "energy", "alpha", "budget") if getattr(cfg, p) is not None]
    assert len(set_) == 1
    v = getattr(cfg, set_[0])
    assert finite(v)
    if set_[0] in POLICY:
        lo, hi, hi_closed = POLICY[set_[0]]
        assert lo < v and (v <= hi if hi_closed else v < hi)
    else:
        assert (isinstance(v, float) and 0 < v < 1) or (float(v).is_integer() and v >= 1)
    assert cfg.method in ("svd", "whiten") and cfg.svd_solver in ("full", "randomized", "gram")
    assert cfg.whiten_method in ("cholesky", "eigh") and cfg.calib_precision in ("exact", "mixed")
    assert cfg.budget_energy in ("relative", "absolute")
    assert cfg.target_modules is None or (isinstance(cfg.target_modules, list) and names(cfg.target_modules))
    assert isinstance(cfg.overrides, dict)
    for key, val in cfg.overrides.items():
        assert isinstance(key, str) and key.strip(".")
        assert val == "dense" or pos_int(val) or (isinstance(val, float) and finite(val))
    for name in ("oversample", "n_iter", "seed"):
        assert nonneg_int(getattr(cfg, name)), name
    for name in ("calib_blocks", "calib_seq_len"):
        assert getattr(cfg, name) is None or pos_int(getattr(cfg, name)), name
    assert pos_int(cfg.calib_batch_size) and pos_int(cfg.rank_multiple)
    assert finite(cfg.jitter) and cfg.jitter > 0
    assert isinstance(cfg.force, bool)
    assert cfg.dtype in (None, "float32", "float16", "bfloat16", "float64")
    assert cfg.compute_dtype in ("float32", "float64")


@SETTINGS
@given(field_dicts(TrainConfig))
def test_train_config(values):
    check_train(values)


def check_train(values):
    cfg = builds_or_names_a_field(TrainConfig, lambda v: TrainConfig(**v), values)
    if cfg is None:
        return
    for name in ("steps", "batch_size", "grad_accum"):
        assert pos_int(getattr(cfg, name)), name
    for name in ("warmup_steps", "eval_every", "save_every", "log_every", "seed"):
        assert nonneg_int(getattr(cfg, name)), name
    assert finite(cfg.lr) and cfg.lr > 0
    assert finite(cfg.weight_decay) and cfg.weight_decay >= 0
    assert cfg.schedule in ("cosine", "linear", "constant")
    assert finite(cfg.min_lr_ratio) and 0 <= cfg.min_lr_ratio <= 1
    assert cfg.max_grad_norm is None or (finite(cfg.max_grad_norm) and cfg.max_grad_norm >= 0)
    assert cfg.eval_batches is None or pos_int(cfg.eval_batches)
    assert cfg.mixed_precision in ("auto", "no", "bf16")
    for flag in ("resume", "progress", "shuffle"):
        assert isinstance(getattr(cfg, flag), bool), flag
    assert cfg.find_unused_parameters in (None, True, False)
    assert cfg.out_dir is None or (isinstance(cfg.out_dir, str) and cfg.out_dir != "")
    assert not cfg.resume or cfg.out_dir
    assert cfg.compile in ("auto", "yes", "no")
    assert isinstance(cfg.compile_backend, str) and cfg.compile_backend


EDGE_LIST = [None, True, False, 0, 1, -1, 2, 0.0, 0.5, 1.0, -0.5, 1.5, 10**30, math.nan, math.inf, -math.inf,
             "", "x", "dense", [], [""], ["q_proj"], {}, {"mlp": True}, {"mlp": math.nan}, {"": 2}, "float32"]
CHECKS = {HyLoRADAConfig: check_hylorada, CompressConfig: check_compress, TrainConfig: check_train}


@pytest.mark.parametrize("cls", list(CHECKS), ids=lambda c: c.__name__)
def test_every_field_with_every_edge_value(cls):
    """Exhaustive over one field at a time (hypothesis rarely draws one exact bad value for one
    exact field among ~20): each field set to each edge value, the rest default (a valid
    rank policy underneath for CompressConfig)."""
    base = {"ratio": 0.2} if cls is CompressConfig else {}
    for f in dataclasses.fields(cls):
        for v in EDGE_LIST:
            values = {**base, f.name: v}
            if cls is CompressConfig and f.name in ("energy", "alpha", "budget") and v is not None:
                values.pop("ratio")
            CHECKS[cls](values)


@pytest.mark.parametrize("cls,values,field", [
    (HyLoRADAConfig, {"lora_rank": 0}, "lora_rank"),
    (HyLoRADAConfig, {"lora_dropout": 1.0}, "lora_dropout"),
    (HyLoRADAConfig, {"lora_alpha": 5e-324}, "lora_alpha"),  # found by hypothesis: alpha/r underflows to 0
    (CompressConfig, {"ratio": 1.0}, "ratio"),
    (TrainConfig, {"batch_size": 0}, "batch_size"),
    (TrainConfig, {"lr": float("nan")}, "lr"),
])
def test_named_examples(cls, values, field):
    """Fixed cases, so that a regression shows without hypothesis' search."""
    with pytest.raises(UsageError, match=field):
        cls(**values)
