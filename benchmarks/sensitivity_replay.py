"""The cost of allocate="sensitivity" with and without replaying the blocks below each matrix
(hylorada/compress/replay.py), on the real SmolLM2, through compress_model:

    python benchmarks/sensitivity_replay.py --target mlp.down_proj --blocks 1 --seq-len 128

Prints the allocation seconds of each run and checks that both chose the same ranks. The replay
is switched off through hylorada.compress.factorize.REPLAY_MAX_BYTES = 0 (its reference path).
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

from hylorada.compress import CompressConfig, compress_model, factorize
from hylorada.data import calibration_blocks
from hylorada.loading import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--target", default=None, help="module name piece to compress (default: every linear)")
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--blocks", type=int, default=8, help="sensitivity blocks")
    ap.add_argument("--seq-len", type=int, default=512)
    args = ap.parse_args()
    dense, tok = load_model(args.model, device=torch.device(args.device))
    calib = calibration_blocks(tok, "kjv,shakespeare", max(args.blocks, 8), args.seq_len, seed=0)
    cfg = CompressConfig(ratio=args.ratio, allocate="sensitivity", sensitivity_blocks=args.blocks,
                         target_modules=[args.target] if args.target else None)
    runs = {}
    for label, limit in (("replay", factorize.REPLAY_MAX_BYTES), ("full forward", 0)):
        factorize.REPLAY_MAX_BYTES = limit
        t = time.perf_counter()
        rep = compress_model(copy.deepcopy(dense), cfg, calibration=calib)
        runs[label] = (rep.timings["allocation_s"], [r.rank for r in rep.layers], time.perf_counter() - t)
        print(f"{label:>12}: allocation {runs[label][0]:.1f} s (compress_model {runs[label][2]:.1f} s)", flush=True)
    same = runs["replay"][1] == runs["full forward"][1]
    print(f"speed-up {runs['full forward'][0] / runs['replay'][0]:.2f}x; same ranks: {same}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")


if __name__ == "__main__":
    main()
