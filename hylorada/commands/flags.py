"""Command-line flags: the range of every int/float flag, and flags generated from config fields.

- `RANGES`: the allowed range of every int/float flag, by argparse `dest` (a flag that means
  something else in one command passes its own `types=`, tune's --eval-every); `apply_ranges`
  installs them as the flags' `type=` functions, so a bad value is refused while parsing:
  "argument --seq-len: 1 is out of range: allowed an integer >= 2".
  tests/test_cli_errors.py checks that every int/float flag has an entry.
- `COMMON` / `add_common_flags`: the flags several commands share (--model, --dtype, --device,
  --threads, --seed, --out, --overwrite, --no-progress), defined once; `command_parser`: a
  command's sub-parser; `parsed(args)`: the flags a run records.
- `add_config_flags(parser, Config, fields)`: one flag per dataclass field, from the field's
  type, default and metadata ("help", "choices", "flag"; hylorada/config.py `field_flag`), so a
  method list, a choice list or a help text exists once, in the config.
- `config_values` / `config_flags`: the parsed values of those fields, and field -> flag for
  `as_flags`, which names the flag in a config's one-line error.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import re

from ..config import field_flag
from ..errors import UsageError


# ----------------------------------------------------------------------------- flag ranges
def _range_type(name: str, convert, noun: str, allowed: str, ok, bad: list[str], shown):
    """An argparse type: `convert(text)` (else "'x' is not NOUN"), then `ok(v)` (else "SHOWN is out
    of range"), both "; allowed ALLOWED"; `.allowed` and `.bad` (values it refuses) for the tests."""
    def parse(text: str):
        try:
            v = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}; allowed {allowed}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"{shown(text, v)} is out of range; allowed {allowed}")
        return v

    parse.__name__, parse.allowed, parse.bad = name, allowed, bad
    return parse


def int_range(lo: int, hi: int | None = None, *, zero_means: str | None = None):
    """argparse type: an int in [lo, hi]; with `zero_means`, 0 is also allowed (e.g. "all")."""
    allowed = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"
    if zero_means:
        allowed = f"0 ({zero_means}) or {allowed}"
    bad = [str(lo - 1 if lo - 1 != 0 or not zero_means else -1)] + ([str(hi + 1)] if hi is not None else [])
    return _range_type("int", int, "an integer", allowed,
                       lambda v: (zero_means and v == 0) or (v >= lo and (hi is None or v <= hi)),
                       bad, lambda text, v: v)


def float_range(lo: float, hi: float = math.inf, *, lo_open: bool = False, hi_open: bool = False):
    """argparse type: a finite float in the interval lo..hi (open or closed at each end)."""
    if hi == math.inf:
        allowed = f"a finite number {'>' if lo_open else '>='} {lo:g}"
    else:
        allowed = f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    bad = [f"{lo if lo_open else lo - 1:g}", "nan"] + ([f"{hi if hi_open else hi + 1:g}"] if hi != math.inf else [])
    def ok(v: float) -> bool:
        return math.isfinite(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)

    return _range_type("float", float, "a number", allowed, ok, bad, lambda text, v: text)


POS_INT = int_range(1)
NONNEG_INT = int_range(0)
SEQ_LEN = int_range(2)  # one token has no next token to predict: loss 0, "ppl 1.00"
POS_FLOAT = float_range(0, lo_open=True)
NONNEG_FLOAT = float_range(0)
FRACTION = float_range(0, 1, lo_open=True, hi_open=True)
SHARE = float_range(0, 1, lo_open=True)  # (0, 1]
PROB = float_range(0, 1, hi_open=True)  # [0, 1)
UNIT = float_range(0, 1)  # [0, 1]

