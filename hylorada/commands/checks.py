"""The checks that run before any expensive work, shared by the sub-commands: devices, dtypes,
positions, compression targets, data files, output paths; the benchmark's config with its checks
(`benchmark_config`); and the messages that repeat the command. Each raises `UsageError` (exit
2) or `HyloradaError` (exit 1) naming the flag, the value or file, and what is allowed. Known failures of the libraries we call (a binary file
given as text, a bad JSON line) are translated here, where we call them; anything else keeps its
traceback (a bug). Model files: hylorada/commands/load.py.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
from pathlib import Path

from ..errors import HyloradaError, UsageError


class Interrupted(HyloradaError):
    """Ctrl-C: exit code 130 (128 + SIGINT), the shell convention."""

    exit_code = 130


# ----------------------------------------------------------------------------- devices, dtypes
def check_device(device: str, flag: str = "--device") -> None:
    """A torch device that exists here: cpu, cuda[:N] with a GPU, mps where available."""
    import torch

    try:
        d = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise UsageError(f"{flag} {device!r} is not a torch device; allowed cpu, cuda, cuda:N, mps") from None
    if d.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            why = "this torch has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise UsageError(f"{flag} {device}: {why}; use --device cpu")
        if d.index is not None and d.index >= n:
            raise UsageError(f"{flag} {device}: there are {n} GPU(s); allowed cuda:0..cuda:{n - 1}")
    elif d.type == "mps":
        if not torch.backends.mps.is_available():
            raise UsageError(f"{flag} {device}: MPS is not available here; use --device cpu")
    elif d.type != "cpu":
        raise UsageError(f"{flag} {device}: allowed cpu, cuda, cuda:N, mps")


def check_dtype(dtype: str, flag: str = "--dtype") -> None:
    from ..loading import resolve_dtype

    try:
        resolve_dtype(dtype)
    except ValueError as e:
        raise UsageError(f"{flag} {dtype!r}: {e}") from None


def max_positions(model) -> int | None:
    cfg = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def check_positions(model, lengths: dict[str, int | None]) -> None:
    """Each `--flag: length` fits the model's positions (config.max_position_embeddings)."""
    mp = max_positions(model)
    if mp is None:
        return
    for flag, v in lengths.items():
        if v is not None and v > mp:
            raise UsageError(f"{flag} {v} is above the model's {mp} positions (max_position_embeddings); "
                             f"allowed 2..{mp}")


def check_targets(model, targets: list[str] | None) -> dict:
    """The layers --target names (hylorada.compress.targets.find_target_layers); none: UsageError."""
    from ..compress.targets import find_target_layers

    try:
        return find_target_layers(model, targets)
    except ValueError as e:
        raise UsageError(f"--target {' '.join(targets or [])}: {e}") from None


def check_compress_targets(model, config) -> None:
    """--target matches some layer and every --override key matches a target layer (an override
    naming no layer would silently do nothing)."""
    from ..compress.ranks import match_key

    layers = check_targets(model, config.target_modules)
    pieces = sorted({p for n in layers for p in n.split(".") if not p.isdigit()} - {"model", "layers"})
    for key, value in config.overrides.items():
        if not any(match_key(n, key) for n in layers):
            raise UsageError(f"--override {key}={value}: {key!r} names none of the {len(layers)} target layers; "
                             f"allowed dotted name pieces such as {', '.join(pieces[:12])}")


# ----------------------------------------------------------------------------- data
def _undecodable_file(path: Path) -> Path:
    """The first file under `path` (itself, or a folder's *.txt) that is not UTF-8."""
    for p in ([path] if path.is_file() else sorted(path.glob("*.txt"))):
        try:
            p.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            return p
    return path


def load_docs(name, split: str, flag: str = "--data") -> list:
    """`hylorada.data.load_documents(name, split)` (a corpus name, a path or a DataSpec) with file
    problems reported as UsageError naming `flag` and the file; refuses a split with no text."""
    from .. import data

    name_str = str(getattr(name, "source", None) or name)
    path = Path(name_str).expanduser()
    try:
        docs = data.load_documents(name, split)
    except UsageError as e:  # already one line (hylorada.data names --data): name the real flag
        msg = str(e)
        if flag != "--data" and msg.startswith("--data "):
            raise UsageError(flag + msg[len("--data"):]) from None
        raise
    except UnicodeDecodeError as e:
        bad = _undecodable_file(path)
        raise UsageError(f"{flag} {name_str}: {bad} is not UTF-8 text (byte {e.start}: {e.reason}); "
                         "give a UTF-8 .txt or .jsonl file") from None
    except json.JSONDecodeError as e:
        line = data.first_bad_json_line(path) if path.is_file() else None
        raise UsageError(f"{flag} {name_str}: {path}{f':{line}' if line else ''} is not valid JSON lines ({e}); "
                         'each line must be {"text": "..."}') from None
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as e:
        raise UsageError(f"{flag} {name_str}: {one_line(e)}; give kjv, shakespeare, a .txt/.jsonl file or a "
                         "folder of .txt files") from None
    except ValueError as e:  # unsupported suffix, too few documents for a split (hylorada.data)
        raise UsageError(f"{flag} {name_str}: {one_line(e)}") from None
    if not any(d.messages is not None or d.text.strip() for d in docs):
        raise UsageError(f"{flag} {name_str}: the {split} split has no text (only whitespace, "
                         f"{sum(len(d.text) for d in docs)} characters); give a file with text")
    return docs


