"""Compression results for the real SmolLM2: writes docs/RESULTS.md (and a JSON next to it).

    python benchmarks/compress_results.py --device cuda                       # the full table
    python benchmarks/compress_results.py --device cpu --max-eval-tokens 2048 \\
        --recover-steps 0 --calib-blocks 4 --ratios 0.2 --out .dev/RESULTS.md   # a CPU smoke
    python benchmarks/compress_results.py --ablation --device cuda --seeds 0 1 2 \\
        --out docs/ABLATION.md                                 # issue 15's ablation (GPU)
    python benchmarks/compress_results.py --ablation --device cpu --quick --out .dev/A.md  # smoke

--ablation: at each ratio, rows = the SVD-LLM baseline (uniform ranks), each option of issue 15 alone
(--allocate loss / sensitivity, --calibrate sequential, --update lstsq, --recover-loss kd) and
all together; every row is recovered (same steps and tokens) once per --seeds. The JSON is
rewritten after every row; --resume skips the (ratio, row) pairs it already holds, so the run
can be split (e.g. --ratios 0.2 then --ratios 0.4, same --out) under a time limit.

For each ratio (fraction of the target linears' parameters removed, SVD-LLM convention) and
each method (plain truncated SVD, whitened SVD-LLM style): test perplexity on every --eval
corpus before and after a short recovery (HyLoRADA adapters on the up/down factors, trained
on the --recover-data train splits, merged back: ranks unchanged), model size in MiB and
forward tokens/s against the dense model. Whitening is calibrated once on a mix of the
--calib corpora's train blocks and reused for every ratio.
"""
from __future__ import annotations

import argparse
import copy
import json
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from hylorada import evaluate
from hylorada.recipes.compress import evaluate_corpora, recovery_blocks
from hylorada.utils.env import environment
from hylorada.compress import CompressConfig, compress_model
from hylorada.compress.api import find_target_layers
from hylorada.recipes.compress import recover_compressed
from hylorada.compress.curvature import collect_output_grams
from hylorada.compress.whiten import collect_grams
from hylorada.data import calibration_blocks
from hylorada.loading import load_model
from hylorada.utils.io import atomic_write_text

ABLATION_ROWS = ("baseline", "allocate=loss", "allocate=sensitivity", "calibrate=sequential",
                 "update=lstsq", "recover_loss=kd", "all")

