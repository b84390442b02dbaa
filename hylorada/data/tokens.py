"""Tokenization with an on-disk cache.

`eval_ids` joins documents with "\\n\\n" and tokenizes once (the tokenizer's default special
tokens, as in the usual WikiText protocol); `token_stream` tokenizes documents separately (no
special tokens) and joins them with EOS. Both cache their result on disk
(`<cache>/tokens/*.safetensors`), keyed by a fingerprint of the tokenizer and a hash of the text.
"""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from .. import assets
from ..utils.io import atomic_write

log = logging.getLogger(__name__)

EVAL_JOIN = "\n\n"


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
        atomic_write(path, lambda tmp: save_file({"ids": ids.to(torch.int32).contiguous()}, str(tmp)))
    return ids


def encode(tokenizer, texts, add_special_tokens: bool):
    """The ids of `texts` (a string or a list of them), with or without the tokenizer's default
    special tokens, without its too-long-sequence warning."""
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
        for i, ids in enumerate(encode(tokenizer, docs, False) if docs else []):
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
        return torch.tensor(encode(tokenizer, EVAL_JOIN.join(docs), True), dtype=torch.long)

    return _cached("eval", tokenizer, docs, cache, compute).reshape(1, -1)

