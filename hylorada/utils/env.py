"""The one environment record a result file carries: package versions, device, git commit, date.

`environment(device)` is written by the benchmark (results.json and every cell), `hylorada eval
--json-out`, `hylorada compress` (compress.json), `hylorada finetune` (its versions) and the
scripts in benchmarks/. Everything but the date is computed once per process and device.
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

PACKAGES = ("torch", "transformers", "accelerate", "peft", "optuna", "safetensors", "numpy")

_CACHE: dict[str, dict[str, Any]] = {}


def now() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def environment(device: str | torch.device = "cpu") -> dict[str, Any]:
    """{versions, device, device_name, cpu_count, torch_threads, platform, git_commit, git_dirty,
    date}: device_name is the GPU's name for a CUDA device, else the CPU's (`cpu_name`)."""
    key = str(device)
    if key not in _CACHE:
        _CACHE[key] = _environment(key)
    return {**_CACHE[key], "date": now()}


def versions() -> dict[str, str | None]:
    """python, the packages in PACKAGES and hylorada (None where one is not installed)."""
    out = {"python": platform.python_version()}
    for mod in PACKAGES:
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - optional packages
            out[mod] = None
    try:
        from importlib.metadata import version

        out["hylorada"] = version("hylorada")
    except Exception:  # noqa: BLE001 - running from a checkout that is not installed
        out["hylorada"] = None
    return out


def _environment(device: str) -> dict[str, Any]:
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        name = torch.cuda.get_device_name(dev)
    else:
        name = cpu_name()
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    commit = _git("rev-parse", "HEAD") or os.environ.get("HYLORADA_GIT_COMMIT")  # a copy without .git
    return {"versions": versions(), "device": str(dev), "device_name": name, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
            "git_commit": commit, "git_dirty": None if dirty is None else bool(dirty), "date": now()}


def _git(*args: str) -> str | None:
    """`git args` in the checkout that holds this package (None outside one or without git)."""
    root = Path(__file__).resolve().parents[2]
    try:
        res = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def cpu_name() -> str:
    """"CPU: <model name> (<n> cores)" from /proc/cpuinfo, else from the platform module."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU: {line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"CPU: {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"
