"""The compiled training path (issue 14): every adapter method, its dropout and the DoRA-family
row norm trace into one graph (no graph breaks), a compiled forward + backward equals the eager
one, and training steps under torch.compile do not recompile.

The compiled side runs through torch.compile with the "aot_eager" backend (dynamo + AOT autograd,
no code generation: fast on CPU); the eager side is the plain module. Tolerance 1e-5 in fp32.
"""
from __future__ import annotations

import pytest
import torch
import torch._dynamo as dynamo
from conftest import VOCAB, tiny_llama
from torch._dynamo.utils import counters

from hylorada import HyLoRADAConfig, HyLoRADAModel
from hylorada.compress import CompressConfig, compress_model

METHODS = ["lora", "dora", "lorada", "hylorada"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CASES = [(m, p, train) for m in METHODS for p in (0.0, 0.05) for train in (True, False)]
TOL = dict(rtol=1e-5, atol=1e-5)


@torch.no_grad()
def _randomize(model: HyLoRADAModel, seed: int = 3) -> None:
    """B non-zero and every scale moved off its init, so that each gradient is non-trivial."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_trainable_parameters():
        noise = torch.randn(p.shape, generator=g) * 0.1
        p.copy_(noise) if name.endswith("lora_B") else p.add_(noise)


def _wrapped(method: str, p: float, train: bool, base=None) -> HyLoRADAModel:
    base = tiny_llama(num_hidden_layers=1) if base is None else base
    model = HyLoRADAModel(base, HyLoRADAConfig(method=method, lora_rank=4, lora_dropout=p,
                                               target_modules=TARGETS))
    _randomize(model)
    return model.train(train)


def _ids(seed: int = 5) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))


def _compressed_base() -> torch.nn.Module:
    base = tiny_llama(num_hidden_layers=1)
    compress_model(base, CompressConfig(method="svd", ratio=0.4, rank_multiple=1))
    return base


def _break_count(model, ids) -> int:
    dynamo.reset()
    explained = dynamo.explain(model)(input_ids=ids, labels=ids)
    dynamo.reset()
    return explained.graph_break_count


@pytest.mark.parametrize("method, p, train", CASES)
def test_no_graph_breaks(method, p, train):
    assert _break_count(_wrapped(method, p, train), _ids()) == 0


@pytest.mark.parametrize("method", ["dora", "hylorada"])
def test_no_graph_breaks_under_bf16_autocast(method):
    """The GPU training setting: bf16 weights (adapters kept in fp32), bf16 autocast; the fused
    path reads the autocast dtype and applies c in fp32 inside the graph."""
    model = _wrapped(method, 0.05, True, tiny_llama(num_hidden_layers=1).to(torch.bfloat16))
    assert model.trainable_parameters()[0].dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _break_count(model, _ids()) == 0


@pytest.mark.parametrize("method", ["lora", "hylorada"])
def test_no_graph_breaks_on_factorized_bases(method):
    """Adapters on a compressed model (FactorizedLinear bases: the recovery path), and the
    compressed model alone."""
    ids = _ids()
    assert _break_count(_wrapped(method, 0.05, True, _compressed_base()), ids) == 0
    assert _break_count(_compressed_base(), ids) == 0


def _forward_backward(model, run, ids, seed=11):
    """Loss, logits and every trainable parameter's gradient of one forward + backward (the
    dropout masks drawn from the same seeded stream)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = run(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_trainable_parameters()}
    return out.loss.detach(), out.logits.detach(), grads