RANGES = {
    "threads": POS_INT, "seed": NONNEG_INT, "sampler_seed": NONNEG_INT,
    "seq_len": SEQ_LEN, "eval_seq_len": SEQ_LEN, "calib_seq_len": SEQ_LEN, "recover_seq_len": SEQ_LEN,
    "steps": POS_INT, "batch_size": POS_INT, "grad_accum": POS_INT, "eval_batch_size": POS_INT,
    "calib_blocks": POS_INT, "calib_batch_size": POS_INT, "recover_batch_size": POS_INT,
    "n_trials": POS_INT, "seeds": POS_INT, "n_buckets": POS_INT, "valid_blocks": POS_INT,
    "startup_trials": NONNEG_INT, "rank_multiple": POS_INT, "stride": POS_INT,
    "max_tokens": int_range(2), "max_train_tokens": int_range(2), "eval_max_tokens": int_range(2),
    "max_eval_tokens": int_range(2, zero_means="all"),
    "recover_steps": NONNEG_INT, "recover_rank": POS_INT, "recover_lr": POS_FLOAT,
    "rank": POS_INT, "target_rank": POS_INT, "eval_batches": POS_INT,
    "eval_every": NONNEG_INT, "save_every": NONNEG_INT, "log_every": NONNEG_INT, "warmup_steps": NONNEG_INT,
    "lr": POS_FLOAT, "weight_decay": NONNEG_FLOAT, "min_lr_ratio": UNIT, "max_grad_norm": NONNEG_FLOAT,
    "alpha": POS_FLOAT, "dropout": PROB, "lora_plus_ratio": POS_FLOAT,
    "ratio": FRACTION, "energy": SHARE,
    "kd_temperature": POS_FLOAT,
    "max_new_tokens": POS_INT, "top_k": NONNEG_INT, "top_p": SHARE, "temperature": POS_FLOAT,
}
def apply_ranges(parser: argparse.ArgumentParser) -> None:
    """Give every plain int/float option of `parser` its range type (see RANGES)."""
    for action in parser._actions:
        if action.type in (int, float):
            action.type = RANGES.get(action.dest, action.type)


def budget(text: str) -> float:
    """argparse type of --budget: a parameter count (120M, 80000000) or a percentage kept (80%)."""
    t = text.strip().lower().replace("_", "").replace(",", "")
    try:
        if t.endswith("%"):
            v = float(t[:-1]) / 100
            if not 0 < v < 1:
                raise ValueError
            return v
        mult = {"k": 1e3, "m": 1e6, "g": 1e9, "b": 1e9}.get(t[-1:], 1)
        v = float(t[:-1] if mult != 1 else t) * mult
        if v < 1:
            raise ValueError
        return int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--budget {text!r}: give a parameter count (120M, 80000000) or a percentage kept (80%)") from None


def override(text: str) -> tuple[str, object]:
    """argparse type of --override: NAME=VALUE with a float, an int rank or 'dense'."""
    key, sep, val = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--override {text!r}: expected NAME=VALUE (mlp=0.3, q_proj=64, "
                                         "o_proj=dense)")
    if val == "dense":
        return key, val
    try:
        return key, int(val)
    except ValueError:
        try:
            return key, float(val)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--override {text!r}: VALUE must be a float, an int rank or "
                                             "'dense'") from None


# ----------------------------------------------------------------------------- flags several commands share
MODEL_HELP = "alias (smollm2-135m), transformers folder, .gguf file or hub id"
COMMON = {  # name -> (flag, add_argument keywords); `add_common_flags` may change default and help
    "model": ("--model", {"default": "smollm2-135m", "help": MODEL_HELP + " (default: %(default)s)"}),
    "dtype": ("--dtype", {"default": "float32", "help": "model weights dtype (default: %(default)s)"}),
    "device": ("--device", {"default": "cpu", "help": "torch device: cpu, cuda, cuda:N (default: %(default)s)"}),
    "threads": ("--threads", {"type": int, "default": None, "help": "torch CPU threads"}),
    "seed": ("--seed", {"type": int, "default": 0, "help": "random seed (default: %(default)s)"}),
    "out": ("--out", {"default": None, "help": "output folder"}),
    "overwrite": ("--overwrite", {"action": "store_true",
                                  "help": "replace a previous output of this command at --out (atomically)"}),
    "no_progress": ("--no-progress", {"action": "store_true", "help": "no progress bars"}),
}


def command_parser(subparsers, name: str, summary: str, doc: str) -> argparse.ArgumentParser:
    """The sub-parser of command `name`: `summary` in `hylorada --help`, `doc` (the module's
    docstring, as written) atop `hylorada NAME --help`."""
    return subparsers.add_parser(name, help=summary, description=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)


