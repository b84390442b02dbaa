"""Text generation from a (compressed, adapted) model: the prompt is rendered with the
tokenizer's chat template when it has one, then `model.generate` runs unchanged.

`generate(...)` returns exactly what `model.generate(**encode_prompt(...), **kwargs)` returns,
decoded; `tests/test_generate_export.py` checks that equality.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class GenerationSettings:
    """Decoding options; `do_sample=False` is greedy (temperature/top_p/top_k are then unused)."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        from ..errors import UsageError

        if self.max_new_tokens < 1:
            raise UsageError(f"max_new_tokens={self.max_new_tokens} is invalid: allowed an integer >= 1")
        if not self.temperature > 0:
            raise UsageError(f"temperature={self.temperature} is invalid: allowed a number > 0")
        if not 0 < self.top_p <= 1:
            raise UsageError(f"top_p={self.top_p} is invalid: allowed a number in (0, 1]")
        if self.top_k < 0:
            raise UsageError(f"top_k={self.top_k} is invalid: allowed an integer >= 0 (0 = off)")

    def generate_kwargs(self, tokenizer) -> dict:
        kw = dict(max_new_tokens=self.max_new_tokens, do_sample=self.do_sample)
        if self.do_sample:
            kw.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is not None:
            kw["pad_token_id"] = pad
        return kw


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def encode_prompt(tokenizer, prompt: str, chat: bool | None = None, device="cpu") -> dict:
    """input_ids/attention_mask of the prompt; with `chat` (default: when the tokenizer has a chat
    template) the prompt is one user turn followed by the generation prompt."""
    chat = has_chat_template(tokenizer) if chat is None else chat
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        enc = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    else:
        enc = tokenizer(prompt, return_tensors="pt")
    return {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}


@torch.no_grad()
def generate(model, tokenizer, prompt: str, settings: GenerationSettings | None = None,
             chat: bool | None = None, streamer=None) -> str:
    """The new text (prompt excluded, special tokens skipped) that `model.generate` produces."""
    settings = settings or GenerationSettings()
    device = next(model.parameters()).device
    enc = encode_prompt(tokenizer, prompt, chat, device)
    torch.manual_seed(settings.seed)
    out = model.generate(**enc, **settings.generate_kwargs(tokenizer), streamer=streamer)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
