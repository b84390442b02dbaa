"""Trainer (hylorada.train): masked loss, frozen base, LoRA+ groups, accumulation, resume, NaN, DDP."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import VOCAB, tiny_llama
from hylorada.checkpoint import CHECKPOINT_BEST, CHECKPOINT_LAST, find_checkpoint, load_adapter_checkpoint
from hylorada.config import HyLoRADAConfig
from hylorada.losses import causal_lm_loss_sum, token_losses
from hylorada.model import HyLoRADAModel
from hylorada.optim import build_optimizer, build_scheduler, lr_factor
from hylorada.train import NonFiniteLossError, TrainConfig, train

HERE = Path(__file__).resolve().parent


def make_model(method: str = "hylorada", dropout: float = 0.0, lora_plus: bool = False, seed: int = 0,
               dtype: torch.dtype = torch.float32):
    cfg = HyLoRADAConfig(method=method, lora_rank=4, lora_alpha=8.0, lora_dropout=dropout,
                         lora_plus_enabled=lora_plus, lora_plus_ratio=16.0)
    return HyLoRADAModel(tiny_llama(seed).to(dtype), cfg)


def make_blocks(n: int = 24, seq_len: int = 16, seed: int = 0, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Random blocks, every third one right-padded to a random length (as pack_blocks' last block)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, seq_len), generator=g)
    mask = torch.ones_like(ids)
    for i in range(0, n, 3):
        keep = int(torch.randint(2, seq_len, (1,), generator=g))
        mask[i, keep:] = 0
    ids = ids.masked_fill(mask == 0, pad_id)
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def cfg(**kw) -> TrainConfig:
    base = dict(steps=4, batch_size=4, grad_accum=1, lr=5e-3, warmup_steps=1, progress=False,
                log_every=0, mixed_precision="no", max_grad_norm=1.0, weight_decay=0.01)
    base.update(kw)
    return TrainConfig(**base)


def adapter(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.adapter_state_dict().items()}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


# ---- loss ---------------------------------------------------------------------------------------
def test_padding_never_contributes():
    torch.manual_seed(0)
    blocks = make_blocks(6, 16)
    logits = torch.randn(6, 16, VOCAB)
    nll = token_losses(logits, blocks["labels"], blocks["attention_mask"])
    pad_targets = blocks["attention_mask"][:, 1:] == 0
    assert pad_targets.any()
    assert torch.all(nll[pad_targets] == 0)
    assert torch.all(nll[~pad_targets] > 0)
    total, n = causal_lm_loss_sum(logits, blocks["labels"], blocks["attention_mask"])
    assert n == int((~pad_targets).sum())
    assert torch.allclose(total, nll.sum())
    # labels that are not -100 on padding are still ignored (the attention mask decides too)
    total2, n2 = causal_lm_loss_sum(logits, blocks["input_ids"], blocks["attention_mask"])
    assert n2 == n and torch.equal(total2, total)

    # changing padded tokens and labels changes neither the losses nor the trained adapter
    other = {k: v.clone() for k, v in blocks.items()}
    pad = other["attention_mask"] == 0
    other["input_ids"][pad] = 7
    other["labels"][pad] = 5
    runs = []
    for data in (blocks, other):
        model = make_model()
        res = train(model, data, None, cfg(steps=2, batch_size=3))
        runs.append((res.losses, adapter(model)))
    assert runs[0][0] == pytest.approx(runs[1][0], abs=1e-6)
    assert max_diff(runs[0][1], runs[1][1]) < 1e-6


ADAPTER_LEAVES = {"lora_A", "lora_B", "magnitude", "magnitude_init", "gate", "residual", "temperature"}


def test_only_adapter_changes_and_base_bit_identical():
    model = make_model()
    # filter on the exact leaf name: a substring filter ("gate") would skip mlp.gate_proj
    base_before = {k: v.clone() for k, v in model.model.state_dict().items()
                   if k.rsplit(".", 1)[-1] not in ADAPTER_LEAVES}
    assert "model.layers.0.mlp.gate_proj.weight" in base_before
    assert "model.layers.0.self_attn.q_proj.base_layer.weight" in base_before
    assert len(base_before) == len(tiny_llama().state_dict())
    ad_before = adapter(model)
    res = train(model, make_blocks(), None, cfg(steps=3))
    assert len(res.losses) == 3 and all(math.isfinite(x) for x in res.losses)
    base_after = model.model.state_dict()
    for k, v in base_before.items():
        assert torch.equal(v, base_after[k].to(v.device)), k
    trainable = {id(p) for p in model.trainable_parameters()}
    for name, p in model.model.named_parameters():
        assert p.requires_grad == (id(p) in trainable), name
    ad_after = adapter(model)
    changed = [k for k in ad_before if not torch.equal(ad_before[k], ad_after[k])]
    assert any(k.endswith("lora_B") for k in changed) and any(k.endswith("lora_A") for k in changed)
    assert not any(k.endswith("magnitude_init") for k in changed)  # a buffer (m0), never trained


# ---- optimizer and schedule -------------------------------------------------------------------
def test_lora_plus_groups_keep_their_ratio_through_the_schedule():
    model = make_model(lora_plus=True)
    c = cfg(steps=10, warmup_steps=3, lr=1e-3, schedule="cosine", min_lr_ratio=0.1)
    opt = build_optimizer(model, c)
    groups = {g["name"]: g for g in opt.param_groups}
    assert set(groups) == {"lora_A", "lora_B", "scalars"}
    assert groups["lora_A"]["lr"] == pytest.approx(1e-3)
    assert groups["lora_B"]["lr"] == pytest.approx(16e-3)
    assert groups["scalars"]["weight_decay"] == 0.0 and groups["lora_A"]["weight_decay"] == c.weight_decay
    sched = build_scheduler(opt, c)
    seen = []
    for s in range(c.steps):
        a, b, sc = groups["lora_A"]["lr"], groups["lora_B"]["lr"], groups["scalars"]["lr"]
        assert b == pytest.approx(16 * a, rel=1e-12) and sc == pytest.approx(a, rel=1e-12)
        assert a == pytest.approx(1e-3 * lr_factor(s, c), rel=1e-12)
        seen.append(a)
        opt.step()
        sched.step()
    assert seen[:3] == pytest.approx([0.25e-3, 0.5e-3, 0.75e-3])  # warm-up
    assert seen[3] == pytest.approx(1e-3)
    assert all(x >= y for x, y in zip(seen[3:], seen[4:]))  # then decays
    assert seen[-1] > 1e-4  # towards min_lr_ratio without going under it

    # the same ratio inside a training run (reported to the callback)
    model = make_model(lora_plus=True)
    ratios = []
    train(model, make_blocks(), None, cfg(steps=3, lr=1e-3),
          callback=lambda step, m: ratios.append(m["group_lrs"]["lora_B"] / m["group_lrs"]["lora_A"]))
    assert ratios == pytest.approx([16.0] * 3)


def test_schedules():
    lin = cfg(steps=10, warmup_steps=0, schedule="linear", min_lr_ratio=0.0)
    assert [lr_factor(s, lin) for s in (0, 5)] == pytest.approx([1.0, 0.5])
    const = cfg(steps=10, warmup_steps=2, schedule="constant")
    assert [lr_factor(s, const) for s in (0, 1, 2, 9)] == pytest.approx([1 / 3, 2 / 3, 1, 1])
    cos = cfg(steps=10, warmup_steps=0, schedule="cosine", min_lr_ratio=0.2)
    assert lr_factor(0, cos) == pytest.approx(1.0) and lr_factor(5, cos) == pytest.approx(0.6)


@pytest.mark.parametrize("bad", [dict(steps=0), dict(batch_size=0), dict(schedule="step"), dict(lr=-1.0),
                                 dict(min_lr_ratio=2.0), dict(mixed_precision="fp16"), dict(resume=True),
                                 dict(eval_batches=0), dict(grad_accum=1.5)])
def test_config_is_validated(bad):
    with pytest.raises(ValueError, match="TrainConfig"):
        cfg(**bad)


# ---- gradient accumulation --------------------------------------------------------------------
def test_grad_accum_equals_one_big_batch():
    """B x G micro-batches == one batch of B*G: losses, gradient norms and the trained adapter.

    Blocks carry different amounts of padding, so a mean of per-micro-batch means would differ
    (by 2.3e-3 in the first loss here). Run in float64 to compare the math, not fp32 rounding:
    in fp32 the losses agree to ~5e-7 but Adam (g / sqrt(v)) amplifies rounding in the small
    gradients of the scalar parameters to ~3e-5 after 3 steps (~3e-9 in float64).
    """
    blocks = make_blocks(24, 16)
    runs = []
    for b, g in ((8, 1), (2, 4), (4, 2), (1, 8)):
        model = make_model(dtype=torch.float64)
        res = train(model, blocks, None, cfg(steps=3, batch_size=b, grad_accum=g))
        runs.append((res, adapter(model)))
    (ref, ref_ad), *others = runs
    for res, ad in others:
        assert res.losses == pytest.approx(ref.losses, abs=1e-10)
        assert res.grad_norms == pytest.approx(ref.grad_norms, rel=1e-9)
        assert max_diff(ad, ref_ad) < 1e-7
        assert res.target_tokens_seen == ref.target_tokens_seen
    # fp32: the losses still agree to 1e-6
    fp32 = [train(make_model(), blocks, None, cfg(steps=2, batch_size=b, grad_accum=g)).losses
            for b, g in ((8, 1), (2, 4))]
    assert fp32[0] == pytest.approx(fp32[1], abs=1e-6)


# ---- checkpoints and resume -------------------------------------------------------------------
class Interrupt(Exception):
    pass


def test_resume_after_interruption_matches_uninterrupted_run(tmp_path):
    blocks, valid = make_blocks(20, 16, seed=1), make_blocks(6, 16, seed=2)
    # dropout on, 20 blocks with a global batch of 6: RNG state and epoch crossing both matter
    c = dict(steps=6, batch_size=3, grad_accum=2, save_every=2, eval_every=3)
    full_model = make_model(dropout=0.1)
    full = train(full_model, blocks, valid, cfg(out_dir=str(tmp_path / "a"), **c))

    def kill_at_3(step, metrics):
        if step == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(make_model(dropout=0.1), blocks, valid, cfg(out_dir=str(tmp_path / "b"), **c), callback=kill_at_3)
    state = json.loads((tmp_path / "b" / CHECKPOINT_LAST / "trainer_state.json").read_text())
    assert state["step"] == 2 and (state["epoch"], state["index"]) == (0, 12)

    resumed_model = make_model(dropout=0.1)
    resumed = train(resumed_model, blocks, valid, cfg(out_dir=str(tmp_path / "b"), resume=True, **c))
    assert resumed.start_step == 2 and resumed.steps == 6
    assert resumed.losses == pytest.approx(full.losses, abs=1e-6)
    assert resumed.lrs == pytest.approx(full.lrs, abs=1e-12)
    assert [v["loss"] for v in resumed.valid_losses] == pytest.approx([v["loss"] for v in full.valid_losses], abs=1e-6)
    assert resumed.best_step == full.best_step
    assert max_diff(adapter(resumed_model), adapter(full_model)) < 1e-6
    # the saved files: safetensors adapter, weights_only-loadable optimizer/RNG
    ck = tmp_path / "b" / CHECKPOINT_LAST
    assert max_diff(load_file(str(ck / "adapter.safetensors")), adapter(full_model)) < 1e-6
    for f in ("optimizer.pt", "rng.pt"):
        torch.load(ck / f, weights_only=True)
    assert (tmp_path / "b" / CHECKPOINT_BEST / "adapter.safetensors").is_file()
    assert not list((tmp_path / "b").glob(".tmp-*")) and not list((tmp_path / "b").glob(".old-*"))
    log = [json.loads(x) for x in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    assert any("valid_loss" in r for r in log)


def test_resume_with_more_steps_follows_the_new_schedule(tmp_path):
    """Extending a finished run (steps 2 -> 4): the resumed updates use the 4-step schedule."""
    blocks = make_blocks()
    train(make_model(), blocks, None, cfg(steps=2, warmup_steps=0, out_dir=str(tmp_path)))
    res = train(make_model(), blocks, None, cfg(steps=4, warmup_steps=0, out_dir=str(tmp_path), resume=True))
    new = cfg(steps=4, warmup_steps=0)
    assert res.lrs[2:] == pytest.approx([new.lr * lr_factor(s, new) for s in (2, 3)], rel=1e-12)
    assert res.lrs[2] > 0


def test_resume_without_checkpoint_starts_fresh(tmp_path):
    res = train(make_model(), make_blocks(), None, cfg(steps=2, out_dir=str(tmp_path), resume=True))
    assert res.start_step == 0 and res.steps == 2
    assert find_checkpoint(tmp_path) == tmp_path / CHECKPOINT_LAST


def test_crash_between_renames_falls_back_to_old_checkpoint(tmp_path):
    train(make_model(), make_blocks(), None, cfg(steps=2, out_dir=str(tmp_path)))
    (tmp_path / CHECKPOINT_LAST).rename(tmp_path / f".old-{CHECKPOINT_LAST}")
    (tmp_path / f".tmp-{CHECKPOINT_LAST}").mkdir()  # an incomplete temp dir is ignored
    found = find_checkpoint(tmp_path)
    assert found == tmp_path / f".old-{CHECKPOINT_LAST}"
    res = train(make_model(), make_blocks(), None, cfg(steps=3, out_dir=str(tmp_path), resume=True))
    assert res.start_step == 2 and res.steps == 3
    assert find_checkpoint(tmp_path) == tmp_path / CHECKPOINT_LAST
    assert not (tmp_path / f".old-{CHECKPOINT_LAST}").exists()


def test_non_finite_loss_stops_before_the_step_and_keeps_the_checkpoint(tmp_path):
    model = make_model()
    poisoned = {}

    def poison_after_2(step, metrics):
        if step == 2:
            name, p = next((n, p) for n, p in model.named_trainable_parameters() if n.endswith("lora_B"))
            with torch.no_grad():
                p.fill_(float("inf"))
            poisoned["name"] = name

    with pytest.raises(NonFiniteLossError, match=r"non-finite loss .* at step 3") as err:
        train(model, make_blocks(), None, cfg(steps=6, save_every=2, out_dir=str(tmp_path)), callback=poison_after_2)
    assert err.value.step == 3 and err.value.checkpoint.endswith(CHECKPOINT_LAST)
    assert str(tmp_path / CHECKPOINT_LAST) in str(err.value)
    ck = find_checkpoint(tmp_path)
    fresh = make_model()
    state = load_adapter_checkpoint(fresh, ck)
    assert state["step"] == 2
    assert all(torch.isfinite(v).all() for v in fresh.adapter_state_dict().values())
    for f in ("optimizer.pt", "rng.pt"):
        torch.load(ck / f, weights_only=True)
    # the stopped run did not take the optimizer step: only the poisoned tensor is non-finite
    bad = [n for n, p in model.named_trainable_parameters() if not torch.isfinite(p).all()]
    assert bad == [poisoned["name"]]
    # and the run can go on from the good checkpoint
    res = train(fresh, make_blocks(), None, cfg(steps=4, save_every=2, out_dir=str(tmp_path), resume=True))
    assert res.start_step == 2 and all(math.isfinite(x) for x in res.losses)


def test_stray_gradients_before_train_are_cleared():
    """A backward before train() must not add into the first step's gradient (clean run as reference)."""
    blocks = make_blocks()
    clean = train(make_model(), blocks, None, cfg(steps=1, max_grad_norm=0.0))
    model = make_model()
    out = model(input_ids=blocks["input_ids"][:4]).logits
    (out.float().pow(2).sum() * 100).backward()  # a large stray gradient
    assert all(p.grad is not None for p in model.trainable_parameters())
    dirty = train(model, blocks, None, cfg(steps=1, max_grad_norm=0.0))
    assert dirty.grad_norms[0] == pytest.approx(clean.grad_norms[0], rel=1e-6)
    assert all(p.grad is None for p in model.trainable_parameters())


