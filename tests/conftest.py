"""Tiny models built from configs in code (no hub), shared by every test module."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

VOCAB = 128


def tiny_llama(seed: int = 0, **overrides) -> torch.nn.Module:
    """Llama: no biases, grouped-query attention (4 query heads, 2 kv heads)."""
    cfg = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
               tie_word_embeddings=False)
    cfg.update(overrides)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(LlamaConfig(**cfg)).eval()


def tiny_qwen2(seed: int = 0, **overrides) -> torch.nn.Module:
    """Qwen2: q/k/v projections carry biases; tied embeddings."""
    cfg = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
               tie_word_embeddings=True)
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(Qwen2Config(**cfg)).eval()
    with torch.no_grad():  # random (non-zero) biases so that bias handling is actually tested
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
    return model


def tiny_gpt2(seed: int = 0, **overrides) -> torch.nn.Module:
    """GPT-2: fused qkv `Conv1D` layers (weight stored as d_in x d_out), biases everywhere; no
    dropout, so train mode is deterministic."""
    cfg = dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=256,
               bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(GPT2Config(**cfg)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
    return model


def copy_adapters_into_peft(ours, theirs) -> None:
    """Give a peft model the very A, B (and DoRA magnitude) of our HyLoRADAModel, layer by layer,
    so that the two outputs can be compared."""
    with torch.no_grad():
        for name, layer in ours.adapter_layers():
            pl = theirs.base_model.model.get_submodule(name)
            pl.lora_A["default"].weight.copy_(layer.lora_A)
            pl.lora_B["default"].weight.copy_(layer.lora_B)
            if getattr(layer, "method", None) == "dora":
                pl.lora_magnitude_vector["default"].weight.copy_(layer.magnitude)


FACTORIES = {"llama": tiny_llama, "qwen2": tiny_qwen2, "gpt2": tiny_gpt2}


@pytest.fixture(params=sorted(FACTORIES))
def arch(request) -> str:
    return request.param


@pytest.fixture
def input_ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(123)
    return torch.randint(0, VOCAB, (2, 12), generator=g)


# ---- a tiny model folder + tokenizer + corpus, for the CLI-level tests (benchmark, tune)
WORDS = [f"w{i}" for i in range(100)]


def make_tiny_assets(root: Path) -> tuple[str, str]:
    """A tiny Llama + WordLevel tokenizer saved as a transformers folder, and a jsonl corpus."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[PAD]": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="</s>")
    folder = root / "tiny-model"
    tiny_llama().save_pretrained(folder)
    fast.save_pretrained(folder)
    rng = random.Random(0)
    data = root / "tiny.jsonl"
    with open(data, "w") as fh:
        for _ in range(40):
            fh.write(json.dumps({"text": " ".join(rng.choice(WORDS[:30]) for _ in range(60))}) + "\n")
    return str(folder), str(data)


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread (and do not fight other processes for the cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny_assets(tmp_path, monkeypatch):
    monkeypatch.setenv("HYLORADA_CACHE", str(tmp_path / "cache"))
    return make_tiny_assets(tmp_path)
