"""Issue 16: one process against two, through hylorada's own trainer (hylorada/train.py, DDP by
accelerate). Launch it once per process count, then compare the two JSON files:

    python benchmarks/dist_speed.py --out dist-1.json
    NCCL_NVLS_ENABLE=0 accelerate launch --config_file docs/accelerate/ddp.yaml benchmarks/dist_speed.py --out dist-2.json
    python benchmarks/dist_speed.py --compare dist-1.json dist-2.json

Two parts (--parts):
- curve: `--curve-steps` optimizer steps on a GLOBAL batch of `--curve-batch` blocks of
  `--seq-len` (the same for any number of processes: the trainer splits each micro-batch over
  the processes), bf16 autocast (`--precision`), dropout 0 (each process draws its own masks),
  not compiled, seed fixed. --compare prints the largest relative difference of the per-step
  losses (issue 16's criterion: <= 1e-3 over 50 steps in bf16).
- speed: `--batch` blocks of `--seq-len` PER PROCESS (global batch = batch x processes),
  `--warmup` + `--steps` steps, compiled (`--compile`); tokens/s is the trainer's per-step
  figure (all processes' tokens / step wall time), median over the timed steps; the peak
  allocated CUDA memory of every process (None on CPU). --compare prints the speed-up
  (issue 16: >= 1.85x on 2 GPUs).

Model: a random-weight Llama of `--shape` (benchmarks/speed_common.py: tinyllama = TinyLlama-1.1B,
llama7b, tiny), weights in `--dtype`, adapters `--method` r=`--rank` alpha=2r on the seven
projections. Data: random blocks, each a random 8-token pattern repeated (learnable by copying;
on random TinyLlama weights at lr 1e-4 the 50-step curve moves by about 1%: docs/DISTRIBUTED.md).
`--compile-scope blocks` (default) compiles each decoder block inside the DDP wrapper. CPU smoke (2 gloo processes):
    torchrun --standalone --nproc_per_node 2 benchmarks/dist_speed.py --shape tiny --device cpu --smoke --out s.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from speed_common import SHAPES, TARGETS, build_model, versions  # noqa: E402

from hylorada import HyLoRADAConfig, HyLoRADAModel  # noqa: E402
from hylorada.train import TrainConfig, train  # noqa: E402
from hylorada.utils.io import atomic_write_text  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="tinyllama", choices=sorted(SHAPES))
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="base weights")
    ap.add_argument("--method", default="hylorada")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8, help="speed: blocks per process per step")
    ap.add_argument("--steps", type=int, default=20, help="speed: timed steps")
    ap.add_argument("--warmup", type=int, default=5, help="speed: untimed first steps (compilation)")
    ap.add_argument("--compile", default="yes", choices=["yes", "no"], help="speed part")
    ap.add_argument("--compile-scope", default="blocks", choices=["blocks", "model"],
                    help="speed part: hylorada/nn/compile.py; 'model' compiles HyLoRADA for ~200 s on an H100")
    ap.add_argument("--curve-steps", type=int, default=50)
    ap.add_argument("--curve-batch", type=int, default=8, help="curve: GLOBAL blocks per step")
    ap.add_argument("--precision", default="bf16", choices=["bf16", "no"], help="autocast of both parts")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--parts", default="curve,speed")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: seq 32, batch 2, 3+2 steps, curve 4x4, not compiled")
    ap.add_argument("--out", default="dist.json")
    ap.add_argument("--compare", nargs=2, metavar=("ONE.json", "TWO.json"), help="print the comparison and exit")
    args = ap.parse_args(argv)
    if args.smoke:
        args.seq_len, args.batch, args.steps, args.warmup, args.curve_steps, args.curve_batch = 32, 2, 2, 3, 4, 4
        args.compile = "no"
    return args


def pattern_blocks(n: int, seq_len: int, vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    pat = torch.randint(3, vocab, (n, 8), generator=g)
    ids = pat.repeat(1, -(-seq_len // 8))[:, :seq_len].contiguous()
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def run_part(args, accelerator, part: str) -> dict:
    world = accelerator.num_processes
    curve = part == "curve"
    batch = args.curve_batch if curve else args.batch * world
    steps = args.curve_steps if curve else args.warmup + args.steps
    base = build_model(args.shape, "cpu", getattr(torch, args.dtype), args.seq_len)
    torch.manual_seed(0)
    model = HyLoRADAModel(base, HyLoRADAConfig(method=args.method, lora_rank=args.rank, lora_alpha=2.0 * args.rank,
                                               lora_dropout=0.0, target_modules=TARGETS))
    blocks = pattern_blocks(batch * steps, args.seq_len, SHAPES[args.shape]["vocab_size"])
    config = TrainConfig(steps=steps, batch_size=batch, lr=args.lr, warmup_steps=0, mixed_precision=args.precision,
                         compile="no" if curve else args.compile,
                         compile_scope=args.compile_scope, log_every=0, progress=False, seed=0)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    result = train(model, blocks, None, config, accelerator=accelerator)
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None
    peaks = [peak] * world
    if world > 1:
        torch.distributed.all_gather_object(peaks, peak)
    row = {"global_batch": batch, "seq_len": args.seq_len, "steps": steps, "compiled": result.compiled,
           "mixed_precision": result.mixed_precision, "peak_gib_per_process": peaks}
    if curve:
        return {**row, "losses": result.losses}
    timed = result.tokens_per_s[args.warmup:]
    return {**row, "batch_per_process": args.batch, "tokens_per_s": timed, "tokens_per_s_median": statistics.median(timed),
            "first_step_s": batch * args.seq_len / result.tokens_per_s[0]}


def compare(path_one: str, path_two: str) -> None:
    one, two = (json.loads(Path(p).read_text()) for p in (path_one, path_two))
    print(f"processes: {one['world_size']} vs {two['world_size']}; shape {one['args']['shape']}")
    if "curve" in one and "curve" in two:
        a, b = one["curve"]["losses"], two["curve"]["losses"]
        rel = max(abs(x - y) / abs(x) for x, y in zip(a, b))
        print(f"curve: {len(a)} steps, max relative loss difference {rel:.2e} (first {a[0]:.4f} / {b[0]:.4f}, "
              f"last {a[-1]:.4f} / {b[-1]:.4f})")
    if "speed" in one and "speed" in two:
        s1, s2 = one["speed"]["tokens_per_s_median"], two["speed"]["tokens_per_s_median"]
        print(f"speed: {s1:,.0f} vs {s2:,.0f} tokens/s = {s2 / s1:.3f}x; peak GiB per process "
              f"{one['speed']['peak_gib_per_process']} vs {two['speed']['peak_gib_per_process']}")


def main(argv=None) -> int:
    from accelerate import Accelerator

    args = parse_args(argv)
    if args.compare:
        compare(*args.compare)
        return 0
    accelerator = Accelerator(cpu=args.device == "cpu", mixed_precision="no")
    record = {"world_size": accelerator.num_processes, "args": vars(args),
              "distributed_type": str(accelerator.distributed_type)}
    for part in args.parts.split(","):
        t0 = time.perf_counter()
        record[part] = run_part(args, accelerator, part)
        record[part]["wall_s"] = round(time.perf_counter() - t0, 1)
        if accelerator.is_main_process:  # written after every part: a later part may time out
            print(part, json.dumps({k: v for k, v in record[part].items() if k not in ("losses", "tokens_per_s")}),
                  flush=True)
            record["versions"] = versions(str(accelerator.device))
            atomic_write_text(args.out, json.dumps(record, indent=1, default=str) + "\n")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