DESIGN_REFERENCE = """Reference (the original project's design notes, an earlier H100 run: held-out = last 10% of each
text, whitening calibrated on 64 x 512 KJV tokens only, recovery with peft LoRA r=8, 200 steps
of 16 x 256 KJV tokens): dense KJV 28.1 / Shakespeare 38.3; 20%: plain SVD 2.5e7 / 1.6e7,
whitened 79.4 / 501, recovered 40.1 / 262; 40%: whitened 162 / 1697, recovered 57.3 / 386.
Splits differ from ours (by book/play here), so compare the shape, not the digits."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", help="weights dtype (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--ratios", default="0.2,0.4", help="compression ratios (default: %(default)s)")
    p.add_argument("--methods", default="svd,whiten", help="(default: %(default)s)")
    p.add_argument("--calib", default="kjv,shakespeare", help="calibration corpora mix (default: %(default)s)")
    p.add_argument("--calib-blocks", type=int, default=64)
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--calib-batch-size", type=int, default=8)
    p.add_argument("--solver", default="full", choices=["full", "randomized", "gram"])
    p.add_argument("--allocate", default="auto", choices=["auto", "uniform", "loss", "sensitivity"],
                   help="CompressConfig.allocate of the whiten rows (default: %(default)s, the library's: "
                        "sensitivity on CUDA); plain SVD rows stay uniform")
    p.add_argument("--eval", default="kjv,shakespeare")
    p.add_argument("--eval-seq-len", type=int, default=512)
    p.add_argument("--max-eval-tokens", type=int, default=51200, help="first N test tokens (0: all)")
    p.add_argument("--eval-batch-size", type=int, default=8)
    p.add_argument("--recover-steps", type=int, default=200, help="0: no recovery")
    p.add_argument("--recover-method", default="hylorada", choices=["lora", "dora", "hylorada", "lorada"])
    p.add_argument("--recover-data", default="kjv,shakespeare")
    p.add_argument("--recover-rank", type=int, default=8)
    p.add_argument("--recover-lr", type=float, default=2e-4)
    p.add_argument("--recover-batch-size", type=int, default=16)
    p.add_argument("--recover-seq-len", type=int, default=256)
    p.add_argument("--recover-schedule", default="sequential", choices=["sequential", "joint"])
    p.add_argument("--recover-methods", default="whiten",
                   help="compression methods that get a recovery run (default: %(default)s; 'all')")
    p.add_argument("--throughput-devices", default=None,
                   help="devices for forward tokens/s, comma-separated (default: --device, and cpu too "
                        "when --device is not cpu)")
    p.add_argument("--throughput-seq-len", type=int, default=512)
    p.add_argument("--throughput-batch-size", type=int, default=1)
    p.add_argument("--throughput-batches", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="docs/RESULTS.md")
    p.add_argument("--progress", action="store_true")
    g = p.add_argument_group("ablation (issue 15)")
    g.add_argument("--ablation", action="store_true", help="run the ablation table instead")
    g.add_argument("--quick", action="store_true",
                   help="tiny settings (layer 0's attention only, ratio 0.4, 2 x 32 calibration tokens, "
                        "128 test tokens per text, 2 recovery steps of 2 x 32)")
    g.add_argument("--seeds", type=int, nargs="+", default=None, help="recovery seeds (default: 0 1 2; quick: 0)")
    g.add_argument("--rows", default=",".join(ABLATION_ROWS), help="rows to run (default: all)")
    g.add_argument("--all-allocate", default="sensitivity", choices=["loss", "sensitivity"],
                   help="allocation used by the 'all' row (default: %(default)s)")
    g.add_argument("--kd-temperature", type=float, default=1.0)
    g.add_argument("--sensitivity-blocks", type=int, default=8)
    g.add_argument("--targets", default=None, help="module name pieces to compress, comma-separated")
    g.add_argument("--resume", action="store_true",
                   help="keep the rows (and seeds) already in the output JSON; run only what is missing")
    g.add_argument("--jobs", type=int, default=1,
                   help="run the (ratio, row) cells in this many processes at once on one device (recovery "
                        "is host-bound: one process leaves the GPU mostly idle); each child writes its "
                        "own JSON after every seed and the parent merges them (default: %(default)s)")
    g.add_argument("--render-only", action="store_true",
                   help="write --out's markdown from its JSON (e.g. merged from several runs) and exit")
    g.add_argument("--recover-compile", default="auto", choices=["auto", "yes", "no"],
                   help="TrainConfig.compile of the recoveries (default: %(default)s = on with CUDA)")
    g.add_argument("--tf32", action="store_true",
                   help="TF32 matmuls for fp32 weights on CUDA (torch.set_float32_matmul_precision('high')); "
                        "recorded in the JSON")
    args = p.parse_args(argv)
    if args.quick:
        args.calib_blocks, args.calib_seq_len, args.calib_batch_size = 2, 32, 2
        args.max_eval_tokens, args.eval_seq_len, args.eval_batch_size = 128, 128, 1
        args.recover_steps, args.recover_batch_size, args.recover_seq_len = 2, 2, 32
        args.sensitivity_blocks = 1
        args.targets = args.targets or "model.layers.0.self_attn"
        if args.ratios == "0.2,0.4":
            args.ratios = "0.4"
    if args.seeds is None:
        args.seeds = [0] if args.quick else [0, 1, 2]
    return args


def fmt_ppl(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.3g}" if x >= 1e4 else f"{x:.2f}"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tf32:
        torch.set_float32_matmul_precision("high")
    if args.ablation and args.render_only:
        out = Path(args.out)
        md = render_ablation(json.loads(out.with_suffix(".json").read_text()),
                             [c for c in args.eval.split(",") if c])
        atomic_write_text(out, md)
        print(md)
        return 0
    if args.ablation and args.jobs > 1:
        return run_ablation_jobs(args)
    if args.ablation:
        return run_ablation(args)
    t_start = time.perf_counter()
    ratios = [float(r) for r in args.ratios.split(",") if r]
    methods = [m for m in args.methods.split(",") if m]
    corpora = [c for c in args.eval.split(",") if c]
    recover_for = methods if args.recover_methods == "all" else args.recover_methods.split(",")
    max_eval = args.max_eval_tokens or None
    device = torch.device(args.device)

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", flush=True)

    dense, tokenizer = load_model(args.model, dtype=args.dtype, device=device)

    tp_devices = [d for d in (args.throughput_devices or
                              (args.device if device.type == "cpu" else f"{args.device},cpu")).split(",") if d]
    args.throughput_devices = ",".join(tp_devices)

    def throughput(model) -> dict[str, float]:
        out = {}
        for dev in tp_devices:
            model.to(dev)
            r = evaluate.throughput(model, seq_len=args.throughput_seq_len, batch_size=args.throughput_batch_size,
                                    n_batches=args.throughput_batches, device=dev)
            out[dev] = r.tokens_per_s
        model.to(device)
        return out

    def ppl(model) -> dict[str, float]:
        res = evaluate_corpora(model, tokenizer, corpora, args.eval_seq_len, max_eval, args.eval_batch_size,
                               args.progress)
        return {k: v["ppl"] for k, v in res.items()}

    rows = []
    log("dense: perplexity, size, throughput")
    size = evaluate.model_size(dense)
    dense_row = {"ratio": 0.0, "method": "dense", "ppl": ppl(dense), "ppl_recovered": None,
                 "mb": size.n_bytes / 2**20, "params": size.n_params, "target_removed": 0.0,
                 "model_removed": 0.0, "tokens_per_s": throughput(dense)}
    rows.append(dense_row)
    log(f"dense {dense_row['ppl']} {dense_row['tokens_per_s']} tok/s")

    grams = calib = None
    if "whiten" in methods:
        calib = calibration_blocks(tokenizer, args.calib, args.calib_blocks, args.calib_seq_len, seed=args.seed)
        t = time.perf_counter()
        grams = collect_grams(dense, find_target_layers(dense), calib, batch_size=args.calib_batch_size,
                              progress=args.progress)
        log(f"calibration: {calib.shape[0]} x {calib.shape[1]} tokens in {time.perf_counter() - t:.1f} s")
    blocks = recovery_blocks(tokenizer, args.recover_data, args.recover_seq_len) if args.recover_steps else None

    for ratio in ratios:
        for method in methods:
            model = copy.deepcopy(dense)  # the dense model itself is never modified
            t = time.perf_counter()
            whiten = method == "whiten"
            cfg = CompressConfig(method=method, ratio=ratio, svd_solver=args.solver, seed=args.seed,
                                 allocate=args.allocate if whiten else "uniform",
                                 sensitivity_blocks=args.sensitivity_blocks)
            report = compress_model(model, cfg, calibration=calib if whiten else None,
                                    grams=grams if whiten else None)
            compress_s = time.perf_counter() - t
            size = evaluate.model_size(model)
            row = {"ratio": ratio, "method": method, "ppl": ppl(model), "ppl_recovered": None,
                   "mb": size.n_bytes / 2**20, "params": size.n_params,
                   "target_removed": report.target_ratio, "model_removed": report.model_ratio,
                   "allocate": report.config["allocate"], "n_dense": report.n_dense, "compress_s": compress_s, "tokens_per_s": throughput(model)}
            log(f"{method} {ratio:.0%}: {row['ppl']} ({compress_s:.1f} s), {row['mb']:.1f} MiB, "
                f"{row['tokens_per_s']} tok/s")
            if args.recover_steps and method in recover_for:
                t = time.perf_counter()
                rec = recover_compressed(
                    model, blocks, method=args.recover_method, steps=args.recover_steps,
                    lora_rank=args.recover_rank, schedule=args.recover_schedule,
                    train_config={"batch_size": args.recover_batch_size, "lr": args.recover_lr,
                                  "progress": args.progress, "seed": args.seed})
                row["ppl_recovered"] = ppl(model)
                row["recover_s"] = time.perf_counter() - t
                row["recover_mb"] = rec["bytes_after"] / 2**20
                log(f"  recovered: {row['ppl_recovered']} ({row['recover_s']:.1f} s)")
            rows.append(row)
            del model

    md = render(args, rows, corpora, time.perf_counter() - t_start)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(md)
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "env": environment(args.device), "rows": rows},
                                                   indent=2, default=str))
    print(md)
    log(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


def _allocations(rows) -> str:
    """The allocations the whiten rows resolved to ("uniform" for runs that did not record it)."""
    return "/".join(sorted({r.get("allocate", "uniform") for r in rows if r["method"] == "whiten"})) or "uniform"


def render(args, rows, corpora, seconds: float) -> str:
    env = environment(args.device)
    v = env["versions"]
    cmd = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    dense = rows[0]
    rec = args.recover_steps > 0
    lines = [
        "# Compression results: SmolLM2-135M",
        "",
        f"Generated by `{cmd}`  ",
        f"device {args.device} ({env['device_name']}), {env['date']}, torch {v['torch']}, "
        f"transformers {v['transformers']}, hylorada {v['hylorada']}, python {v['python']}, "
        f"{env['torch_threads']} threads; {seconds / 60:.1f} min in all.",
        "",
        "Setup: every Linear of the 30 decoder layers (q, k, v, o, gate, up, down) is factorised; "
        "embeddings / lm_head stay dense. `ratio` = fraction of those layers' parameters removed "
        "(SVD-LLM: k = floor((1-ratio)·m·n/(m+n)) per matrix; the whiten rows spend the same "
        f"parameters with allocate={_allocations(rows)}, hylorada/compress/allocate.py). "
        f"Whitening: {args.calib_blocks} x {args.calib_seq_len} train tokens of {args.calib}, "
        f"fp64 Gram, Cholesky, {args.solver} SVD. "
        f"Perplexity: test split (whole books/plays), \"\\n\\n\"-joined, non-overlapping "
        f"{args.eval_seq_len}-token windows, first {args.max_eval_tokens or 'all'} tokens per corpus.",
    ]
    if rec:
        lines.append(
            f"Recovery: {args.recover_method} adapters r={args.recover_rank} on the up/down factors "
            f"({args.recover_schedule}), {args.recover_steps} steps of {args.recover_batch_size} x "
            f"{args.recover_seq_len} tokens of {args.recover_data} (train splits), lr {args.recover_lr}, "
            "merged back into the factors (ranks and size unchanged).")
    devs = args.throughput_devices.split(",")
    lines.append(f"Throughput: forward tokens/s on {', '.join(devs)}, batch {args.throughput_batch_size} x "
                 f"{args.throughput_seq_len}, {args.dtype} weights, no_grad, {args.throughput_batches} batches "
                 "after one warm-up.")
    head = "| ratio | method | " + " | ".join(f"{c} ppl" for c in corpora)
    if rec:
        head += " | " + " | ".join(f"{c} recovered" for c in corpora)
    head += " | linears removed | model removed | size MiB | " + " | ".join(
        f"tokens/s {d} | vs dense" for d in devs) + " |"
    n_cols = head.count("|") - 1
    lines += ["", head, "|" + "---|" * n_cols]
    for r in rows:
        cells = [f"{r['ratio']:.0%}" if r["method"] != "dense" else "0%", r["method"]]
        cells += [fmt_ppl(r["ppl"].get(c)) for c in corpora]
        if rec:
            cells += [fmt_ppl((r["ppl_recovered"] or {}).get(c)) for c in corpora]
        cells += [f"{100 * r['target_removed']:.1f}%", f"{100 * r['model_removed']:.1f}%", f"{r['mb']:.1f}"]
        for d in devs:
            cells += [f"{r['tokens_per_s'][d]:.0f}", f"{r['tokens_per_s'][d] / dense['tokens_per_s'][d]:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", DESIGN_REFERENCE, ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# ablation (issue 15)
# --------------------------------------------------------------------------------------------
def row_settings(row: str, args) -> tuple[dict, str]:
    """(CompressConfig options, recovery loss) of an ablation row: "baseline" (SVD-LLM: uniform
    ranks, dense calibration, no update, LM-loss recovery), "all", or key=value pairs joined by
    "&" (keys: method, allocate, calibrate, update, recover_loss) changing the baseline, e.g.
    "allocate=sensitivity&calibrate=sequential". ("default" is read as "baseline": the rows of
    runs made before allocate="auto" became the library default.)"""
    base = {"allocate": "uniform"}
    if row == "all":
        return {"allocate": args.all_allocate, "calibrate": "sequential", "update": "lstsq"}, "kd"
    if row in ("baseline", "default"):
        return base, "lm"
    options, loss = dict(base), "lm"
    for part in row.split("&"):
        key, _, value = part.partition("=")
        if key == "recover_loss":
            loss = value
        else:
            options[key] = value
    return options, loss


def _write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def ablation_row(args, dense, tokenizer, calib, blocks, ratio: float, row: str, ppl, log,
                 have: dict | None = None, saved=lambda out: None) -> dict:
    """Compress a copy of `dense` with the row's options, evaluate, recover once per seed that
    `have` (the row as already saved) lacks; `saved(out)` is called after every seed."""
    options, loss = row_settings(row, args)
    targets = args.targets.split(",") if args.targets else None
    cfg = CompressConfig(**{"method": "whiten", "ratio": ratio, "svd_solver": args.solver, "seed": args.seed,
                            "target_modules": targets, "calib_batch_size": args.calib_batch_size,
                            "sensitivity_blocks": args.sensitivity_blocks, "recover_loss": loss,
                            "kd_temperature": args.kd_temperature, **options})
    model = copy.deepcopy(dense)
    t = time.perf_counter()
    report = compress_model(model, cfg, calibration=calib, progress=args.progress,
                            output_grams=_output_grams(dense, cfg, calib))
    out = {"ratio": ratio, "row": row, "options": {**options, "recover_loss": loss},
           "compress_s": time.perf_counter() - t, "timings": report.timings,
           "target_removed": report.target_ratio, "model_removed": report.model_ratio,
           "ranks": {r.name: r.rank for r in report.layers}, "ppl": ppl(model),
           "recovery": list((have or {}).get("recovery", []))}
    log(f"{row} {ratio:.0%}: {out['ppl']} ({out['compress_s']:.1f} s {report.timings})")
    saved(out)
    done = {x["seed"] for x in out["recovery"]}
    for seed in [s for s in args.seeds if s not in done] if args.recover_steps else []:
        student = copy.deepcopy(model)
        t = time.perf_counter()
        summary = recover_compressed(
            student, blocks, method=args.recover_method, steps=args.recover_steps,
            lora_rank=args.recover_rank, schedule=args.recover_schedule, loss=loss,
            kd_temperature=args.kd_temperature, teacher=dense if loss != "lm" else None,
            train_config={"batch_size": args.recover_batch_size, "lr": args.recover_lr,
                          "progress": args.progress, "seed": seed, "compile": args.recover_compile})
        rec = {"seed": seed, "recover_s": time.perf_counter() - t, "ppl": ppl(student),
               "phase_train_s": [p.get("train_time_s") for p in summary["phases"]]}
        out["recovery"].append(rec)
        log(f"  seed {seed}: recovered {rec['ppl']} ({rec['recover_s']:.1f} s)")
        saved(out)
        del student
    return out


_OUTPUT_GRAMS: dict = {}


def _output_grams(dense, cfg: CompressConfig, calib) -> dict | None:
    """method="fisher": the dense model's output-gradient Grams, collected once per process and
    reused by every fisher row (they do not depend on the ratio); None otherwise."""
    if cfg.method != "fisher":
        return None
    if id(dense) not in _OUTPUT_GRAMS:
        t = time.perf_counter()
        _OUTPUT_GRAMS[id(dense)] = (collect_output_grams(dense, find_target_layers(dense, cfg.target_modules), calib,
                                                         batch_size=cfg.calib_batch_size, seed=cfg.seed),
                                    time.perf_counter() - t)
    grams, seconds = _OUTPUT_GRAMS[id(dense)]
    print(f"(output-gradient Grams: {seconds:.1f} s, once for every fisher row)", flush=True)
    return grams


def run_ablation(args) -> int:
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", flush=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.with_suffix(".json")
    done = json.loads(path.read_text())["rows"] if args.resume and path.exists() else []
    dense, tokenizer = load_model(args.model, dtype=args.dtype, device=torch.device(args.device))
    corpora = [c for c in args.eval.split(",") if c]

    def ppl(model) -> dict[str, float]:
        res = evaluate_corpora(model, tokenizer, corpora, args.eval_seq_len, args.max_eval_tokens or None,
                               args.eval_batch_size, args.progress)
        return {k: v["ppl"] for k, v in res.items()}

    dense_ppl = ppl(dense)
    log(f"dense {dense_ppl}")
    calib = calibration_blocks(tokenizer, args.calib, args.calib_blocks, args.calib_seq_len, seed=args.seed)
    blocks = recovery_blocks(tokenizer, args.recover_data, args.recover_seq_len) if args.recover_steps else None
    if blocks is not None and args.quick:
        blocks = {k: v[:64] for k, v in blocks.items()}
    data = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "args": vars(args),
            "env": environment(args.device), "tf32": args.tf32, "dense": dense_ppl, "rows": list(done)}
    for ratio, row in ablation_cells(args):
        have = _find_row(data["rows"], ratio, row)
        if _complete(have, args):
            continue

        def saved(out):
            _put_row(data, out, args)
            _write_json(path, data)
        ablation_row(args, dense, tokenizer, calib, blocks, ratio, row, ppl, log, have, saved)
    data["seconds"] = time.perf_counter() - t_start
    _write_json(path, data)
    md = render_ablation(data, corpora)
    atomic_write_text(out, md)
    print(md)
    log(f"wrote {out} and {path}")
    return 0


def ablation_cells(args) -> list[tuple[float, str]]:
    """(ratio, row) pairs in run order: ratios outer, rows inner."""
    return [(float(r), row) for r in args.ratios.split(",") if r for row in args.rows.split(",") if row]


def _cell_order(args) -> dict:
    return {cell: i for i, cell in enumerate(ablation_cells(args))}


def _find_row(rows: list[dict], ratio: float, row: str) -> dict | None:
    return next((r for r in rows if (r["ratio"], r["row"]) == (ratio, row)), None)


def _complete(row: dict | None, args) -> bool:
    """Whether `row` (None: not run yet) holds every seed of this run."""
    if row is None:
        return False
    have = {x["seed"] for x in row.get("recovery", [])}
    return not args.recover_steps or set(args.seeds) <= have


def _put_row(data: dict, row: dict, args) -> None:
    """`row` in place of the saved row of its (ratio, row) cell; rows in run order."""
    order = _cell_order(args)
    key = (row["ratio"], row["row"])
    data["rows"] = [r for r in data["rows"] if (r["ratio"], r["row"]) != key] + [row]
    data["rows"].sort(key=lambda r: order.get((r["ratio"], r["row"]), 1 << 30))


def _child_argv(argv: list[str], ratio: float, row: str, out: Path) -> list[str]:
    """This run's arguments for one cell: --jobs/--ratios/--rows/--out replaced."""
    drop = {"--jobs", "--ratios", "--rows", "--out"}
    kept, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        key = a.split("=", 1)[0]
        if key in drop:
            skip = "=" not in a
            continue
        kept.append(a)
    return kept + ["--ratios", str(ratio), "--rows", row, "--out", str(out), "--resume"]


