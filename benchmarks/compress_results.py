"""Compression results for the real SmolLM2: writes docs/RESULTS.md (and a JSON next to it).

    python benchmarks/compress_results.py --device cuda                       # the full table
    python benchmarks/compress_results.py --device cpu --max-eval-tokens 2048 \\
        --recover-steps 0 --calib-blocks 4 --ratios 0.2 --out .dev/RESULTS.md   # a CPU smoke

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
import shlex
import sys
import time
from pathlib import Path

import torch

from hylorada import evaluate
from hylorada.commands.compress import env_info, evaluate_corpora, recovery_blocks
from hylorada.compress import CompressConfig, compress_model
from hylorada.compress.api import find_target_layers, recover_compressed
from hylorada.compress.whiten import calibration_blocks, collect_grams
from hylorada.loading import load_model

DESIGN_REFERENCE = """Reference (docs: ../shared/DESIGN.md, an earlier H100 run: held-out = last 10% of each
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
    return p.parse_args(argv)


def fmt_ppl(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.3g}" if x >= 1e4 else f"{x:.2f}"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
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

    grams = None
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
            cfg = CompressConfig(method=method, ratio=ratio, svd_solver=args.solver, seed=args.seed)
            report = compress_model(model, cfg, grams=grams if method == "whiten" else None)
            compress_s = time.perf_counter() - t
            size = evaluate.model_size(model)
            row = {"ratio": ratio, "method": method, "ppl": ppl(model), "ppl_recovered": None,
                   "mb": size.n_bytes / 2**20, "params": size.n_params,
                   "target_removed": report.target_ratio, "model_removed": report.model_ratio,
                   "n_dense": report.n_dense, "compress_s": compress_s, "tokens_per_s": throughput(model)}
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
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "env": env_info(), "rows": rows},
                                                   indent=2, default=str))
    print(md)
    log(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


def render(args, rows, corpora, seconds: float) -> str:
    env = env_info()
    cmd = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    dense = rows[0]
    rec = args.recover_steps > 0
    lines = [
        "# Compression results: SmolLM2-135M",
        "",
        f"Generated by `{cmd}`  ",
        f"device {args.device} ({env['device']}), {env['date']}, torch {env['torch']}, "
        f"transformers {env['transformers']}, hylorada {env['hylorada']}, python {env['python']}, "
        f"{env['threads']} threads; {seconds / 60:.1f} min in all.",
        "",
        "Setup: every Linear of the 30 decoder layers (q, k, v, o, gate, up, down) is factorised; "
        "embeddings / lm_head stay dense. `ratio` = fraction of those layers' parameters removed "
        "(SVD-LLM: k = floor((1-ratio)·m·n/(m+n)) per matrix). "
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


if __name__ == "__main__":
    sys.exit(main())
