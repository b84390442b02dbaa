"""Worker for test_train.py::test_two_processes_match_one (run under torchrun, CPU + gloo).

`setup(out_dir)` is shared with the single-process reference so both use the same model,
data and TrainConfig. Usage: torchrun --nproc_per_node=2 tests/dist_worker.py OUT_DIR [SCOPE]; with SCOPE ("blocks" or
"model") the training forward is compiled in that scope (backend aot_eager: the CPU reference).
SCOPE "fsdp": eager, the model wrapped by torch's FSDP1 as docs/accelerate/fsdp.yaml asks (a unit
per decoder layer, use_orig_params, FULL_SHARD), by hand (`wrap_fsdp`: accelerate refuses FSDP
without a GPU), no checkpoints (not supported under FSDP yet); rank 0 writes OUT_DIR/result.json and every
rank OUT_DIR/result-RANK.json.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from conftest import VOCAB, tiny_llama
from hylorada.config import HyLoRADAConfig
from hylorada.model import HyLoRADAModel
from hylorada.train import TrainConfig, train


def setup(out_dir: str, scope: str | None = None):
    model = HyLoRADAModel(tiny_llama(0), HyLoRADAConfig(method="hylorada", lora_rank=4, lora_alpha=8.0,
                                                        lora_dropout=0.0, lora_plus_enabled=True))
    g = torch.Generator().manual_seed(11)
    n, L = 18, 16
    ids = torch.randint(1, VOCAB, (n, L), generator=g)
    mask = torch.ones_like(ids)
    for i in range(0, n, 4):  # some right padding: the global-token normalisation matters
        mask[i, int(torch.randint(2, L, (1,), generator=g)):] = 0
    ids = ids.masked_fill(mask == 0, 0)
    blocks = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    valid = {k: v[:5].clone() for k, v in blocks.items()}
    # batch_size 3 over 2 processes: an uneven split (2 + 1) on purpose
    config = TrainConfig(steps=4, batch_size=3, grad_accum=2, lr=5e-3, warmup_steps=1, weight_decay=0.01,
                         eval_every=2, save_every=2, out_dir=out_dir, progress=False, log_every=0,
                         mixed_precision="no", seed=3, compile="yes" if scope else "no",
                         compile_scope=scope or "model", compile_backend="aot_eager")
    return model, blocks, valid, config


def wrap_fsdp(accelerator) -> None:
    """accelerator.prepare_model wraps with FSDP1 the way accelerate does under fsdp.yaml (on the CPU)."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    accelerator.prepare_model = lambda m: FullyShardedDataParallel(
        m, device_id=torch.device("cpu"), use_orig_params=True, auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}))


def main() -> None:
    out, scope = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else None)
    if scope == "fsdp":
        from accelerate import Accelerator

        model, blocks, valid, config = setup(None)
        accelerator = Accelerator(cpu=True, mixed_precision="no")
        wrap_fsdp(accelerator)
        result = train(model, blocks, valid, config, accelerator=accelerator)
        Path(out).mkdir(parents=True, exist_ok=True)
        rank = int(os.environ.get("RANK", "0"))  # every rank's view (each holds its own shards)
        (Path(out) / f"result-{rank}.json").write_text(json.dumps(result.to_dict()))
    else:
        model, blocks, valid, config = setup(out, scope)
        result = train(model, blocks, valid, config)
    if int(os.environ.get("RANK", "0")) == 0:
        (Path(out) / "result.json").write_text(json.dumps(result.to_dict()))

if __name__ == "__main__":
    main()