def test_in_process_resume_after_non_finite_loss(tmp_path):
    """After a NonFiniteLossError, loading the last good checkpoint into the SAME model and
    resuming finishes, and matches resuming a fresh model from that checkpoint."""
    blocks = make_blocks()

    def poison_after_2(step, metrics):
        if step == 2:
            with torch.no_grad():
                next(p for n, p in model.named_trainable_parameters() if n.endswith("lora_B")).fill_(float("nan"))

    model = make_model()
    with pytest.raises(NonFiniteLossError):
        train(model, blocks, None, cfg(steps=5, save_every=2, out_dir=str(tmp_path / "a")), callback=poison_after_2)
    assert all(p.grad is None for p in model.trainable_parameters())
    load_adapter_checkpoint(model, find_checkpoint(tmp_path / "a"))
    res = train(model, blocks, None, cfg(steps=5, save_every=2, out_dir=str(tmp_path / "a"), resume=True))
    assert res.start_step == 2 and res.steps == 5 and all(math.isfinite(x) for x in res.losses)
    ref = make_model()
    train(ref, blocks, None, cfg(steps=5, save_every=2, out_dir=str(tmp_path / "b")))
    assert max_diff(adapter(model), adapter(ref)) <= 1e-6


# ---- torch.compile -----------------------------------------------------------------------------
@pytest.mark.parametrize("method,scope", [("lora", "model"), ("hylorada", "model"), ("lora", "blocks"),
                                          ("hylorada", "blocks")])
