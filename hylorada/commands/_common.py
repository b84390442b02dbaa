"""Checks and error translation shared by the sub-commands: the boundary between the user's
input and the library.

- `RANGES`: the allowed range of every int/float flag, by argparse `dest` (per-command entries
  in `COMMAND_RANGES` win); `apply_ranges` installs them as the flags' `type=` functions, so a
  bad value is refused while parsing: "argument --seq-len: 1 is out of range: allowed an
  integer >= 2". tests/test_cli_errors.py checks that every int/float flag has an entry.
- `load_model_checked` / `load_docs` / `check_*`: run before any expensive work; they raise
  `UsageError` (exit 2) or `HyloradaError` (exit 1) naming the flag, the value or file, and
  what is allowed. Known failures of the libraries we call (a truncated .gguf or safetensors
  file, a binary file given as text, an unreachable hub) are translated here, where we call
  them; anything else keeps its traceback (a bug).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shlex
import struct
import tempfile
import threading
from pathlib import Path

from ..errors import HyloradaError, UsageError


class Interrupted(HyloradaError):
    """Ctrl-C: exit code 130 (128 + SIGINT), the shell convention."""

    exit_code = 130


# ----------------------------------------------------------------------------- flag ranges
def int_range(lo: int, hi: int | None = None, *, zero_means: str | None = None):
    """argparse type: an int in [lo, hi]; with `zero_means`, 0 is also allowed (e.g. "all")."""
    allowed = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"
    if zero_means:
        allowed = f"0 ({zero_means}) or {allowed}"

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer; allowed {allowed}") from None
        if not ((zero_means and v == 0) or (v >= lo and (hi is None or v <= hi))):
            raise argparse.ArgumentTypeError(f"{v} is out of range; allowed {allowed}")
        return v

    parse.__name__ = "int"
    parse.allowed = allowed
    parse.bad = [str(lo - 1 if lo - 1 != 0 or not zero_means else -1)] + ([str(hi + 1)] if hi is not None else [])
    return parse


def float_range(lo: float, hi: float = math.inf, *, lo_open: bool = False, hi_open: bool = False):
    """argparse type: a finite float in the interval lo..hi (open or closed at each end)."""
    if hi == math.inf:
        allowed = f"a finite number {'>' if lo_open else '>='} {lo:g}"
    else:
        allowed = f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number; allowed {allowed}") from None
        ok = math.isfinite(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
        if not ok:
            raise argparse.ArgumentTypeError(f"{text} is out of range; allowed {allowed}")
        return v

    parse.__name__ = "float"
    parse.allowed = allowed
    parse.bad = [f"{lo if lo_open else lo - 1:g}", "nan"] + ([f"{hi if hi_open else hi + 1:g}"] if hi != math.inf else [])
    return parse


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
# (command, dest) -> type, where a flag means something else in one command
COMMAND_RANGES = {
    ("compress", "alpha"): SHARE,  # rank = floor(alpha * min(m, n))
    ("tune", "eval_every"): POS_INT,
}


def apply_ranges(command: str, parser: argparse.ArgumentParser) -> None:
    """Give every int/float option of `parser` its range type (see RANGES)."""
    for action in parser._actions:
        if action.type in (int, float):
            action.type = COMMAND_RANGES.get((command, action.dest), RANGES.get(action.dest, action.type))


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


# ----------------------------------------------------------------------------- model files
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")
_FILE_SUFFIXES = (".gguf", ".safetensors", ".bin", ".pt", ".json", ".txt", ".jsonl")


def is_hub_name(name: str) -> bool:
    """True for a name that can only be a hub id: `org/name` or `name`, not an existing path,
    not starting with . / ~ and not ending in a file suffix."""
    return (bool(_HUB_ID.match(name)) and not Path(name).expanduser().exists()
            and not name.lower().endswith(_FILE_SUFFIXES))


def hub_reachable(timeout: float = 2.0) -> bool:
    """A quick TCP connect to the hub's host (HF_ENDPOINT or huggingface.co:443). With a proxy
    configured the answer is True (the proxy decides). DNS has no timeout of its own, so the
    connect runs in a daemon thread that is abandoned after `timeout` seconds."""
    import socket
    from urllib.parse import urlparse

    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    ok: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    return bool(ok)


def set_hub_offline() -> None:
    """No hub requests from here on (huggingface_hub reads the flag at import; set both)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        from huggingface_hub import constants
        constants.HF_HUB_OFFLINE = True
    except ImportError:  # pragma: no cover
        pass


