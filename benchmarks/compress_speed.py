"""Compression parts of benchmarks/gpu_speed.py: whiten+compress time and compressed forward speed.

- `bench_compress`: whitened compression (ratio 0.2, calibration included: `calib_blocks` blocks of
  1024 random tokens through the random-weight model) of the TinyLlama and LLaMA-7B shapes, with
  the fast GPU settings (Gram products in bf16 with fp32 accumulation summed in fp64, SVD from
  the eigen-decomposition of the smaller Gram matrix of W·L, ranks rounded down to multiples of 8). Quality: for the first and the
  last decoder layer, the kept energy of every target is recomputed by the exact path (fp64
  Gram accumulation, torch.linalg.svd in fp64) and the largest gap is reported.
- `bench_compressed`: forward tokens/s of the TinyLlama shape compressed by 20/40/60% (plain SVD,
  randomized solver, ranks multiples of 8) against the dense model; the check compares each factorized model with its
  own dense equivalent (up·down materialized).
"""
from __future__ import annotations

import statistics
import time
from functools import partial

import torch

from gpu_speed import SHAPES, autocast, build_model, fmt_row, peak_reset, rel_err, sync, timed
from hylorada.compress import CompressConfig, compress_model
from hylorada.compress.api import find_target_layers
from hylorada.compress.factorized import FactorizedLinear
from hylorada.compress.ranks import energy_kept
from hylorada.compress.whiten import collect_grams, whitening_factor

FAST = dict(svd_solver="gram", calib_precision="mixed", calib_batch_size=8, rank_multiple=8)


def _exact_energy(W: torch.Tensor, G: torch.Tensor, k: int) -> float:
    L = whitening_factor(G.double(), "cholesky").L
    s = torch.linalg.svdvals(W.double() @ L)
    return energy_kept(s, k)


def bench_compress(args, device, rows) -> None:
    for shape in (args.shape, args.big_shape):
        model = build_model(shape, device, torch.bfloat16, 1024)
        n_layers = SHAPES[shape]["num_hidden_layers"]
        g = torch.Generator().manual_seed(1)
        calib = torch.randint(0, SHAPES[shape]["vocab_size"], (args.calib_blocks, 1024), generator=g)
        targets = find_target_layers(model)
        probe = {n: m for n, m in targets.items()
                 if n.startswith(("model.layers.0.", f"model.layers.{n_layers - 1}."))}
        # the exact reference: fp64 Gram products for the probed layers (not timed)
        exact = collect_grams(model, probe, calib, batch_size=8, dtype=torch.float64)
        weights = {n: m.weight.detach().clone() for n, m in probe.items()}
        peak_reset(device)
        sync(device)
        t0 = time.perf_counter()
        report = compress_model(model, CompressConfig(method="whiten", ratio=0.2, **FAST), calib)
        sync(device)
        seconds = time.perf_counter() - t0
        by_name = {r.name: r for r in report.layers}
        gap = 0.0
        for name, W in weights.items():
            r = by_name[name]
            gap = max(gap, abs(_exact_energy(W, exact[name].G, r.rank) - r.energy_kept))
        rows.append({"part": "compress", "method": f"whiten 20% {shape} ({len(targets)} matrices, "
                     f"{args.calib_blocks}x1024 calib)", "seconds": seconds, "energy_gap": gap,
                     "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None,
                     "check": f"kept energy vs exact fp64 path ({len(weights)} matrices)"})
        print(fmt_row(rows[-1]), flush=True)
        del model, exact, weights, report
        peak_reset(device)


@torch.no_grad()
def bench_compressed(args, device, ids, rows) -> None:
    def fwd(m):  # bound to each model with functools.partial: a lambda would read `model` when called
        with autocast(device):
            return m(input_ids=ids).logits

    tokens = ids.numel()
    model = build_model(args.shape, device, torch.bfloat16, ids.shape[1])
    dense_t = statistics.median(timed(partial(fwd, model), device, args.steps, args.warmup))
    rows.append({"part": "compressed", "method": "dense", "ms": 1000 * dense_t,
                 "tokens_per_s": tokens / dense_t, "ratio_vs_base": 1.0})
    print(fmt_row(rows[-1]), flush=True)
    del model
    for ratio in (0.2, 0.4, 0.6):
        model = build_model(args.shape, device, torch.bfloat16, ids.shape[1])
        report = compress_model(model, CompressConfig(method="svd", ratio=ratio, svd_solver="randomized",
                                                      n_iter=0, compute_dtype="float32", rank_multiple=8))
        t = statistics.median(timed(partial(fwd, model), device, args.steps, args.warmup))
        model.float()  # the check runs in float32 (TF32 off)
        out = model(input_ids=ids[:1, :256]).logits
        # reference: the same model with every factorized layer materialized as a dense Linear
        for name, mod in list(model.named_modules()):
            if isinstance(mod, FactorizedLinear):
                dense = torch.nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None,
                                        device=mod.up.weight.device, dtype=mod.up.weight.dtype)
                dense.weight.copy_(mod.dense_weight())
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, dense)
        err = rel_err(out, model(input_ids=ids[:1, :256]).logits)
        rows.append({"part": "compressed", "method": f"svd {int(ratio * 100)}% (linears: "
                     f"{report.target_ratio:.3f} removed; model size {report.model_params_after / 1e6:.0f}M params)",
                     "ms": 1000 * t, "tokens_per_s": tokens / t, "ratio_vs_base": dense_t / t,
                     "check": "factorized vs its dense equivalent, fp32", "rel_err": err})
        print(fmt_row(rows[-1]), flush=True)
        del model
        peak_reset(device)
