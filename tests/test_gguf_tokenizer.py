"""A tokenizer that comes from a GGUF file must round-trip text before any number is reported
(hylorada/loading.py); the tested transformers version is the package's lower bound."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import tiny_llama
from hylorada import loading
from hylorada.errors import HyloradaError


def _byte_level_tokenizer():
    """A byte-level BPE tokenizer (no merges): round-trips any text, as a sound tokenizer does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(sorted(alphabet))}}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_a_sound_tokenizer_passes():
    tok = _byte_level_tokenizer()
    loading.check_tokenizer_roundtrip(tok, "sound.gguf")  # no error
    assert tok.decode(tok(loading.ROUNDTRIP_SAMPLE)["input_ids"], skip_special_tokens=True) == loading.ROUNDTRIP_SAMPLE


def _broken(tok, monkeypatch):
    """The same tokenizer, monkeypatched to lose every second space when decoding (the kind of
    damage a mis-built GGUF vocabulary does)."""
    real = type(tok).decode

    def lossy(self, ids, **kw):
        text = real(self, ids, **kw)
        parts = text.split(" ")
        return "".join(p + (" " if i % 2 == 0 else "") for i, p in enumerate(parts[:-1])) + parts[-1]

    monkeypatch.setattr(type(tok), "decode", lossy)
    return tok


def test_a_broken_tokenizer_is_refused_naming_file_version_and_advice(monkeypatch):
    tok = _broken(_byte_level_tokenizer(), monkeypatch)
    with pytest.raises(HyloradaError) as e:
        loading.check_tokenizer_roundtrip(tok, "/models/gemma.gguf")
    msg = str(e.value)
    assert "/models/gemma.gguf" in msg and "round-trip" in msg
    assert f"transformers {loading._transformers_version()}" in msg
    assert f"transformers>={loading.TESTED_TRANSFORMERS}" in msg


def test_load_model_checks_a_gguf_tokenizer_before_returning(tmp_path, monkeypatch):
    """load_model on a .gguf path runs the check (the GGUF reader is replaced by a tiny model;
    the file is converted once into the cache, and the check runs on every load)."""
    monkeypatch.setenv("HYLORADA_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF")
    tok = _byte_level_tokenizer()
    monkeypatch.setattr(loading, "_load_gguf", lambda path, dtype: (tiny_llama(vocab_size=300), tok))
    model, got = loading.load_model(str(gguf))
    assert got.get_vocab() == tok.get_vocab()
    _broken(tok, monkeypatch)
    with pytest.raises(HyloradaError, match=re.escape(str(gguf))):
        loading.load_model(str(gguf))


def test_load_model_checks_a_converted_alias(tmp_path, monkeypatch):
    """An alias loads from its converted folder: the check runs there too."""
    folder = tmp_path / "converted"
    tiny_llama(vocab_size=300).save_pretrained(folder)
    _byte_level_tokenizer().save_pretrained(folder)
    monkeypatch.setitem(loading.MODEL_ALIASES, "tiny-alias", ("tiny-asset", "tiny.Q4.gguf"))
    monkeypatch.setattr(loading, "converted_folder", lambda alias, **kw: folder)
    loading.load_model("tiny-alias")
    from transformers import PreTrainedTokenizerFast

    real = PreTrainedTokenizerFast.decode
    monkeypatch.setattr(PreTrainedTokenizerFast, "decode", lambda self, ids, **kw: real(self, ids, **kw)[:-1])
    with pytest.raises(HyloradaError, match="tiny.Q4.gguf"):
        loading.load_model("tiny-alias")


def test_pyproject_requires_the_tested_transformers():
    from importlib.metadata import version

    from packaging.version import Version

    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    m = re.search(r'"transformers>=([0-9.]+)"', text)
    assert m and m.group(1) == loading.TESTED_TRANSFORMERS
    assert Version(version("transformers")) >= Version(loading.TESTED_TRANSFORMERS)


@pytest.mark.slow
def test_smollm2_tokenizer_round_trips():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(loading.converted_folder("smollm2-135m"))
    loading.check_tokenizer_roundtrip(tok, "smollm2-135m")
