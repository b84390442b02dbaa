"""`load_model_checked`: hylorada.loading.load_model behind the checks of the user's model name.

Path-like names must exist and be complete (config.json and tokenizer files parse, every
safetensors file holds what its header says, a GGUF file maps); a hub name is tried only when
the hub answers. Known failures of the libraries (a truncated .gguf or safetensors file, an
unreachable hub) are translated into one line naming --model and the file.
"""
from __future__ import annotations

import json
import os
import re
import struct
import threading
import time
from pathlib import Path

from ..errors import HyloradaError, UsageError
from ..utils.processes import is_main_process, process_device
from .checks import check_device, check_dtype, check_positions, one_line


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
    device = process_device(device)  # launched on N GPUs: "cuda" is this process's own
    if not is_main_process():  # launched on N processes: one "Loading weights" bar
        import transformers

        transformers.utils.logging.disable_progress_bar()
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


def load_for_run(name: str, dtype: str, device: str, lengths: dict[str, int | None]):
    """`load_model_checked`, then every `--flag: length` checked against the model's positions
    (checks.check_positions); returns (model, tokenizer, seconds it took)."""
    t0 = time.perf_counter()
    model, tokenizer = load_model_checked(name, dtype=dtype, device=device)
    check_positions(model, lengths)
    return model, tokenizer, time.perf_counter() - t0


def set_threads(n: int | None) -> None:
    """--threads: torch's CPU threads, when given."""
    if n:
        import torch

        torch.set_num_threads(n)
