"""Training-step rows of benchmarks/gpu_speed.py (issue 14), each through the public API only:

    model = HyLoRADAModel(base, HyLoRADAConfig(...))      # base: bf16 weights, as loaded
    model.train()
    opt = torch.optim.AdamW(model.parameter_groups(lr))
    run = compile_forward(model, "model") if compiled else model   # = torch.compile(model), the trainer's default
    with torch.autocast("cuda", torch.bfloat16): loss = run(input_ids=ids, labels=ids).loss
    loss.backward(); opt.step(); opt.zero_grad()

(peft: get_peft_model, model.train(), AdamW over the trainable parameters.) A fresh base model
per row, so that no row inherits another's allocator or compiler state.

Row ids: `frozen/<mode>` (the frozen model's forward, no adapters, no grad: the floor of a step
is about 2x it), `train/<mode>/<dropout>/<method>` with method in peft-lora, peft-dora, lora,
dora, hylorada, lorada, and `merge/<variant>`.

Each train row has the step time (median), the host time to issue a step, the caching
allocator's retries during the timed steps (each one frees cached blocks and synchronizes), the first step (the
compilation), graph breaks / graphs / recompiles (dynamo's counters of the timed model), the
steady-state peak memory, and an fp32 check on a `--check-layers`-layer model of the same
widths: our fused path (compiled in compiled rows) against the plain-autograd reference path
(`fused=False`), logits and every adapter gradient; peft with our weights against our
reference, logits. grad_rel_err is over all adapter gradients together (a single tensor's can be
a cancellation: HyLoRADA's β gradient is ~0 where m_eff ≈ ||W'||). The check runs with dropout off (compiled kernels draw other masks);
tests/test_compile.py checks dropout under compilation exactly on CPU.
"""
from __future__ import annotations

import statistics
import time

import torch
from speed_common import (TARGETS, Row, autocast, build_model, peak_gib, peak_reset, random_ids,
                          rel_err, sync, timed)

from hylorada import HyLoRADAConfig, HyLoRADAModel
from hylorada.adapters import AdapterLayer
from hylorada.nn.compile import compile_forward

METHODS = ["peft-lora", "peft-dora", "lora", "dora", "hylorada", "lorada"]


def ours_config(method: str, r: int, dropout: float, **kw) -> HyLoRADAConfig:
    return HyLoRADAConfig(method=method, lora_rank=r, lora_alpha=2.0 * r, lora_dropout=dropout,
                          target_modules=TARGETS, init_lora_weights="kaiming", **kw)


def peft_config(method: str, r: int, dropout: float):
    import peft
    return peft.LoraConfig(r=r, lora_alpha=2.0 * r, lora_dropout=dropout, target_modules=TARGETS,
                           use_dora=method == "dora")


@torch.no_grad()
def randomize_adapters(wrapped: HyLoRADAModel, seed: int = 1) -> None:
    g = torch.Generator(device="cpu").manual_seed(seed)
    for name, p in wrapped.named_trainable_parameters():
        noise = torch.randn(p.shape, generator=g).to(p.device, p.dtype)
        if name.endswith("lora_B"):
            p.copy_(noise * 0.01)
        elif not name.endswith("lora_A"):
            p.add_(noise * 0.01)


def copy_into_peft(model, layers: list) -> None:
    """Give peft's layers the A, B (and DoRA magnitude) of our (name, adapter layer) pairs."""
    with torch.no_grad():
        for name, layer in layers:
            pl = model.base_model.model.get_submodule(name)
            pl.lora_A["default"].weight.copy_(layer.lora_A)
            pl.lora_B["default"].weight.copy_(layer.lora_B)
            if layer.method == "dora":
                pl.lora_magnitude_vector["default"].weight.copy_(layer.magnitude)


def adapt(base, method: str, r: int, dropout: float):
    """(model in train mode, what AdamW gets), as a user builds them."""
    if method.startswith("peft-"):
        import peft
        model = peft.get_peft_model(base, peft_config(method[5:], r, dropout))
        model.train()
        return model, [p for p in model.parameters() if p.requires_grad]
    model = HyLoRADAModel(base, ours_config(method, r, dropout))
    model.train()
    return model, model.parameter_groups(1e-5)


