"""Decode and prefill rows of benchmarks/gpu_speed.py (issue 14, "Compressed inference"):
dense vs 20/40/60%-compressed (`hylorada.compress.compress_model`, plain SVD, ranks multiples
of 8), bf16 weights, greedy `model.generate` with min_new_tokens = max_new_tokens (a fixed
length whatever the random model predicts).

The weights are random (the `--shape` config, seeded): decode speed depends on the shapes and
ranks, not on the values, so no checkpoint is needed.

- eager: the default dynamic KV cache, no compilation;
- compiled: transformers' standard fast-decode path, `cache_implementation="static"` with a
  `CompileConfig` (mode `--decode-compile-mode`, default "reduce-overhead" = CUDA graphs on a
  GPU): generate compiles the one-token decode step; the prefill runs eagerly.

Per row `decode/<mode>/<model>/b<batch>`: prefill_ms = generate(max_new_tokens=1) (prompt
forward + cache set-up + one token), decode_ms_per_token = (t(N) - t(1)) / (N - 1) for
N = --new-tokens, tokens_per_s = batch (N - 1) / (t(N) - t(1)), the first call (compilation),
graphs compiled after it (recompiles, should be 0), peak memory; checks: a compressed model against its own dense equivalent in fp32 (rel_err), and
in compiled rows the fraction of generated tokens equal to the eager path's (bf16: a near-tie
may flip a token and the greedy continuation after it).
"""
from __future__ import annotations

import statistics
import time

import torch
from compress_speed import compressed_model, dense_equivalent_error
from speed_common import Row, peak_gib, peak_reset, random_ids, sync

MODELS = {"dense": 0.0, "svd20": 0.2, "svd40": 0.4, "svd60": 0.6}


def compile_config(args, device: str):
    from transformers import CompileConfig
    cfg = CompileConfig(backend=args.compile_backend, mode=args.decode_compile_mode, fullgraph=True)
    if not device.startswith("cuda"):
        cfg._compile_all_devices = True  # transformers compiles decode on accelerators only by default
    return cfg


def generate_fn(model, prompt, args, device, mode: str):
    """generate(n) -> (token ids, seconds) through the row's path."""
    kw = dict(do_sample=False, pad_token_id=0)
    if mode == "compiled":
        kw.update(cache_implementation="static", compile_config=compile_config(args, device))

    @torch.no_grad()
    def generate(n: int):
        sync(device)
        t0 = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=n, min_new_tokens=n, **kw)
        sync(device)
        return out, time.perf_counter() - t0
    return generate


def decode_row(args, device, mode: str, name: str, batch: int) -> dict:
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    n = args.new_tokens
    model, report = compressed_model(args, device, MODELS[name], args.prompt_len + n)
    prompt = random_ids(args.shape, batch, args.prompt_len, device, seed=3)
    generate = generate_fn(model, prompt, args, device, mode)
    row = {"part": "decode", "method": name, "mode": mode, "batch": batch,
           "prompt_len": args.prompt_len, "new_tokens": n}
    out, row["first_call_s"] = generate(n)  # compiles in compiled rows
    generate(1)
    graphs = counters["stats"]["unique_graphs"]
    peak_reset(device)
    prefill = statistics.median(generate(1)[1] for _ in range(args.decode_reps))
    total = statistics.median(generate(n)[1] for _ in range(args.decode_reps))
    if total <= prefill:
        raise RuntimeError(f"t({n}) = {1000 * total:.2f} ms <= t(1) = {1000 * prefill:.2f} ms: timing noise exceeds "
                           "the decode time; raise --new-tokens or --decode-reps")
    row.update(prefill_ms=1000 * prefill, decode_ms_per_token=1000 * (total - prefill) / (n - 1),
               tokens_per_s=batch * (n - 1) / (total - prefill), total_ms=1000 * total,
               peak_gib=peak_gib(device), graphs=counters["stats"]["unique_graphs"],
               recompiles=counters["stats"]["unique_graphs"] - graphs)
    if out.shape[1] != args.prompt_len + n:
        raise RuntimeError(f"generate returned {out.shape[1] - args.prompt_len} new tokens, not {n}")
    if mode == "compiled":
        eager = generate_fn(model, prompt, args, device, "eager")(n)[0]
        row["tokens_agree"] = (eager[:, args.prompt_len:] == out[:, args.prompt_len:]).float().mean().item()
    if report is not None:
        row["rel_err"] = dense_equivalent_error(model, prompt[:1, :256])
        row["check"] = "factorized vs its dense equivalent, fp32"
        row["params_m"] = report.model_params_after / 1e6
    torch._dynamo.reset()
    del model
    peak_reset(device)
    return row


def rows(args, device) -> list[Row]:
    return [Row(f"decode/{mode}/{name}/b{b}", lambda m=mode, k=name, b=b: decode_row(args, device, m, k, b))
            for mode in args.modes.split(",") for name in MODELS
            for b in map(int, args.decode_batches.split(","))]
