"""Worker for test_train.py::test_two_processes_match_one (run under torchrun, CPU + gloo).

`setup(out_dir)` is shared with the single-process reference so both use the same model,
data and TrainConfig. Usage: torchrun --nproc_per_node=2 tests/dist_worker.py OUT_DIR [SCOPE]; with SCOPE ("blocks" or
"model") the training forward is compiled in that scope (backend aot_eager: the CPU reference).
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


def main() -> None:
    out = sys.argv[1]
    model, blocks, valid, config = setup(out, sys.argv[2] if len(sys.argv) > 2 else None)
    result = train(model, blocks, valid, config)  # ends the (self-created) accelerator at the end
    if int(os.environ.get("RANK", "0")) == 0:
        (Path(out) / "result.json").write_text(json.dumps(result.to_dict()))

if __name__ == "__main__":
    main()
