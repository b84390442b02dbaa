"""GPU speed and memory of hylorada against peft, measured in one run (issue 6).

    python benchmarks/gpu_speed.py --out docs/perf.json            # on an NVIDIA GPU
    python benchmarks/gpu_speed.py --shape tiny --device cpu       # a CPU smoke run of the same code

Parts (all by default, or pick with --parts):
  train       training step time (median of --steps after --warmup) and peak memory of peft LoRA,
              peft DoRA and our LoRA, DoRA, HyLoRADA, LoRaDA, at dropout 0 and 0.05;
  merge       forward of the merged model (merge_and_unload) and of merge() vs the base model;
  compress    whiten + compress time (calibration included) of the TinyLlama and LLaMA-7B shapes,
              and the kept energy against the exact float64 path;
  compressed  forward tokens/s of 20/40/60%-compressed models vs the dense one.
Every row checks its outputs against a reference path and prints the relative error.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hylorada import HyLoRADAConfig, HyLoRADAModel  # noqa: E402
from hylorada.utils.env import environment  # noqa: E402

SHAPES = {
    # TinyLlama-1.1B: hidden 2048, intermediate 5632, 22 layers, 32 heads / 4 kv heads, vocab 32000
    "tinyllama": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                      num_attention_heads=32, num_key_value_heads=4, vocab_size=32000),
    "llama7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=256),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_model(shape: str, device: str, dtype: torch.dtype, seq_len: int, seed: int = 0):
    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=max(seq_len, 128),
                      tie_word_embeddings=False)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_reset(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def timed(fn, device: str, steps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def autocast(device: str):
    return torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16)


# ------------------------------------------------------------------------------- training steps
def ours_config(method: str, r: int, dropout: float, **kw) -> HyLoRADAConfig:
    return HyLoRADAConfig(method=method, lora_rank=r, lora_alpha=2.0 * r, lora_dropout=dropout,
                          target_modules=TARGETS, init_lora_weights="kaiming", **kw)


@torch.no_grad()
def randomize_adapters(wrapped: HyLoRADAModel, seed: int = 1) -> None:
    g = torch.Generator(device="cpu").manual_seed(seed)
    for name, p in wrapped.named_trainable_parameters():
        noise = torch.randn(p.shape, generator=g).to(p.device, p.dtype)
        if name.endswith("lora_B"):
            p.copy_(noise * 0.01)
        elif not name.endswith("lora_A"):
            p.add_(noise * 0.01)


def train_step_fn(model, params_or_groups, ids, device):
    opt = torch.optim.AdamW(params_or_groups, lr=1e-5)

    def step():
        with autocast(device):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step, opt


def copy_into_peft(model, state: dict, with_magnitude: bool) -> None:
    with torch.no_grad():
        for name, mod in model.base_model.model.named_modules():
            if f"{name}.lora_A" in state:
                mod.lora_A["default"].weight.copy_(state[f"{name}.lora_A"])
                mod.lora_B["default"].weight.copy_(state[f"{name}.lora_B"])
                if with_magnitude:
                    mod.lora_magnitude_vector["default"].weight.copy_(state[f"{name}.magnitude"])


def peft_config(method: str, r: int, dropout: float):
    import peft
    return peft.LoraConfig(r=r, lora_alpha=2.0 * r, lora_dropout=dropout, target_modules=TARGETS,
                           use_dora=method == "dora")


@torch.no_grad()
def check_outputs(base, args, device, ids) -> dict[str, float]:
    """Relative output errors in float32 (TF32 off) on a float32 copy of the base model:
    each of our methods, fused (+ compiled scale) vs the plain reference path; peft LoRA/DoRA
    loaded with our weights vs ours."""
    import copy

    import peft

    base32 = copy.deepcopy(base).float()
    check_ids = ids[:1, : min(256, ids.shape[1])]
    errs = {}
    for method in ("lora", "dora", "hylorada", "lorada"):
        ours = HyLoRADAModel(base32, ours_config(method, args.rank, 0.0))
        randomize_adapters(ours)
        ours.eval()
        fast = ours(input_ids=check_ids).logits
        for _, layer in ours.adapter_layers():
            layer.fused = False
        slow = ours(input_ids=check_ids).logits
        errs[method] = rel_err(fast, slow)
        state = {k: v.clone() for k, v in ours.adapter_state_dict().items()}
        ours.unload()
        if method in ("lora", "dora"):
            pm = peft.get_peft_model(base32, peft_config(method, args.rank, 0.0))
            copy_into_peft(pm, state, method == "dora")
            pm.eval()
            errs[f"peft-{method}"] = rel_err(pm(input_ids=check_ids).logits, slow)
            pm.unload()
    del base32
    peak_reset(device)
    return errs


def graph_breaks(model, ids, device) -> int | None:
    """torch._dynamo.explain's graph-break count for one training forward (None if it fails)."""
    try:
        import torch._dynamo as dynamo
        dynamo.reset()
        with autocast(device):
            ex = dynamo.explain(model)(input_ids=ids[:1, :128], labels=ids[:1, :128])
        dynamo.reset()
        return int(ex.graph_break_count)
    except Exception as e:  # noqa: BLE001 - diagnostic only
        print(f"explain failed: {type(e).__name__}: {e}", flush=True)
        return None