def test_compiled_training_matches_eager_and_never_recompiles(method, scope):
    """compile="yes" (aot_eager on the CPU): the eager losses and adapter, the graphs made at
    step 1 and reused by every later micro-batch (dynamo raises on a recompile); with scope
    "blocks" one graph serves every decoder layer."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    blocks = make_blocks()
    c = dict(steps=3, batch_size=4, grad_accum=2, max_grad_norm=0.5)
    eager_model = make_model(method, dropout=0.1)
    eager = train(eager_model, blocks, None, cfg(compile="no", **c))
    torch._dynamo.reset()
    counters.clear()
    seen = {}

    def graphs(step, metrics):
        seen[step] = (counters["frames"]["total"], counters["stats"]["unique_graphs"])

    model = make_model(method, dropout=0.1)
    # scope "model": one graph, and dynamo raises on any recompile. Scope "blocks": layer 0 gets
    # an input without grad (the frozen embedding), the later layers one with grad, and
    # transformers passes no mask to the layers when a micro-batch has no padding: at most four
    # graphs for any depth, all made at step 1 here (these blocks pad), none after.
    with torch._dynamo.config.patch(error_on_recompile=scope == "model"):
        res = train(model, blocks, None, cfg(compile="yes", compile_backend="aot_eager", compile_scope=scope, **c),
                    callback=graphs)
    assert res.compiled and not eager.compiled
    assert seen[1] == seen[3] and seen[1][1] >= 1  # compiled at step 1, nothing new after
    if scope == "blocks":
        assert seen[1][1] <= 4
    assert res.losses == pytest.approx(eager.losses, abs=1e-5)
    assert res.grad_norms == pytest.approx(eager.grad_norms, abs=1e-5)
    assert max_diff(adapter(model), adapter(eager_model)) < 1e-5


def test_resume_eager_checkpoint_with_compile_on(tmp_path):
    """The compile setting may change on resume: the eager run's losses, the new setting recorded."""
    blocks = make_blocks()
    c = dict(steps=4, save_every=2, compile_backend="aot_eager")
    full = train(make_model("lora"), blocks, None, cfg(compile="no", out_dir=str(tmp_path / "a"), **c))

    def kill_at_3(step, metrics):
        if step == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(make_model("lora"), blocks, None, cfg(compile="no", out_dir=str(tmp_path / "b"), **c), callback=kill_at_3)
    resumed = train(make_model("lora"), blocks, None, cfg(compile="yes", resume=True, out_dir=str(tmp_path / "b"), **c))
    assert resumed.compiled and resumed.start_step == 2
    assert resumed.losses == pytest.approx(full.losses, abs=1e-5)
    state = json.loads((tmp_path / "b" / CHECKPOINT_LAST / "trainer_state.json").read_text())
    assert state["compiled"] is True and state["config"]["compile"] == "yes"