@pytest.mark.parametrize("method, p, train", CASES)
def test_compiled_equals_eager(method, p, train):
    model, ids = _wrapped(method, p, train), _ids()
    loss, logits, grads = _forward_backward(model, model, ids)
    dynamo.reset()
    c_loss, c_logits, c_grads = _forward_backward(model, torch.compile(model, backend="aot_eager"), ids)
    dynamo.reset()
    torch.testing.assert_close(c_logits, logits, **TOL)
    torch.testing.assert_close(c_loss, loss, **TOL)
    assert set(c_grads) == set(grads) and len(grads) > 0
    for name, g in grads.items():
        assert g.abs().max() > 0, name  # every adapter gradient is exercised
        torch.testing.assert_close(c_grads[name], g, **TOL, msg=lambda m: f"{name}: {m}")


def test_compiled_equals_eager_on_factorized_bases():
    model, ids = _wrapped("hylorada", 0.05, True, _compressed_base()), _ids()
    loss, logits, grads = _forward_backward(model, model, ids)
    dynamo.reset()
    c_loss, c_logits, c_grads = _forward_backward(model, torch.compile(model, backend="aot_eager"), ids)
    dynamo.reset()
    torch.testing.assert_close(c_logits, logits, **TOL)
    for name, g in grads.items():
        torch.testing.assert_close(c_grads[name], g, **TOL, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("method", METHODS)
def test_training_steps_do_not_recompile(method):
    """3 steps of forward / backward / AdamW on the compiled model: one graph, compiled once
    (error_on_recompile raises on a second compilation of the same frame)."""
    model, ids = _wrapped(method, 0.05, True), _ids()
    opt = torch.optim.AdamW(model.parameter_groups(1e-2), lr=1e-2)
    before = [p.detach().clone() for p in model.trainable_parameters()]
    dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="aot_eager")
    with dynamo.config.patch(error_on_recompile=True):
        for _ in range(3):
            compiled(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    unique = counters["stats"]["unique_graphs"]
    dynamo.reset()
    assert unique == 1, f"{unique} graphs compiled in 3 steps"
    assert all(not torch.equal(a, b) for a, b in zip(before, model.trainable_parameters()))


def test_blocks_scope_inside_ddp(tmp_path):
    """compile_forward(DDP(model), "blocks") compiles the decoder blocks inside the DDP wrapper
    (not the wrapper whole: issue 16's compiled 2-GPU run) and equals the eager model, loss,
    logits and gradients (one gloo process: DDP's reducer runs, the all-reduce is the identity)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from hylorada.nn.compile import compile_forward

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model, ids = _wrapped("hylorada", 0.0, True, base=tiny_llama(num_hidden_layers=2)), _ids()
        loss, logits, grads = _forward_backward(model, model, ids)
        ddp = DistributedDataParallel(model)
        run = compile_forward(ddp, "blocks", backend="aot_eager", dynamic=False)
        compiled = [m for m in run.modules() if isinstance(m, dynamo.eval_frame.OptimizedModule)]
        assert isinstance(run, DistributedDataParallel) and len(compiled) == 2  # one per block
        c_loss, c_logits, c_grads = _forward_backward(model, run, ids)
    finally:
        dist.destroy_process_group()
        dynamo.reset()
    torch.testing.assert_close(c_logits, logits, **TOL)
    torch.testing.assert_close(c_loss, loss, **TOL)
    for name, g in grads.items():
        torch.testing.assert_close(c_grads[name], g, **TOL, msg=lambda m: f"{name}: {m}")


def test_blocks_scope_falls_back_to_model_under_fsdp(tmp_path):
    """An FSDP-wrapped model is compiled whole: a shallow copy of FSDP units would share their
    internal state (one gloo process, FSDP1 on the CPU)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel

    from hylorada.nn.compile import compile_forward

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model = _wrapped("hylorada", 0.0, True, base=tiny_llama(num_hidden_layers=2))
        fsdp = FullyShardedDataParallel(model, device_id=torch.device("cpu"), use_orig_params=True)
        run = compile_forward(fsdp, "blocks", backend="aot_eager")
        assert isinstance(run, dynamo.eval_frame.OptimizedModule) and run._orig_mod is fsdp
    finally:
        dist.destroy_process_group()
        dynamo.reset()
