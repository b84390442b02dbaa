"""A .gguf file given by path is dequantized once and cached by the sha256 of its bytes
(hylorada/loading.py `gguf_folder`): later loads read the cached safetensors folder.

The GGUF files here are real: a 2-layer Llama with a byte-level tokenizer written with
`gguf.GGUFWriter` and read back by transformers' own GGUF loader.
"""
from __future__ import annotations

import hashlib
import shutil

import pytest
import torch

from hylorada import loading

pytest.importorskip("gguf")


def write_tiny_gguf(path, seed: int = 0, context: int = 64) -> None:
    """A float32 Llama GGUF (hidden 16, 2 layers) whose byte-level tokenizer round-trips text."""
    import gguf
    import numpy as np
    from tokenizers import pre_tokenizers

    rng = np.random.default_rng(seed)
    tokens = ["<unk>", "<s>", "</s>", *sorted(pre_tokenizers.ByteLevel.alphabet())]
    V, H, I, L = len(tokens), 16, 32, 2
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(context), w.add_embedding_length(H), w.add_block_count(L)
    w.add_feed_forward_length(I), w.add_head_count(2), w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5), w.add_rope_freq_base(10000.0), w.add_vocab_size(V)
    w.add_tokenizer_model("gpt2"), w.add_tokenizer_pre("default"), w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (V - 3)), w.add_token_merges([]), w.add_token_scores([0.0] * V)
    w.add_bos_token_id(1), w.add_eos_token_id(2), w.add_unk_token_id(0)

    def rand(*shape):
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    w.add_tensor("token_embd.weight", rand(V, H))
    w.add_tensor("output_norm.weight", np.ones(H, np.float32))
    w.add_tensor("output.weight", rand(V, H))
    for i in range(L):
        for name, shape in [("attn_q", (H, H)), ("attn_k", (H, H)), ("attn_v", (H, H)),
                            ("attn_output", (H, H)), ("ffn_gate", (I, H)), ("ffn_up", (I, H)),
                            ("ffn_down", (H, I))]:
            w.add_tensor(f"blk.{i}.{name}.weight", rand(*shape))
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(H, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(H, np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file()
    w.close()


@pytest.fixture
def counted(tmp_path, monkeypatch):
    """The cache in tmp_path; a list that records every real dequantization (`_load_gguf`)."""
    monkeypatch.setenv("HYLORADA_CACHE", str(tmp_path / "cache"))
    calls = []
    real = loading._load_gguf

    def spy(path, dtype):
        calls.append(path.name)
        return real(path, dtype)

    monkeypatch.setattr(loading, "_load_gguf", spy)
    return calls


def _logits(model):
    x = torch.tensor([[1, 40, 41, 42, 100, 7]])
    with torch.no_grad():
        return model(input_ids=x).logits


def test_a_gguf_path_is_converted_once_and_keyed_by_its_sha256(tmp_path, counted):
    gguf = tmp_path / "tiny.gguf"
    write_tiny_gguf(gguf)
    direct, _ = loading._load_gguf(gguf, torch.float32)  # transformers' dequantization, uncached
    counted.clear()
    first, tok = loading.load_model(gguf)
    assert counted == ["tiny.gguf"]
    folder = tmp_path / "cache" / "models" / f"gguf-{hashlib.sha256(gguf.read_bytes()).hexdigest()}"
    assert (folder / "model.safetensors").is_file() and (folder / loading.STAMP).is_file()
    again, _ = loading.load_model(str(gguf))
    moved = tmp_path / "elsewhere" / "renamed.gguf"  # same bytes, another name: the same cache entry
    moved.parent.mkdir()
    shutil.copy(gguf, moved)
    third, _ = loading.load_model(moved)
    assert counted == ["tiny.gguf"]  # no second dequantization
    assert torch.equal(_logits(first), _logits(direct)) and torch.equal(_logits(again), _logits(direct))
    assert torch.equal(_logits(third), _logits(direct))
    assert tok.decode(tok(loading.ROUNDTRIP_SAMPLE, add_special_tokens=False)["input_ids"]) == loading.ROUNDTRIP_SAMPLE


def test_a_changed_file_or_a_damaged_cache_is_converted_again(tmp_path, counted):
    gguf = tmp_path / "tiny.gguf"
    write_tiny_gguf(gguf, seed=0)
    a, _ = loading.load_model(gguf)
    write_tiny_gguf(gguf, seed=1)  # same path, other weights: a new key
    b, _ = loading.load_model(gguf)
    assert counted == ["tiny.gguf", "tiny.gguf"] and not torch.equal(_logits(a), _logits(b))
    folders = sorted((tmp_path / "cache" / "models").glob("gguf-*"))
    assert len(folders) == 2
    expected = _logits(b)  # before the damage: `b` may be memory-mapped from the cached file
    weights = loading.gguf_folder(gguf) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)  # same size, other bytes
    c, _ = loading.load_model(gguf)
    assert len(counted) == 3 and torch.equal(_logits(c), expected)
    assert not any(p.name.startswith(".gguf-") and p.is_dir() for p in (tmp_path / "cache" / "models").iterdir())
