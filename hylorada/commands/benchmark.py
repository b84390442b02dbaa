"""`hylorada benchmark`: methods at matched budgets over seeds, and the size/quality frontier.

    hylorada benchmark                                  # preset quick (~5 min on 2 CPU cores), out runs/benchmark-quick
    hylorada benchmark --preset cpu-quick               # every method and plain SVD too (~15 min on 2 cores)
    hylorada benchmark --preset full --only 'adapt-*-s0' --out runs/full     # one piece of a long run
    hylorada benchmark --preset full --out runs/full --list                  # cell ids and status
    hylorada benchmark --preset full --out runs/full --report-only           # rebuild from cells/

Finished cells are stored in OUT/cells/ and never recomputed; results.json, results.md,
methods.png and frontier.png are rebuilt after every cell. docs/BENCHMARK.md has the details.
"""
from __future__ import annotations

import argparse
import shlex
import sys

from .data_args import SOURCES


def add_parser(subparsers) -> argparse.ArgumentParser:
    from ..recipes.benchmark import DEFAULT_PRESET, PRESETS

    p = subparsers.add_parser("benchmark", help="adaptation table at matched budgets + compression frontier",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(PRESETS),
                   help="run size (default: %(default)s: compress 20%% whitened, recover, LoRA and HyLoRADA, "
                        "a sample generation, ~5 min on a 2-core CPU; cpu-quick: every method, ~15 min; "
                        "full: one H100)")
    p.add_argument("--model", default=None, help="model alias, folder or .gguf (default: smollm2-135m)")
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
    p.add_argument("--out", default=None, help="output folder (default: runs/benchmark-<preset>)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: the preset's; "
                                                 "cuda presets fall back to cpu without a GPU)")
    p.add_argument("--no-peft", action="store_true", help="leave out the peft reference rows")
    p.add_argument("--window-prefix", default=None, choices=["auto", "bos", "none"],
                   help="start every window/block with BOS: auto (default; when the tokenizer adds one), "
                        "bos, none; cells record the resolved value")
    p.add_argument("--list", action="store_true", help="list the cell ids and whether each is done, then exit")
    p.add_argument("--report-only", action="store_true",
                   help="compute nothing: rebuild results.json/results.md/plots from the stored cells")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    import logging

    import torch

    from ..recipes.benchmark import PRESETS, list_cells, make_config, run_benchmark
    from .checks import check_device, check_out_dir, check_positions, load_docs
    from .flags import as_flags
    from .load import load_model_checked

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or PRESETS[args.preset].get("device", "cpu")
    if args.device:
        check_device(args.device)
    check_out_dir(args.out)
    if device.startswith("cuda") and not torch.cuda.is_available():
        print(f"note: preset {args.preset} is sized for a GPU but none is available; running on cpu "
              "(this will be slow)", file=sys.stderr)
        device = "cpu"
    with as_flags({"seeds": "--seeds", "steps": "--steps", "target_rank": "--rank",
                   "eval_max_tokens": "--eval-tokens"}):
        cfg = make_config(args.preset, model=args.model, data=args.data, seeds=args.seeds, steps=args.steps,
                          target_rank=args.target_rank, eval_max_tokens=args.eval_max_tokens, device=device,
                          peft=False if args.no_peft else None, window_prefix=args.window_prefix)
    if not args.list and not args.report_only:  # the model, its positions and the data, before any cell
        load_docs(cfg.data, "train")
        model, _ = load_model_checked(cfg.model, dtype=cfg.dtype, device="cpu")
        check_positions(model, {"seq_len (preset)": cfg.seq_len, "eval_seq_len (preset)": cfg.eval_seq_len})
        del model
    out = args.out or f"runs/benchmark-{cfg.preset}"
    if args.list:
        for cid, done in list_cells(cfg, out):
            print(f"{'done' if done else '    '}  {cid}")
        return 0
    command = "hylorada " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["benchmark"] \
        else None
    res = run_benchmark(cfg, out, only=args.only, report_only=args.report_only,
                        progress=not args.no_progress, command=command)
    print(f"\n{out}/results.md:\n")
    with open(f"{out}/results.md") as fh:
        print(fh.read())
    print(f"wrote {out}/results.md, results.json, methods.png, frontier.png")
    if res["pending"]:
        print(f"{len(res['pending'])} cell(s) pending; rerun the same command to continue.")
    return 0