def check_safetensors(path: Path) -> None:
    """The file is complete: an 8-byte header length N, N bytes of JSON header, and data up to
    the largest `data_offsets` end (the safetensors layout). Raises HyloradaError naming it."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ValueError(f"{size} bytes, not even a header")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise ValueError(f"{size:,} bytes, shorter than its {n:,}-byte header")
            header = json.loads(fh.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as e:
        raise HyloradaError(f"{path} is not a complete safetensors file ({e}); save or copy the model again") from None
    if 8 + n + end != size:
        raise HyloradaError(f"{path} is truncated or padded: {size:,} bytes, its header needs {8 + n + end:,}; "
                            "save or copy the model again")


def check_model_folder(folder: Path) -> None:
    """config.json (and tokenizer.json, compress.json) parse as JSON; every safetensors file is complete."""
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "compress.json"):
        p = folder / name
        if p.is_file():
            try:
                json.loads(p.read_bytes())
            except (ValueError, UnicodeDecodeError) as e:
                raise HyloradaError(f"{p} is not valid JSON ({e}); save or copy the model again") from None
    for p in sorted(folder.glob("*.safetensors")):
        check_safetensors(p)


def check_gguf(path: Path) -> None:
    """gguf's reader maps the whole file; a truncated one fails in numpy ("cannot reshape")."""
    from gguf import GGUFReader

    try:
        GGUFReader(path)
    except (ValueError, struct.error, OSError, KeyError, IndexError) as e:
        raise HyloradaError(f"{path} is not a complete GGUF file ({type(e).__name__}: {e}); "
                            "download or copy it again") from None


def _checked(check, path: Path, flag: str, name: str) -> None:
    try:
        check(path)
    except HyloradaError as e:
        raise HyloradaError(f"{flag} {name}: {e}") from None


def load_model_checked(name: str, dtype: str = "float32", device: str = "cpu", flag: str = "--model"):
    """`hylorada.loading.load_model` with the checks and translations of this module.

    Path-like names must exist; an alias or a path never touches the hub (HF_HUB_OFFLINE is set);
    a hub name is tried only when the hub answers a 2-second connect (else offline, from the
    local hub cache only), so an unknown name is reported at once."""
    from safetensors import SafetensorError

    from ..loading import MODEL_ALIASES, load_model

    check_dtype(dtype)
    check_device(device)
    path = Path(name).expanduser()
    hub = name not in MODEL_ALIASES and is_hub_name(name)
    if not hub:
        set_hub_offline()
        if name not in MODEL_ALIASES:
            if not path.exists():
                raise UsageError(f"{flag} {name}: no such file or folder (and not an alias: "
                                 f"{sorted(MODEL_ALIASES)}); give an alias, a model folder or a .gguf file")
            if path.is_dir():
                if not (path / "config.json").is_file():
                    raise UsageError(f"{flag} {name}: folder without config.json, not a transformers model "
                                     "folder; give a model folder, a .gguf file or an alias")
                _checked(check_model_folder, path, flag, name)
            elif path.suffix.lower() == ".gguf":
                _checked(check_gguf, path, flag, name)
            else:
                raise UsageError(f"{flag} {name}: a file that is not .gguf; give a model folder, a .gguf "
                                 f"file or an alias ({sorted(MODEL_ALIASES)})")
    elif os.environ.get("HF_HUB_OFFLINE", "") in ("", "0") and not hub_reachable():
        set_hub_offline()
    try:
        return load_model(name, dtype=dtype, device=device)
    except (ValueError, OSError, SafetensorError) as e:
        if not hub:
            raise HyloradaError(f"{flag} {name}: could not be loaded: {one_line(e)}") from e
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        where = ("the hub is unreachable (offline) and it is not in the local hub cache" if offline
                 else "the hub has no such model (or it needs a login)")
        raise UsageError(f"{flag} {name}: not an alias ({sorted(MODEL_ALIASES)}), not a file or folder, "
                         f"and {where}; give an alias, a model folder or a .gguf file") from e


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


def check_compress_targets(model, config) -> None:
    """--target matches some layer and every --override key matches a target layer (an override
    naming no layer would silently do nothing)."""
    from ..compress.api import find_target_layers
    from ..compress.ranks import match_key

    try:
        layers = find_target_layers(model, config.target_modules)
    except ValueError as e:
        raise UsageError(f"--target {' '.join(config.target_modules or [])}: {e}") from None
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


def check_tokens(n: int, need: int, flag: str, what: str) -> None:
    if n < need:
        raise UsageError(f"{flag}: {what} has {n} token(s), too few (need at least {need}); give more text")


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


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a temporary file next to `path`, fsync, then rename over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# ----------------------------------------------------------------------------- misc
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
