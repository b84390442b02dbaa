"""User data: files, folders and Hugging Face datasets as documents, the user-data split rule,
and the one entry `load_documents` (named corpora and user data alike). docs/DATA.md has the rules.

User data (`DataSpec`: --data, --text-field, --data-config, --train/--valid/--test, --loss-on):
a `.txt` file is one document; a folder is one document per `*.txt` (sorted by name), else the
rows of its data files; `.json/.jsonl/.csv/.parquet` files are read by the `datasets` library's
local loaders (offline), one document per row from the column `text_field` (default "messages"
when present, else "text"); another name is loaded as a Hugging Face dataset (its own
train/validation/test when it has all three). Empty and whitespace-only documents are dropped
with a logged count. A column of [{role, content}] lists is chat (data/chat.py).

User-data split rule (fixed, in order, never random; `split_user_documents`): by documents with
the named corpora's rule (data/corpora.py) when that gives every split a document (so such data
split as before); otherwise by paragraphs (blank-line separated), else by lines, with
`assign_contiguous`: the final units holding 5% of the characters are test, the 5% before them
valid, the rest (90%) train. A split given as a file (--train/--valid/--test) is used whole.
`split="all"` is every document.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from .. import assets
from ..errors import UsageError
from .chat import render_chat
from .corpora import CORPORA, LOADERS, SPLITS, DataSpec, Document, as_spec, assign_splits
from .tokens import eval_ids

log = logging.getLogger(__name__)

USER_SPLIT_PERCENT: dict[str, int] = {"train": 90, "valid": 5, "test": 5}
DATA_SUFFIXES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}

def corpus_documents(name_or_path) -> list[Document]:
    """All documents of a named corpus (canonical order) or of a user source (a file, folder or
    dataset name; a DataSpec's `source`), empty and whitespace-only documents dropped."""
    spec = as_spec(name_or_path)
    if spec.source in LOADERS:
        return LOADERS[spec.source]()
    if spec.source is None:
        raise UsageError("no data given: give --data (a corpus, file, folder or dataset) or --train/--valid/--test")
    return _user_data(spec).all


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
    if spec.source in LOADERS:
        docs = LOADERS[spec.source]()
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

# ----------------------------------------------------------------------------- reading sources
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