def run_ablation_jobs(args) -> int:
    """The ablation's cells in `--jobs` child processes (this script, one cell each, --resume);
    their JSONs are merged into --out's after each child ends and once more at the end."""
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.with_suffix(".json")
    work = out.with_name(f"{out.stem}.jobs")
    work.mkdir(exist_ok=True)
    data = json.loads(path.read_text()) if args.resume and path.exists() else {"rows": []}
    data.update(command="python " + " ".join(shlex.quote(a) for a in sys.argv), jobs=args.jobs)
    t0 = time.perf_counter()
    running: list[tuple[subprocess.Popen, Path]] = []

    def merge(child_json: Path) -> None:
        if not child_json.exists():
            return
        child = json.loads(child_json.read_text())
        for key in ("args", "env", "tf32", "dense"):  # the newest child's run settings
            data[key] = child.get(key, data.get(key))
        for r in child["rows"]:
            _put_row(data, r, args)
        _write_json(path, data)

    if args.resume:  # children of an interrupted run saved their seeds as they went
        for f in sorted(work.glob("cell*.json")):
            merge(f)
    cells = [c for c in ablation_cells(args) if not _complete(_find_row(data["rows"], *c), args)]
    def stop(signum, frame):  # a time limit: end the children, keep what they saved
        for proc, _ in running:
            proc.terminate()
        for proc, child_json in running:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
            merge(child_json)
        raise SystemExit(f"stopped by signal {signum}; rerun with --resume to finish")
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for ratio, row in cells:
        child_md = work / ("cell-" + re.sub(r"[^A-Za-z0-9.]+", "_", f"{ratio}-{row}") + ".md")
        prior = _find_row(data["rows"], ratio, row)
        if prior is not None:  # seeds already measured: the child resumes from them
            _write_json(child_md.with_suffix(".json"), {"rows": [prior]})
        while len(running) >= args.jobs:
            running = _reap(running, merge)
        cmd = [sys.executable, str(Path(__file__).resolve())] + _child_argv(sys.argv[1:], ratio, row, child_md)
        print(f"[{time.perf_counter() - t0:7.1f}s] start {ratio:.0%} {row} -> {child_md.with_suffix('.log')}",
              flush=True)
        with open(child_md.with_suffix(".log"), "w") as log:  # the child keeps its own copy
            running.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), child_md.with_suffix(".json")))
    while running:
        running = _reap(running, merge)
    data["seconds"] = time.perf_counter() - t0
    _write_json(path, data)
    md = render_ablation(data, [c for c in args.eval.split(",") if c])
    atomic_write_text(out, md)
    print(md)
    return 0