def add_common_flags(parser, *names: str, defaults: dict | None = None, helps: dict | None = None) -> None:
    """Add the COMMON flags `names` to `parser` (a parser or a group), in that order, with
    `defaults[name]` / `helps[name]` in place of the table's."""
    defaults, helps = defaults or {}, helps or {}
    for name in names:
        flag, kw = COMMON[name]
        kw = dict(kw, **({"default": defaults[name]} if name in defaults else {}))
        parser.add_argument(flag, **dict(kw, help=helps.get(name, kw["help"])))


def parsed(args: argparse.Namespace) -> dict:
    """The parsed flags (what a run records), without the dispatch function."""
    return {k: v for k, v in vars(args).items() if k != "func"}


# ----------------------------------------------------------------------------- flags from config fields
def _fields(cls, names) -> list[dataclasses.Field]:
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    return [by_name[n] for n in names]


def _default(f: dataclasses.Field):
    """The field's default (MISSING for a required field)."""
    return f.default if f.default_factory is dataclasses.MISSING else f.default_factory()


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def add_config_flags(parser, cls, names, *, flags: dict | None = None, defaults: dict | None = None,
                     helps: dict | None = None, types: dict | None = None, choices: dict | None = None) -> None:
    """Add a flag for each field `names` of the dataclass `cls` to `parser` (a parser or a group).

    Flag: `flags[name]`, else hylorada.config.field_flag (metadata "flag" or --name-with-dashes).
    A field without a default gives a required flag. Kind from the field's annotation (the first
    type of a union): bool -> store_true, list -> nargs="+", int/float -> the range type
    `types[name]` or RANGES[dest] (a missing range is an error here), str -> a string.
    default: `defaults[name]`, else the field's. help: `helps[name]`, else metadata "help" with
    " (default: ...)" added when there is a default; choices: `choices[name]` or metadata."""
    flags, defaults, helps, types, choices = (d or {} for d in (flags, defaults, helps, types, choices))
    for f in _fields(cls, names):
        flag = flags.get(f.name) or field_flag(f)
        dest = _dest(flag)
        kind = re.match(r"\w+", str(f.type)).group()
        default = defaults[f.name] if f.name in defaults else _default(f)
        kw: dict = {"default": default} if default is not dataclasses.MISSING else {"required": True}
        if kind == "bool":
            kw["action"] = "store_true"
        elif kind == "list":
            kw["nargs"] = "+"
        elif f.name in types or kind in ("int", "float"):
            kw["type"] = types[f.name] if f.name in types else RANGES[dest]
        if choices.get(f.name) or f.metadata.get("choices"):
            kw["choices"] = list(choices.get(f.name) or f.metadata["choices"])
        text = helps.get(f.name)
        if text is None and f.metadata.get("help"):
            text = f.metadata["help"].replace("%", "%%")
            if not any(default is v for v in (None, False, dataclasses.MISSING)) and "default" not in text:
                text += " (default: %(default)s)"
        parser.add_argument(flag, help=text, **kw)


def config_flags(cls, names, flags: dict | None = None) -> dict[str, str]:
    """field -> flag of the fields `add_config_flags` generated (for `as_flags`)."""
    return {f.name: (flags or {}).get(f.name) or field_flag(f) for f in _fields(cls, names)}


def config_values(cls, args: argparse.Namespace, names, flags: dict | None = None) -> dict:
    """field -> parsed value of the flags `add_config_flags` generated."""
    return {name: getattr(args, _dest(flag)) for name, flag in config_flags(cls, names, flags).items()}


_FIELD = re.compile(r"^(?:[A-Z]\w*\.|benchmark )?(\w+)")


@contextlib.contextmanager
def as_flags(fields: dict[str, str]):
    """Prefix a config's UsageError ("TrainConfig.lr=... is invalid: allowed ...") with the flag
    that set the field (`fields`: field -> flag), so the user sees which flag to change."""
    try:
        yield
    except UsageError as e:
        m = _FIELD.match(str(e))
        flag = fields.get(m.group(1)) if m else None
        if flag is None:
            raise
        raise UsageError(f"{flag}: {e}") from None

