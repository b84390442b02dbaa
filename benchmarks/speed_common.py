"""Helpers shared by benchmarks/gpu_speed.py and its parts (train_speed.py, compress_speed.py,
decode_speed.py): model shapes, timing, memory, versions, one row type."""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from typing import Callable

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

SHAPES = {
    # TinyLlama-1.1B: hidden 2048, intermediate 5632, 22 layers, 32 heads / 4 kv heads, vocab 32000
    "tinyllama": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                      num_attention_heads=32, num_key_value_heads=4, vocab_size=32000),
    "llama7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=256),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class Row:
    """One measurement: `id` selects it (--rows), `run()` measures and returns its fields."""
    id: str
    run: Callable[[], dict]


def build_model(shape: str, device: str, dtype: torch.dtype, seq_len: int, seed: int = 0,
                layers: int | None = None):
    """A random-weight Llama of `shape` (its `layers` first decoder layers if given), built as
    `from_pretrained` returns a model: in eval mode."""
    spec = dict(SHAPES[shape])
    if layers is not None:
        spec["num_hidden_layers"] = min(layers, spec["num_hidden_layers"])
    cfg = LlamaConfig(**spec, max_position_embeddings=max(seq_len, 128), tie_word_embeddings=False)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


def random_ids(shape: str, batch: int, seq_len: int, device: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, SHAPES[shape]["vocab_size"], (batch, seq_len), generator=g).to(device)


def is_cuda(device: str) -> bool:
    return device.startswith("cuda")


def sync(device: str) -> None:
    if is_cuda(device):
        torch.cuda.synchronize()


def peak_reset(device: str) -> None:
    gc.collect()
    if is_cuda(device):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if is_cuda(device) else None


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def timed(fn, device: str, steps: int, warmup: int) -> tuple[list[float], list[float]]:
    """(wall seconds, host seconds) of `steps` calls after `warmup`: wall ends after a device
    sync, host when `fn` returns (the time the CPU needs to issue the work; close to wall when
    the step is bound by kernel launches rather than by the GPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    wall, host = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        host.append(time.perf_counter() - t0)
        sync(device)
        wall.append(time.perf_counter() - t0)
    return wall, host


def autocast(device: str):
    return torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16)


def versions(device: str) -> dict:
    """The environment record (hylorada/utils/env.py) with flat keys for the table: GPU name
    (`device`), host CPU (the DoRA family's eager step is bound by kernel launches), torch, CUDA,
    transformers, peft, commit."""
    from hylorada.utils.env import cpu_name, environment
    env = environment(device)
    v = env["versions"]
    return {**env, "device": env["device_name"], "host_cpu": cpu_name(), "cuda": torch.version.cuda,
            "torch": v["torch"], "transformers": v["transformers"], "peft": v["peft"],
            "commit": env["git_commit"]}


def fmt_row(row: dict) -> str:
    keys = ["id", "ms", "host_ms", "first_step_s", "graph_breaks", "recompiles", "alloc_retries", "peak_gib",
            "prefill_ms", "decode_ms_per_token", "tokens_per_s", "seconds", "energy_gap",
            "rel_err", "grad_rel_err", "tokens_agree", "error"]
    out = []
    for k in keys:
        if row.get(k) is not None:
            v = row[k]
            out.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
    return "  ".join(out)
