"""peft's LoRA and DoRA as reference rows: a peft model with the interface hylorada.train.train uses."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


class PeftAdapter(nn.Module):
    """A peft `PeftModel` with the methods `hylorada.train.train` uses.

    Parameter groups follow HyLoRADAModel.parameter_groups: lora_A, lora_B (x LoRA+ ratio when
    on) and the 1-D magnitudes ("scalars", base lr, no weight decay)."""

    def __init__(self, peft_model: nn.Module, lora_plus_ratio: float | None = None) -> None:
        super().__init__()
        self.peft_model = peft_model
        self.lora_plus_ratio = lora_plus_ratio

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.peft_model(*args, **kwargs)

    def named_trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.peft_model.named_parameters() if p.requires_grad]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_trainable_parameters()]

    def parameter_groups(self, lr: float, weight_decay: float = 0.0) -> list[dict[str, Any]]:
        groups: dict[str, list[nn.Parameter]] = {"lora_A": [], "lora_B": [], "scalars": []}
        for name, p in self.named_trainable_parameters():
            key = "lora_A" if ".lora_A." in name else "lora_B" if ".lora_B." in name else "scalars"
            groups[key].append(p)
        ratio = self.lora_plus_ratio or 1.0
        spec = {"lora_A": (lr, weight_decay), "lora_B": (lr * ratio, weight_decay), "scalars": (lr, 0.0)}
        return [{"name": k, "params": v, "lr": spec[k][0], "weight_decay": spec[k][1]}
                for k, v in groups.items() if v]

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.named_trainable_parameters()}

    @torch.no_grad()
    def load_adapter_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        own = dict(self.named_trainable_parameters())
        if set(own) != set(state):
            raise ValueError("adapter state does not fit this peft model")
        for k, p in own.items():
            p.copy_(state[k])


def peft_row(model: nn.Module, row: str, rank: int, alpha: float, dropout: float, targets) -> PeftAdapter:
    """peft-lora / peft-dora on the layers `targets` matches (hylorada/model.py `match_targets`)."""
    from peft import LoraConfig, get_peft_model

    from ...model import match_targets

    names = match_targets(model, targets)
    pcfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=names,
                      use_dora=row == "peft-dora", bias="none", init_lora_weights=True)
    return PeftAdapter(get_peft_model(model, pcfg))