def dropout_active(model) -> int:
    """Adapter layers whose dropout acts in the measured step (ours and peft's)."""
    ours = [m for m in model.modules() if isinstance(m, AdapterLayer)]
    if ours:
        return sum(m.training and m.dropout_p > 0 for m in ours)
    return sum(isinstance(m, torch.nn.Dropout) and m.training and m.p > 0 for m in model.modules())


def compiled(model, args):
    """The trainer's compile (hylorada/nn/compile.py), for peft's models and ours alike:
    --compile-scope model (torch.compile(model), the trainer's default) or blocks (regional)."""
    return compile_forward(model, args.compile_scope, mode=args.compile_mode, backend=args.compile_backend)


def train_step_fn(run_model, params, ids, device):
    opt = torch.optim.AdamW(params, lr=1e-5)

    def step():
        with autocast(device):
            loss = run_model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return step


def alloc_retries(device) -> int | None:
    return torch.cuda.memory_stats().get("num_alloc_retries", 0) if device.startswith("cuda") else None


def _timing(row: dict, step, args, device) -> None:
    t0 = time.perf_counter()
    step()  # compiles in compiled rows
    sync(device)
    row["first_step_s"] = time.perf_counter() - t0
    peak_reset(device)
    retries = alloc_retries(device)
    wall, host = timed(step, device, args.steps, args.warmup)
    row["ms"] = 1000 * statistics.median(wall)
    row["host_ms"] = 1000 * statistics.median(host)
    row["peak_gib"] = peak_gib(device)
    if retries is not None:  # cudaMalloc retries (frees + sync) during the timed steps: should be 0
        row["alloc_retries"] = alloc_retries(device) - retries


def _dynamo_fields(row: dict, graphs_after_first: int) -> None:
    from torch._dynamo.utils import counters
    breaks = counters["graph_break"]
    row["graph_breaks"] = sum(breaks.values())
    row["graph_break_reasons"] = [str(k)[:200] for k in list(breaks)[:3]]
    row["graphs"] = counters["stats"]["unique_graphs"]
    row["recompiles"] = counters["stats"]["unique_graphs"] - graphs_after_first


