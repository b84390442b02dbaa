"""GPU speed and memory of hylorada against peft, eager and compiled (issues 6 and 14).

    python benchmarks/gpu_speed.py --out perf.json                        # everything, one GPU
    python benchmarks/gpu_speed.py --list-rows                            # the row ids
    python benchmarks/gpu_speed.py --out perf.json --append --rows 'train/compiled/0/*'
    python benchmarks/gpu_speed.py --shape tiny --device cpu --out /tmp/s.json --smoke   # CPU smoke

Parts (--parts, all by default) and their row ids:
  train       frozen/<mode>, train/<mode>/<dropout>/<method>   (benchmarks/train_speed.py)
  merge       merge/merge(), merge/merge_and_unload()           (benchmarks/train_speed.py)
  compress    compress/<shape>                                  (benchmarks/compress_speed.py)
  compressed  compressed/dense|svd20|svd40|svd60                (benchmarks/compress_speed.py)
  decode      decode/<mode>/<model>/b<batch>                    (benchmarks/decode_speed.py)
<mode> is eager or compiled (torch.compile(model), mode --compile-mode), <method> one of
peft-lora, peft-dora, lora, dora, hylorada, lorada. --rows keeps the rows whose id matches one
of its comma-separated shell patterns; --frozen adds frozen/* to them.

One JSON file collects the rows of several calls: with --append the rows already in --out are
kept, rows measured again replace theirs, and rows already there are skipped unless --redo
(resume). The file is rewritten atomically after every row, so a call stopped by a time limit
keeps what it finished (and marks the row it was in as unfinished); --stop-after-s stops starting new rows after that many seconds. Every
call adds its versions (GPU, host CPU, torch, CUDA, transformers, peft, commit) to `runs`, and
each row names its run; the table compares rows of the same device and versions only.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import compress_speed  # noqa: E402
import decode_speed  # noqa: E402
import train_speed  # noqa: E402
from speed_common import SHAPES, Row, fmt_row, peak_reset, versions  # noqa: E402
from table import markdown_table  # noqa: E402

PARTS = ("train", "merge", "compress", "compressed", "decode")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="tinyllama", choices=sorted(SHAPES))
    ap.add_argument("--big-shape", default="llama7b", choices=sorted(SHAPES))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--check-layers", type=int, default=2, help="layers of the fp32 check model")
    ap.add_argument("--calib-blocks", type=int, default=64)
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--modes", default="eager,compiled", help="eager and/or compiled")
    ap.add_argument("--skip-compiled", default="", help="train methods not to compile, e.g. peft-dora")
    ap.add_argument("--dropouts", default="0,0.05", help="train part: adapter dropouts (default: %(default)s)")
    ap.add_argument("--compile-mode", default="default", help="torch.compile mode of the train rows")
    ap.add_argument("--compile-backend", default="inductor")
    ap.add_argument("--compile-scope", default="model", choices=["blocks", "model"],
                    help="train rows: the whole model (the trainer's default) or regional (each decoder block once)")
    ap.add_argument("--decode-compile-mode", default="reduce-overhead", help="decode: CompileConfig mode")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--decode-batches", default="1,8")
    ap.add_argument("--decode-reps", type=int, default=3)
    ap.add_argument("--rows", default="*", help="comma-separated patterns of row ids (see --list-rows)")
    ap.add_argument("--frozen", action="store_true", help="add the frozen-forward rows (frozen/*) to --rows")
    ap.add_argument("--list-rows", action="store_true")
    ap.add_argument("--table", action="store_true", help="print the tables of --out and exit")
    ap.add_argument("--out", default="perf.json")
    ap.add_argument("--append", action="store_true", help="merge into an existing --out (resume)")
    ap.add_argument("--redo", action="store_true", help="with --append: measure rows already in --out again")
    ap.add_argument("--stop-after-s", type=float, default=None, help="start no new row after this many seconds")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes for a CPU run of every code path")
    args = ap.parse_args(argv)
    if args.smoke:
        args.__dict__.update(shape="tiny", big_shape="tiny", batch=2, seq_len=32, rank=4, steps=2,
                             warmup=1, calib_blocks=4, prompt_len=16, new_tokens=8, decode_batches="1,2",
                             decode_reps=3, compile_backend="aot_eager", decode_compile_mode="default")
    check_args(args)
    return args


def check_args(args) -> None:
    def fail(flag, value, allowed):
        raise SystemExit(f"gpu_speed.py: {flag}={value!r} is invalid: allowed {allowed}")
    parts = args.parts.split(",")
    if not parts or set(parts) - set(PARTS):
        fail("--parts", args.parts, f"a comma-separated subset of {list(PARTS)}")
    if set(args.modes.split(",")) - {"eager", "compiled"}:
        fail("--modes", args.modes, "eager, compiled or eager,compiled")
    for flag in ("batch", "seq_len", "rank", "steps", "check_layers", "prompt_len", "decode_reps"):
        if getattr(args, flag) < 1:
            fail("--" + flag.replace("_", "-"), getattr(args, flag), "an integer >= 1")
    if args.new_tokens < 2:
        fail("--new-tokens", args.new_tokens, "an integer >= 2 (decode time is t(N) - t(1))")
    try:
        [float(d) for d in args.dropouts.split(",")] + [int(b) for b in args.decode_batches.split(",")]
    except ValueError:
        fail("--dropouts/--decode-batches", f"{args.dropouts} / {args.decode_batches}", "comma-separated numbers")
    if args.table and not Path(args.out).is_file():
        fail("--out", args.out, "an existing gpu_speed JSON with --table")
    if Path(args.out).exists() and not (args.append or args.list_rows or args.table):
        fail("--out", args.out, "a new file, or --append to merge into this one")


def all_rows(args) -> list[Row]:
    parts, device = set(args.parts.split(",")), args.device
    rows = train_speed.rows(args, device) if "train" in parts else []
    rows += train_speed.merge_rows(args, device) if "merge" in parts else []
    rows += compress_speed.rows(args, device, parts)
    rows += decode_speed.rows(args, device) if "decode" in parts else []
    return rows


def select(rows: list[Row], patterns: str, frozen: bool) -> list[Row]:
    pats = [p.strip() for p in patterns.split(",") if p.strip()] + (["frozen/*"] if frozen else [])
    if frozen and patterns == "*":
        pats = ["frozen/*"]
    return [r for r in rows if any(fnmatch.fnmatchcase(r.id, p) for p in pats)]


class Store:
    """The JSON of all runs and rows; rewritten atomically (temp file + rename) on every put."""

    def __init__(self, path: str, append: bool, info: dict) -> None:
        self.path = Path(path)
        data = json.loads(self.path.read_text()) if append and self.path.exists() else {"runs": [], "rows": []}
        if not isinstance(data, dict) or not {"runs", "rows"} <= set(data):
            raise SystemExit(f"gpu_speed.py: --out={path!r} is not a gpu_speed JSON (no 'runs'/'rows'); "
                             "allowed: a file this script wrote, or a new path")
        self.data = data
        self.run = len(data["runs"])
        data["runs"].append(info)

    def done(self, row_id: str) -> bool:
        return any(r.get("id") == row_id and "error" not in r for r in self.data["rows"])

    def put(self, row: dict) -> None:
        rows = [r for r in self.data["rows"] if r.get("id") != row["id"]]
        self.data["rows"] = rows + [row]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.data, indent=2))
        os.replace(tmp, self.path)


def measure(row: Row, run_index: int, device: str) -> dict:
    """One row; a failure (out of memory, a compiler error) is recorded in the row, not raised."""
    t0 = time.perf_counter()
    try:
        out = row.run()
    except Exception as e:  # noqa: BLE001 - the next rows still run; the error is in the JSON
        out = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
        torch._dynamo.reset()
    peak_reset(device)
    return {"id": row.id, "run": run_index, **out, "row_s": time.perf_counter() - t0}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.table:
        print(markdown_table(json.loads(Path(args.out).read_text())))
        return 0
    rows = select(all_rows(args), args.rows, args.frozen)
    if args.list_rows:
        print("\n".join(r.id for r in rows))
        return 0
    if not rows:
        raise SystemExit(f"gpu_speed.py: --rows={args.rows!r} matches no row; see --list-rows")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    info = {**versions(args.device), "args": vars(args)}
    print(json.dumps(info), flush=True)
    store = Store(args.out, args.append, info)
    start = time.perf_counter()
    for row in rows:
        if args.append and not args.redo and store.done(row.id):
            print(f"{row.id}: already in {args.out}, skipped (--redo measures it again)", flush=True)
            continue
        if args.stop_after_s is not None and time.perf_counter() - start > args.stop_after_s:
            print(f"--stop-after-s {args.stop_after_s:g} reached; not started: {row.id} and later rows", flush=True)
            break
        store.put({"id": row.id, "run": store.run,  # replaced when the row finishes
                   "error": f"started {time.strftime('%H:%M:%S')}, did not finish (the call was stopped)"})
        result = measure(row, store.run, args.device)
        store.put(result)
        print(fmt_row(result), flush=True)
    print(markdown_table(store.data))
    failed = [r["id"] for r in store.data["rows"] if r.get("run") == store.run and "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