def bench_train(base, args, device, ids, rows):
    import peft

    errs = check_outputs(base, args, device, ids)
    modes = args.modes.split(",")
    cells = [(mode, dropout, method) for mode in modes for dropout in map(float, args.dropouts.split(","))
             for method in ("peft-lora", "peft-dora", "lora", "dora", "hylorada", "lorada")
             if not (mode == "compiled" and method in args.skip_compiled.split(","))]
    for mode, dropout, method in cells:
            row = {"part": "train", "method": method, "dropout": dropout, "mode": mode}
            if method.startswith("peft-"):
                model = peft.get_peft_model(base, peft_config(method.split("-")[1], args.rank, dropout))
                params = [p for p in model.parameters() if p.requires_grad]
                row["check"] = "peft with our weights vs ours (reference path), fp32"
            else:
                model = HyLoRADAModel(base, ours_config(method, args.rank, dropout))
                params = model.parameter_groups(1e-5, 0.0)
                row["check"] = "fused vs reference path, fp32"
            row["rel_err"] = errs[method]
            row["adapter_dtype"] = str(next(p for p in model.parameters() if p.requires_grad).dtype)
            row["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
            model.train()
            peak_reset(device)
            run_model = model
            if mode == "compiled":
                row["graph_breaks"] = graph_breaks(model, ids, device)
                run_model = torch.compile(model)
            step, opt = train_step_fn(run_model, params, ids, device)
            t0 = time.perf_counter()
            step()  # the first step compiles (compiled mode)
            sync(device)
            row["first_step_s"] = time.perf_counter() - t0
            times = timed(step, device, args.steps, args.warmup)
            row["ms"] = 1000 * statistics.median(times)
            del run_model
            row["peak_gib"] = peak_gib(device)
            del opt, step
            model.unload()
            if mode == "compiled":
                torch._dynamo.reset()
            rows.append(row)
            print(fmt_row(row), flush=True)
            peak_reset(device)


# ------------------------------------------------------------------------------------ merged
@torch.no_grad()
def bench_merge(base, args, device, ids, rows):
    def fwd(m):
        with autocast(device):
            return m(input_ids=ids).logits

    base_t = statistics.median(timed(lambda: fwd(base), device, args.steps, args.warmup))
    for variant in ("merge()", "merge_and_unload()"):
        wrapped = HyLoRADAModel(base, ours_config("hylorada", args.rank, 0.0))
        randomize_adapters(wrapped)
        wrapped.eval()
        base.float()  # merge and check in float32, then time in bf16
        check = ids[:1, :256]
        ref_logits = wrapped(input_ids=check).logits
        if variant == "merge()":
            wrapped.merge()
            model = wrapped
        else:
            model = wrapped.merge_and_unload()
        err = rel_err(model(input_ids=check).logits, ref_logits)
        base.to(torch.bfloat16)
        t = statistics.median(timed(lambda: fwd(model), device, args.steps, args.warmup))
        rows.append({"part": "merge", "method": f"hylorada {variant}", "ms": 1000 * t,
                     "base_ms": 1000 * base_t, "ratio_vs_base": t / base_t,
                     "check": "merged vs unmerged, fp32", "rel_err": err})
        print(fmt_row(rows[-1]), flush=True)
        if variant == "merge()":
            wrapped.unload()
    return base_t


def fmt_row(row: dict) -> str:
    keys = ["part", "method", "mode", "dropout", "ms", "first_step_s", "graph_breaks", "peak_gib", "ratio_vs_base", "tokens_per_s",
            "seconds", "energy_gap", "rel_err", "check"]
    out = []
    for k in keys:
        if k in row:
            v = row[k]
            out.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
    return "  ".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="tinyllama", choices=sorted(SHAPES))
    ap.add_argument("--big-shape", default="llama7b", choices=sorted(SHAPES))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--calib-blocks", type=int, default=64)
    ap.add_argument("--parts", default="train,merge,compress,compressed")
    ap.add_argument("--modes", default="eager,compiled", help="train part: eager and/or compiled (torch.compile(model))")
    ap.add_argument("--skip-compiled", default="", help="methods not to compile, e.g. peft-dora")
    ap.add_argument("--dropouts", default="0,0.05", help="train part: adapter dropouts (default: %(default)s)")
    ap.add_argument("--out", default="perf.json")
    args = ap.parse_args(argv)
    device = args.device
    parts = set(args.parts.split(","))
    torch.backends.cuda.matmul.allow_tf32 = False
    info = {**environment(device), "args": vars(args)}
    print(json.dumps(info), flush=True)
    rows: list[dict] = []
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, SHAPES[args.shape]["vocab_size"], (args.batch, args.seq_len), generator=g).to(device)

    if parts & {"train", "merge"}:
        base = build_model(args.shape, device, torch.bfloat16, args.seq_len)
        base.requires_grad_(False)
        if "train" in parts:
            bench_train(base, args, device, ids, rows)
        if "merge" in parts:
            with torch.no_grad(), autocast(device):
                t = statistics.median(timed(lambda: base(input_ids=ids), device, args.steps, args.warmup))
            rows.append({"part": "frozen", "method": "base forward", "ms": 1000 * t})
            print(fmt_row(rows[-1]), flush=True)
            bench_merge(base, args, device, ids, rows)
        del base
        peak_reset(device)
    if "compress" in parts or "compressed" in parts:
        from compress_speed import bench_compress, bench_compressed  # noqa: E402
        if "compress" in parts:
            bench_compress(args, device, rows)
        if "compressed" in parts:
            bench_compressed(args, device, ids, rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"info": info, "rows": rows}, indent=2))
    print(markdown_table(rows))
    return 0


def markdown_table(rows: list[dict]) -> str:
    lines = ["| part | method | mode | dropout | ms | peak GiB | ratio | tokens/s | seconds | energy gap | rel. err | check |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def f(v, spec):
        return "" if v is None else (format(v, spec) if isinstance(v, float) else str(v))
    for r in rows:
        lines.append("| " + " | ".join([
            r["part"], r["method"], r.get("mode", ""), f(r.get("dropout"), ".2f"), f(r.get("ms"), ".1f"),
            f(r.get("peak_gib"), ".2f"), f(r.get("ratio_vs_base"), ".3f"), f(r.get("tokens_per_s"), ".0f"),
            f(r.get("seconds"), ".1f"), f(r.get("energy_gap"), ".1e"), f(r.get("rel_err"), ".1e"),
            r.get("check", "")]) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
