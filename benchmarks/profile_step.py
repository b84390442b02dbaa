"""Profile one training step of a method on the TinyLlama shape (torch.profiler, CUDA time).

    python benchmarks/profile_step.py --methods lora,dora,hylorada [--dropout 0.05]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from speed_common import SHAPES, build_model  # noqa: E402
from train_speed import ours_config, train_step_fn  # noqa: E402

from hylorada import HyLoRADAModel  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", default="lora,dora,hylorada")
    ap.add_argument("--shape", default="tinyllama")
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--rows", type=int, default=25)
    args = ap.parse_args()
    device = "cuda"
    base = build_model(args.shape, device, torch.bfloat16, args.seq_len).requires_grad_(False)
    ids = torch.randint(0, SHAPES[args.shape]["vocab_size"], (args.batch, args.seq_len), device=device)
    for method in args.methods.split(","):
        model = HyLoRADAModel(base, ours_config(method, 16, args.dropout)).train()
        step = train_step_fn(model, model.parameter_groups(1e-5), ids, device)
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        print(f"===== {method} (dropout {args.dropout})")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=70))
        model.unload()
    return 0


if __name__ == "__main__":
    sys.exit(main())