def test_compile_auto_is_on_for_cuda_only_and_bad_settings_are_refused():
    from hylorada.train import _resolve_compile
    from hylorada.errors import UsageError

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert [_resolve_compile(m, "inductor", cpu) for m in ("auto", "yes", "no")] == [False, True, False]
    assert [_resolve_compile(m, "inductor", cuda) for m in ("auto", "yes", "no")] == [True, True, False]
    if not torch.cuda.is_available():  # the default config trains eagerly on the CPU
        assert train(make_model(), make_blocks(), None, cfg(steps=1)).compiled is False
    with pytest.raises(UsageError, match=r"TrainConfig.compile='on' is invalid: allowed one of \['auto', 'yes', 'no'\]"):
        cfg(compile="on")
    with pytest.raises(UsageError, match="TrainConfig.compile_backend='nope' is invalid"):
        train(make_model(), make_blocks(), None, cfg(compile="yes", compile_backend="nope"))


def test_every_train_config_field_has_help():
    import dataclasses

    for f in dataclasses.fields(TrainConfig):
        text = f.metadata.get("help", "")
        assert isinstance(text, str) and text.endswith(".") and len(text) > 20, f.name


# ---- distributed --------------------------------------------------------------------------------
@pytest.mark.dist
@pytest.mark.parametrize("scope", [None, "blocks"])
def test_two_processes_match_one(tmp_path, scope):
    """torchrun --nproc_per_node=2 (gloo, CPU) gives the adapter of one eager process, same global
    batch; also with the training forward compiled block by block inside the DDP wrapper."""
    out2 = tmp_path / "two"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(HERE / "dist_worker.py"), str(out2)] + ([scope] if scope else [])
    if torch.cuda.is_available():  # one GPU here at most: run both on the CPU (gloo)
        env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    two = json.loads((out2 / "result.json").read_text())
    assert two["world_size"] == 2
    ad_two = load_file(str(out2 / CHECKPOINT_LAST / "adapter.safetensors"))
    assert two["compiled"] is bool(scope)

    if env.get("CUDA_VISIBLE_DEVICES") == "":
        out1 = tmp_path / "one"
        proc = subprocess.run(cmd[:4] + ["--nproc_per_node=1", str(HERE / "dist_worker.py"), str(out1)], env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        one = json.loads((out1 / "result.json").read_text())
        assert one["world_size"] == 1
        assert two["losses"] == pytest.approx(one["losses"], abs=1e-5)
        ad_one = load_file(str(out1 / CHECKPOINT_LAST / "adapter.safetensors"))
        assert max_diff(ad_two, ad_one) < 1e-4
        return
    sys.path.insert(0, str(HERE))
    import dist_worker

    model, blocks, valid, config = dist_worker.setup(str(tmp_path / "one"))
    one = train(model, blocks, valid, config)
    assert one.world_size == 1
    assert two["losses"] == pytest.approx(one.losses, abs=1e-5)
    assert two["valid_losses"][-1]["loss"] == pytest.approx(one.valid_losses[-1]["loss"], abs=1e-5)
    assert max_diff(ad_two, adapter(model)) < 1e-4


def test_fsdp_two_processes_match_one(tmp_path):
    """FSDP1 over 2 gloo processes (a unit per decoder layer, frozen base and trainable adapters in
    one unit, as docs/accelerate/fsdp.yaml; tests/dist_worker.py wraps by hand) gives the losses,
    the global gradient norms (each rank holds only its shard's gradients) and the validation
    losses (every rank runs every batch through the wrapped model) of one eager process."""
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=os.pathsep.join(
        [str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    worker = str(HERE / "dist_worker.py")
    results = {}
    for name, extra in (("fsdp", ["--nproc_per_node=2", worker, str(tmp_path / "fsdp"), "fsdp"]),
                        ("one", ["--nproc_per_node=1", worker, str(tmp_path / "one")])):
        proc = subprocess.run(run + extra, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        results[name] = json.loads((tmp_path / name / "result.json").read_text())
    fsdp, one = results["fsdp"], results["one"]
    assert fsdp["world_size"] == 2 and len(fsdp["losses"]) == 4
    assert fsdp["losses"] == pytest.approx(one["losses"], rel=1e-5)
    for rank in (0, 1):  # the norm that clips is the global one on every rank, whatever its shards hold
        seen = json.loads((tmp_path / "fsdp" / f"result-{rank}.json").read_text())["grad_norms"]
        assert seen == pytest.approx(one["grad_norms"], rel=1e-4), rank
    assert [v["loss"] for v in fsdp["valid_losses"]] == pytest.approx([v["loss"] for v in one["valid_losses"]], rel=1e-5)


def test_fsdp_refuses_checkpoints(tmp_path):
    """Under FSDP the adapters are shards: a run that would write checkpoints stops at once."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    import hylorada.train as tr

    class FakeFSDP(FullyShardedDataParallel):
        def __init__(self, module):  # an FSDP instance for isinstance, no process group
            torch.nn.Module.__init__(self)

    model, blocks = make_model(dropout=0.0), make_blocks(8, 16, seed=1)
    with pytest.MonkeyPatch.context() as mp:
        from accelerate import Accelerator

        mp.setattr(Accelerator, "prepare_model", lambda self, m: FakeFSDP(m))
        with pytest.raises(tr.UsageError, match="FSDP"):
            train(model, blocks, None, cfg(out_dir=str(tmp_path / "run"), steps=1, batch_size=2))
    assert not (tmp_path / "run").exists()


def test_fsdp_accelerator_refuses_checkpoints_before_wrapping(tmp_path):
    """An accelerator configured for FSDP (accelerate launch --config_file fsdp.yaml) and an
    out_dir: the UsageError comes before the model is touched (prepare_model never runs)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    import hylorada.train as tr

    class FSDPAccelerator(Accelerator):
        distributed_type = property(lambda self: DistributedType.FSDP)

        def prepare_model(self, *a, **k):
            raise AssertionError("wrapped before the refusal")

    with pytest.raises(tr.UsageError, match="FSDP"):
        train(make_model(), make_blocks(8, 16), None, cfg(out_dir=str(tmp_path / "run"), steps=1, batch_size=2),
              accelerator=FSDPAccelerator(cpu=True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_autocast_and_resume(tmp_path):
    """On CUDA, mixed_precision='auto' trains under bf16 autocast (fp32 adapters) and resumes exactly."""
    blocks = make_blocks(20, 16, seed=1)
    c = dict(steps=4, batch_size=4, save_every=2, mixed_precision="auto")
    full_model = make_model(dropout=0.1).cuda()
    full = train(full_model, blocks, None, cfg(out_dir=str(tmp_path / "a"), **c))
    assert full.mixed_precision == "bf16" and all(math.isfinite(x) for x in full.losses)
    assert all(p.dtype == torch.float32 and p.is_cuda for p in full_model.trainable_parameters())

    def kill_at_3(step, metrics):
        if step == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(make_model(dropout=0.1).cuda(), blocks, None, cfg(out_dir=str(tmp_path / "b"), **c), callback=kill_at_3)
    resumed_model = make_model(dropout=0.1).cuda()
    resumed = train(resumed_model, blocks, None, cfg(out_dir=str(tmp_path / "b"), resume=True, **c))
    assert resumed.start_step == 2
    assert resumed.losses == pytest.approx(full.losses, abs=1e-6)
    assert max_diff(adapter(resumed_model), adapter(full_model)) < 1e-6


def test_compile_forward_blocks_leaves_the_model_alone_and_shares_its_parameters():
    """Scope "blocks": the returned module's decoder layers are compiled wrappers around the very
    same layer objects (one set of parameters); the model's own layers stay plain modules."""
    from hylorada.nn.compile import compile_forward

    model = make_model("lora")
    layers = model.base_model.layers
    f = compile_forward(model, "blocks", backend="aot_eager")
    new_layers = f.base_model.layers
    assert all(type(a).__name__ == "OptimizedModule" for a in new_layers)
    assert all(a._orig_mod is b for a, b in zip(new_layers, layers))
    assert all(type(b).__name__ != "OptimizedModule" for b in layers)
    assert {id(p) for p in f.parameters()} == {id(p) for p in model.parameters()}


def test_compile_forward_blocks_share_one_graph_across_depth():
    """Scope "blocks" on a 4-layer Llama, a batch without padding: two graphs (layer 0, whose
    input needs no grad, and the three later layers sharing one), not one per layer."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    from transformers import AutoModelForCausalLM, LlamaConfig

    from hylorada.nn.compile import compile_forward

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64))
    model = HyLoRADAModel(base, HyLoRADAConfig(method="lora", lora_rank=4, target_modules="all-linear"))
    model.train()
    torch._dynamo.reset()
    counters.clear()
    ids = torch.randint(0, 64, (2, 16))
    compile_forward(model, "blocks", backend="aot_eager", dynamic=False)(
        input_ids=ids, labels=ids, use_cache=False).loss.backward()
    assert counters["stats"]["unique_graphs"] == 2


def test_compile_forward_blocks_falls_back_to_model_when_blocks_differ(caplog):
    """Blocks whose ranks differ (rank allocation per layer) would each need a graph of their
    own: scope "blocks" compiles the model whole instead, and says so."""
    import logging

    from hylorada.compress import CompressConfig, compress_model
    from hylorada.nn.compile import blocks_alike, compile_forward

    model = make_model("lora")
    assert blocks_alike(model)
    assert all(type(a).__name__ == "OptimizedModule" for a in compile_forward(model, "blocks").base_model.layers)
    base = tiny_llama()
    compress_model(base, CompressConfig(method="svd", ratio=0.2, overrides={"layers.0.mlp.up_proj": 8}))
    assert not blocks_alike(base)
    with caplog.at_level(logging.INFO, logger="hylorada.nn.compile"):
        f = compile_forward(base, "blocks", backend="aot_eager")
    assert type(f).__name__ == "OptimizedModule" and f._orig_mod is base
    assert "blocks differ" in caplog.text
