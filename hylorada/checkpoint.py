"""Training checkpoints: atomic write, find after a crash, safe read; what they restore exactly
(the RNG states of every process and the data position of the BlockSampler).

Layout of ``out_dir/checkpoint-last`` and ``out_dir/checkpoint-best``::

    adapter.safetensors   model.adapter_state_dict()
    optimizer.pt          optimizer.state_dict()        (torch.save; loaded with weights_only=True)
    rng.pt                python/numpy/torch/cuda RNG states of every process (idem)
    trainer_state.json    step, data position (epoch, index), history, config

No scheduler state: resume rebuilds the schedule from `step` and the config (hylorada/train.py;
older checkpoints hold a scheduler.pt, which is ignored).

Crash safety: a checkpoint is filled in ``.tmp-<name>``, every file and the folder are fsynced,
then it replaces ``<name>`` through ``.old-<name>`` (hylorada/utils/io.py ``replace_dir``).
Whenever the process dies, a complete checkpoint exists under ``<name>`` or, between the two
renames, under ``.old-<name>``; :func:`find_checkpoint` looks at both. Nothing from outside is
unpickled: tensors come from safetensors, the rest from ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import HyloradaError, UsageError
from .utils.io import finish_tree, replace_dir

CHECKPOINT_LAST = "checkpoint-last"
CHECKPOINT_BEST = "checkpoint-best"
STATE_FILE = "trainer_state.json"
ADAPTER_FILE = "adapter.safetensors"


# ---------------------------------------------------------------------------------- RNG states
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def rng_state() -> dict[str, Any]:
    """RNG states as tensors and plain numbers (loadable with torch.load(weights_only=True))."""
    version, py_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": int(version), "state": torch.tensor(py_state, dtype=torch.int64),
                   "gauss": gauss},
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"],
                         npy["has_gauss"], npy["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------- data position
class BlockSampler:
    """Deterministic stream of block indices: a seeded permutation per epoch.

    The position is (epoch, index): the next block is permutation(epoch)[index]. A global batch
    that runs past the end of an epoch continues with the next epoch's permutation, so every
    global batch has exactly the requested number of blocks.
    """

    def __init__(self, n_blocks: int, seed: int, shuffle: bool = True, epoch: int = 0, index: int = 0):
        if n_blocks < 1:
            raise ValueError("no training blocks")
        self.n, self.seed, self.shuffle = n_blocks, seed, shuffle
        self.epoch, self.index = epoch, index
        self._perm: tuple[int, torch.Tensor] | None = None

    def permutation(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                perm = torch.randperm(self.n, generator=g)
            else:
                perm = torch.arange(self.n)
            self._perm = (epoch, perm)
        return self._perm[1]

    def take(self, count: int) -> torch.Tensor:
        out = []
        while count > 0:
            if self.index >= self.n:
                self.epoch, self.index = self.epoch + 1, 0
            k = min(count, self.n - self.index)
            out.append(self.permutation(self.epoch)[self.index:self.index + k])
            self.index += k
            count -= k
        return torch.cat(out)


# ---------------------------------------------------------------------------------- writing
def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """model.adapter_state_dict() as contiguous CPU copies (what safetensors can write)."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.adapter_state_dict().items()}


def write_checkpoint(out_dir: str | Path, name: str, *, model: nn.Module, optimizer,
                     rng_states: list[dict], state: dict[str, Any]) -> Path:
    """Write out_dir/name atomically (module doc); ``trainer_state.json`` is written last, and a
    folder without it is never used."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    final, tmp, old = out / name, out / f".tmp-{name}", out / f".old-{name}"
    if tmp.exists():  # left by a run killed while filling it: never complete, never used
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(adapter_tensors(model), str(tmp / ADAPTER_FILE),
              metadata={"format": "pt", "step": str(state["step"])})
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save({"ranks": rng_states}, tmp / "rng.pt")
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")
    finish_tree(tmp)
    if final.exists() and old.exists():  # `final` is complete: the old copy of a crash is stale
        shutil.rmtree(old)
    replace_dir(tmp, final, old)
    if old.exists():  # a crash between the renames left it, and `final` is now complete
        shutil.rmtree(old)
    return final


# ---------------------------------------------------------------------------------- reading
def find_checkpoint(out_dir: str | Path, name: str = CHECKPOINT_LAST) -> Path | None:
    """The complete checkpoint `name` in out_dir (or its `.old-` copy after a crash mid-swap)."""
    for cand in (Path(out_dir) / name, Path(out_dir) / f".old-{name}"):
        if (cand / STATE_FILE).is_file() and (cand / ADAPTER_FILE).is_file():
            return cand
    return None


def read_checkpoint_state(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / STATE_FILE).read_text())


def refuse_overwriting_checkpoints(out_dir: str | Path) -> None:
    """UsageError when `out_dir` holds a checkpoint and the run was not asked to resume: a fresh
    run would overwrite it step by step."""
    found = [n for n in (CHECKPOINT_LAST, CHECKPOINT_BEST) if find_checkpoint(out_dir, n) is not None]
    if found:
        step = read_checkpoint_state(find_checkpoint(out_dir, found[0])).get("step")
        raise UsageError(f"out_dir {out_dir}: holds {' and '.join(found)} (step {step}) of a previous run; "
                         "resume it (--resume, TrainConfig.resume=True) or choose another output folder")


def torch_load(path: Path) -> Any:
    """torch.load of tensors, containers and plain numbers only (weights_only=True: no code runs)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def read_checkpoint_file(path: Path, reader: Callable[[Path], Any]) -> Any:
    """reader(path), with a damaged file (truncated, garbage, not our format) reported as a
    HyloradaError that names it instead of the reader's own error ("Unsupported operand 148")."""
    import pickle

    from safetensors import SafetensorError

    try:
        return reader(path)
    except (SafetensorError, pickle.UnpicklingError, RuntimeError, EOFError, ValueError, KeyError, OSError) as e:
        raise HyloradaError(f"checkpoint file {path} is damaged or not a checkpoint ({type(e).__name__}: "
                            f"{' '.join(str(e).split())[:200]}); move {path.parent} away to restart from "
                            "an older checkpoint or from step 0") from e


def load_adapter_checkpoint(model: nn.Module, path: str | Path) -> dict[str, Any]:
    """Load the adapter weights of a checkpoint dir into `model`; returns its trainer state."""
    model.load_adapter_state_dict(read_checkpoint_file(Path(path) / ADAPTER_FILE, lambda p: load_file(str(p))))
    return read_checkpoint_file(Path(path) / STATE_FILE, lambda p: json.loads(p.read_text()))


def load_training_state(path: Path, optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Load optimizer.pt into `optimizer`; returns the RNG states of rng.pt (one per process)."""
    optimizer.load_state_dict(read_checkpoint_file(path / "optimizer.pt", torch_load))
    return read_checkpoint_file(path / "rng.pt", lambda p: torch_load(p)["ranks"])
