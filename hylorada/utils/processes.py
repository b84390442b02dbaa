"""Which process of a launched run this is (`accelerate launch`, `torchrun`), read from the
launcher's environment (WORLD_SIZE, RANK, LOCAL_RANK) without starting the process group.

A workflow run by N processes does its work on every process (the trainer splits each batch
over them: hylorada/train.py) and prints and writes on the main one only (RANK 0).
"""
from __future__ import annotations

import os


def world_size() -> int:
    """The number of processes of the run (1 when not launched)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """True on the process that prints and writes (RANK 0, or not launched)."""
    return int(os.environ.get("RANK", "0")) == 0


def process_device(device: str) -> str:
    """`device` for this process: a bare "cuda" means this process's GPU, cuda:LOCAL_RANK, when
    several processes run (as accelerate's state places them); any other device is kept."""
    if device == "cuda" and world_size() > 1:
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def say(*args, **kwargs) -> None:
    """print() on the main process only."""
    if is_main_process():
        print(*args, **kwargs)