def train_row(args, device, mode: str, dropout: float, method: str) -> dict:
    from torch._dynamo.utils import counters
    row = {"part": "train", "method": method, "mode": mode, "dropout": dropout}
    row.update(check(args, device, mode, method))
    base = build_model(args.shape, device, torch.bfloat16, args.seq_len)
    ids = random_ids(args.shape, args.batch, args.seq_len, device)
    model, params = adapt(base, method, args.rank, dropout)
    row["dropout_active_layers"] = dropout_active(model)
    row["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    torch._dynamo.reset()
    counters.clear()
    step = train_step_fn(compiled(model, args) if mode == "compiled" else model, params, ids, device)
    _timing(row, step, args, device)
    if mode == "compiled":
        _dynamo_fields(row, counters["stats"]["unique_graphs"])
        torch._dynamo.reset()
    return row


def _fwd_bwd(run, model, ids):
    """Logits and the adapters' gradients of one forward + backward."""
    model.zero_grad(set_to_none=True)
    out = run(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads


def check(args, device, mode: str, method: str) -> dict:
    """fp32 (TF32 off) check of the timed path on a small model of the same widths (see above)."""
    torch._dynamo.reset()
    base = build_model(args.shape, device, torch.float32, 256, layers=args.check_layers)
    ids = random_ids(args.shape, 1, min(128, args.seq_len), device, seed=2)
    ours = HyLoRADAModel(base, ours_config(method.removeprefix("peft-"), args.rank, 0.0)).train()
    randomize_adapters(ours)
    for _, layer in ours.adapter_layers():
        layer.fused = False
    ref_logits, ref_grads = _fwd_bwd(ours, ours, ids)
    where = "compiled" if mode == "compiled" else "eager"
    if method.startswith("peft-"):
        import peft
        layers = list(ours.adapter_layers())
        model = peft.get_peft_model(ours.unload(), peft_config(method[5:], args.rank, 0.0))
        copy_into_peft(model, layers)
        model.train()
        logits, _ = _fwd_bwd(compiled(model, args) if mode == "compiled" else model, model, ids)
        out = {"rel_err": rel_err(logits, ref_logits),
               "check": f"peft ({where}) with our weights vs our reference path, fp32, logits"}
    else:
        for _, layer in ours.adapter_layers():
            layer.fused = True
        logits, grads = _fwd_bwd(compiled(ours, args) if mode == "compiled" else ours, ours, ids)
        out = {"rel_err": rel_err(logits, ref_logits),
               "grad_rel_err": rel_err(torch.cat([grads[n].flatten() for n in ref_grads]),
                                       torch.cat([g.flatten() for g in ref_grads.values()])),
               "check": f"fused ({where}) vs reference path, fp32, logits and adapter grads"}
    torch._dynamo.reset()
    del base, ours
    peak_reset(device)
    return out


@torch.no_grad()
def frozen_row(args, device, mode: str) -> dict:
    """The frozen model's forward (no adapters, no grad), bf16 autocast, the training batch."""
    base = build_model(args.shape, device, torch.bfloat16, args.seq_len).requires_grad_(False)
    ids = random_ids(args.shape, args.batch, args.seq_len, device)
    torch._dynamo.reset()
    run = compiled(base, args) if mode == "compiled" else base

    def fwd():
        with autocast(device):
            run(input_ids=ids)
    row = {"part": "frozen", "method": "base forward", "mode": mode}
    _timing(row, fwd, args, device)
    torch._dynamo.reset()
    return row


def merge_row(args, device, variant: str) -> dict:
    """Forward of HyLoRADA after `merge()` / `merge_and_unload()` against the base's forward;
    the check: merged vs unmerged outputs in fp32."""
    base = build_model(args.shape, device, torch.bfloat16, args.seq_len)
    ids = random_ids(args.shape, args.batch, args.seq_len, device)

    @torch.no_grad()
    def fwd(m):
        with autocast(device):
            return m(input_ids=ids).logits
    base_t = statistics.median(timed(lambda: fwd(base), device, args.steps, args.warmup)[0])
    wrapped = HyLoRADAModel(base, ours_config("hylorada", args.rank, 0.0))
    randomize_adapters(wrapped)
    wrapped.eval()
    base.float()  # merge and check in float32, then time in bf16
    with torch.no_grad():
        ref = wrapped(input_ids=ids[:1, :256]).logits
        if variant == "merge()":
            wrapped.merge()
            model = wrapped
        else:
            model = wrapped.merge_and_unload()
        err = rel_err(model(input_ids=ids[:1, :256]).logits, ref)
    base.to(torch.bfloat16)
    t = statistics.median(timed(lambda: fwd(model), device, args.steps, args.warmup)[0])
    return {"part": "merge", "method": f"hylorada {variant}", "ms": 1000 * t, "base_ms": 1000 * base_t,
            "ratio_vs_base": t / base_t, "check": "merged vs unmerged, fp32", "rel_err": err}


def rows(args, device) -> list[Row]:
    out = []
    modes = args.modes.split(",")
    for mode in modes:
        out.append(Row(f"frozen/{mode}", lambda mode=mode: frozen_row(args, device, mode)))
    skip = set(filter(None, args.skip_compiled.split(",")))
    for mode in modes:
        for dropout in map(float, args.dropouts.split(",")):
            for method in METHODS:
                if mode == "compiled" and method in skip:
                    continue
                out.append(Row(f"train/{mode}/{dropout:g}/{method}",
                               lambda m=mode, d=dropout, k=method: train_row(args, device, m, d, k)))
    return out


def merge_rows(args, device) -> list[Row]:
    return [Row(f"merge/{v}", lambda v=v: merge_row(args, device, v))
            for v in ("merge()", "merge_and_unload()")]