def _reap(running: list, merge) -> list:
    """Wait until one child ends; merge its JSON; the ones still running."""
    while True:
        for proc, child_json in running:
            if proc.poll() is not None:
                merge(child_json)
                if proc.returncode:
                    print(f"a child failed (exit {proc.returncode}); see {child_json.with_suffix('.log')}",
                          flush=True)
                return [x for x in running if x[0] is not proc]
        time.sleep(2)


def _mean_sd(xs: list[float]) -> str:
    if not xs:
        return "-"
    m = sum(xs) / len(xs)
    sd = (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0
    return f"{m:.2f}x" + (f" ± {sd:.2f}" if len(xs) > 1 else "")


def render_ablation(data: dict, corpora: list[str]) -> str:
    """Markdown: perplexity / dense before and after recovery (mean ± sd over the seeds run),
    the number of seeds, seconds. Rows named "default" (runs before allocate="auto") show as
    "baseline"."""
    env, dense, args = data["env"], data["dense"], data["args"]
    stages = ["calibration_s", "allocation_s", "factorize_s", "update_s"]
    commands = data.get("commands") or [data["command"]]
    jobs = data.get("jobs") or args.get("jobs", 1)
    lines = ["# Compression ablation (issue 15): SmolLM2-135M", "",
             "Generated by " + "; ".join(f"`{c}`" for c in commands) + "  ",
             f"{env['device_name']}, torch {env['versions']['torch']}, transformers {env['versions']['transformers']}, "
             f"{env['date']}" + (", TF32 matmuls" if data.get("tf32") else "") + ". Dense: "
             + ", ".join(f"{c} {dense[c]:.2f}" for c in corpora) + ". "
             f"Whitening on {args['calib_blocks']} x {args['calib_seq_len']} tokens of {args['calib']}; "
             f"recovery {args['recover_method']} r={args['recover_rank']}, {args['recover_steps']} steps of "
             f"{args['recover_batch_size']} x {args['recover_seq_len']}, seeds {args['seeds']} "
             "(the seeds column: how many finished). "
             "Cells: perplexity / dense (after recovery: mean ± sd over the seeds).", ""]
    if jobs and jobs > 1:
        lines += [f"Seconds: up to {jobs} cells shared the GPU at once (--jobs), so they are not the cost "
                  "of one run alone.", ""]
    lines += ["| ratio | row | " + " | ".join(f"{c} before | {c} after" for c in corpora)
              + " | seeds | linears removed | " + " | ".join(s.removesuffix("_s") + " s" for s in stages)
              + " | recover s |",
              "|---|---|" + "---:|" * (2 * len(corpora) + 3 + len(stages))]
    for r in data["rows"]:
        cells = [f"{r['ratio']:.0%}", "baseline" if r["row"] == "default" else r["row"]]
        for c in corpora:
            cells += [f"{r['ppl'][c] / dense[c]:.2f}x",
                      _mean_sd([x["ppl"][c] / dense[c] for x in r["recovery"]])]
        cells += [str(len(r["recovery"])), f"{100 * r['target_removed']:.2f}%"]
        cells += [f"{r['timings'].get(s, 0.0):.1f}" for s in stages]
        rec = [x["recover_s"] for x in r["recovery"]]
        cells.append(f"{sum(rec) / len(rec):.1f}" if rec else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
