"""`hylorada benchmark`: methods at matched budgets over seeds, and the size/quality frontier.

    hylorada benchmark [--preset quick|cpu-quick|full] [--only 'adapt-*-s0'] [--out DIR] [--list | --report-only]

Finished cells are kept in OUT/cells/ and never recomputed; docs/CLI.md#benchmark, docs/BENCHMARK.md.
"""
from __future__ import annotations

import argparse
import shlex
import sys

from .data_args import SOURCES
from .flags import MODEL_HELP, add_common_flags, command_parser


def add_parser(subparsers) -> argparse.ArgumentParser:
    from ..recipes.benchmark import DEFAULT_PRESET, PRESETS

    p = command_parser(subparsers, "benchmark", "adaptation table at matched budgets + compression frontier", __doc__)
    p.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(PRESETS),
                   help="run size (default: %(default)s: compress 20%% whitened, recover, LoRA and HyLoRADA, "
                        "a sample generation, ~5 min on a 2-core CPU; cpu-quick: every method, ~15 min; "
                        "full: one H100)")
    add_common_flags(p, "model", defaults={"model": None}, helps={"model": MODEL_HELP + " (default: smollm2-135m)"})
    p.add_argument("--data", default=None, help=f"{SOURCES}; text column 'text' (default: shakespeare)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (0..N-1) per adaptation row")
    p.add_argument("--steps", type=int, default=None, help="training steps per fine-tuning (adaptation and recovery)")
    p.add_argument("--rank", type=int, default=None, dest="target_rank",
                   help="LoRA's rank that sets the matched budget (default: 8)")
    p.add_argument("--eval-tokens", type=int, default=None, dest="eval_max_tokens",
                   help="score only the first N test tokens")
    p.add_argument("--only", nargs="+", action="extend", default=None, metavar="CELL_GLOB",
                   help="run only the cells whose id matches one of these glob patterns "
                        "(e.g. 'adapt-*' 'frontier-whiten-*'); see --list")
    add_common_flags(p, "out", "device", defaults={"device": None}, helps={
        "out": "output folder (default: runs/benchmark-<preset>)",
        "device": "cpu | cuda | cuda:N (default: the preset's; cuda presets fall back to cpu without a GPU)"})
    p.add_argument("--no-peft", action="store_true", help="leave out the peft reference rows")
    p.add_argument("--window-prefix", default=None, choices=["auto", "bos", "none"],
                   help="start every window/block with BOS: auto (default; when the tokenizer adds one), "
                        "bos, none; cells record the resolved value")
    p.add_argument("--compile", default=None, choices=["auto", "yes", "no"],
                   help="torch.compile each cell's training forward (TrainConfig.compile; default auto: on CUDA)")
    p.add_argument("--list", action="store_true", help="list the cell ids and whether each is done, then exit")
    p.add_argument("--report-only", action="store_true",
                   help="compute nothing: rebuild results.json/results.md/plots from the stored cells")
    add_common_flags(p, "threads", "no_progress")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    import logging

    from ..recipes.benchmark import list_cells, run_benchmark
    from .checks import benchmark_config
    from ..utils.processes import is_main_process
    from .load import set_threads

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    set_threads(args.threads)
    cfg = benchmark_config(args)  # flags, device, --out, data and the model's positions checked
    out = args.out or f"runs/benchmark-{cfg.preset}"
    if args.list:
        for cid, done in list_cells(cfg, out):
            print(f"{'done' if done else '    '}  {cid}")
        return 0
    command = "hylorada " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["benchmark"] else None
    res = run_benchmark(cfg, out, only=args.only, report_only=args.report_only,
                        progress=not args.no_progress, command=command)
    if not is_main_process():  # launched on N processes: the main one writes and prints
        return 0
    with open(f"{out}/results.md") as fh:
        print(f"\n{out}/results.md:\n\n{fh.read()}")
    print(f"wrote {out}/results.md, results.json, methods.png, frontier.png")
    if res["pending"]:
        print(f"{len(res['pending'])} cell(s) pending; rerun the same command to continue.")
    return 0