# ----------------------------------------------------------------------------- outputs
def _nearest_existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _check_dir_writable(folder: Path, flag: str, value: str) -> None:
    if not folder.is_dir():
        raise UsageError(f"{flag} {value}: {folder} is a file, not a folder; choose another path")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UsageError(f"{flag} {value}: cannot write in {folder} ({e.strerror}); choose a writable path") from None


def check_out_dir(value: str | os.PathLike | None, flag: str = "--out") -> None:
    """The output folder can be written: it is a writable folder, or its nearest existing
    ancestor is. Nothing is created."""
    if value is None:
        return
    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {value}: exists and is a file, not a folder; choose another path")
    _check_dir_writable(_nearest_existing(path), flag, str(value))


def check_output(out: str | None, overwrite: bool, kind: str) -> None:
    """--out before any work: writable; what a killed run left is restored or removed (a note on
    stderr); nothing but a previous `kind` output of ours, with --overwrite, is there
    (hylorada/utils/io.py). `out` None: nothing is written, nothing to check."""
    from ..utils.io import check_output_dir, clean_stale

    check_out_dir(out)
    if out:
        for line in clean_stale(out):  # first: restores an output a killed run was replacing
            print(f"  note: {line}", file=sys.stderr)
        check_output_dir(out, overwrite=overwrite, kind=kind)


def check_out_file(value: str | os.PathLike | None, flag: str, command: str) -> None:
    """An output file path: not a folder, in a writable folder, and if it exists it is a JSON
    result of `command` (ours), never a user's file."""
    if value is None:
        return
    path = Path(value).expanduser()
    if path.is_dir():
        raise UsageError(f"{flag} {value}: is a folder; give a file path")
    if path.exists():
        try:
            ours = json.loads(path.read_text(encoding="utf-8")).get("command") == command
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise UsageError(f"{flag} {value}: exists and is not a `hylorada {command}` result; "
                             "choose another path (it is left untouched)")
    _check_dir_writable(_nearest_existing(path.parent), flag, str(value))


# ----------------------------------------------------------------------------- per command
def benchmark_config(args: argparse.Namespace):
    """`hylorada benchmark`: the preset's BenchConfig with the flags; a GPU preset without a GPU
    runs on cpu (with a note). Unless --list/--report-only, the data and the model's positions
    are checked here, before any cell."""
    import torch

    from ..recipes.benchmark import PRESETS, make_config
    from .flags import as_flags
    from .load import load_for_run

    device = args.device or PRESETS[args.preset].get("device", "cpu")
    if args.device:
        check_device(args.device)
    check_out_dir(args.out)
    if device.startswith("cuda") and not torch.cuda.is_available():
        print(f"note: preset {args.preset} is sized for a GPU but none is available; running on cpu "
              "(this will be slow)", file=sys.stderr)
        device = "cpu"
    with as_flags({"seeds": "--seeds", "steps": "--steps", "target_rank": "--rank",
                   "eval_max_tokens": "--eval-tokens"}):
        cfg = make_config(args.preset, model=args.model, data=args.data, seeds=args.seeds, steps=args.steps,
                          target_rank=args.target_rank, eval_max_tokens=args.eval_max_tokens, device=device,
                          peft=False if args.no_peft else None, window_prefix=args.window_prefix,
                          compile=args.compile)
    if not args.list and not args.report_only:
        load_docs(cfg.data, "train")
        load_for_run(cfg.model, cfg.dtype, "cpu", {"seq_len (preset)": cfg.seq_len,
                                                   "eval_seq_len (preset)": cfg.eval_seq_len})
    return cfg


# ----------------------------------------------------------------------------- messages
def one_line(e: BaseException | str) -> str:
    return " ".join(str(e).split())


def command_line(args: argparse.Namespace, add: str | None = None) -> str:
    """The command that was run (`hylorada ...`, from cli.main's argv), plus `add` if missing."""
    argv = list(getattr(args, "argv", None) or [])
    if add and add not in argv:
        argv.append(add)
    return shlex.join(["hylorada", *argv])


def finetune_interrupted(args: argparse.Namespace, out: Path) -> Interrupted:
    """The Ctrl-C message of `finetune`: where the last checkpoint is and the --resume command."""
    from ..checkpoint import find_checkpoint, read_checkpoint_state

    ckpt = find_checkpoint(out)
    if ckpt is None:
        return Interrupted(f"interrupted before the first checkpoint, nothing saved in {out}; "
                           f"start again with: {command_line(args)}")
    try:
        step = f" (step {read_checkpoint_state(ckpt)['step']})"
    except (OSError, ValueError, KeyError):
        step = ""
    return Interrupted(f"interrupted; last checkpoint {ckpt}{step}; continue with: "
                       f"{command_line(args, '--resume')}")
