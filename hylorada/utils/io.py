"""The one writer of every output folder and file hylorada writes (docs/RELIABILITY.md).

Contract of an output folder `X` (compress --out, finetune's adapter/ and merged/, analyze
--out, save_compressed, save_adapter, export_peft):

1. Before any work, `check_output_dir(X, overwrite=...)` refuses with `UsageError`
   - a path that exists and is not a folder (a file, a link);
   - a non-empty folder hylorada did not write (no `.hylorada` stamp, no legacy marker);
   - a previous output of ours unless `overwrite=True` (CLI `--overwrite`);
   - a previous output of ours holding files it did not write (they are never deleted).
   An empty folder counts as new (nothing in it can be lost).
2. The output is written into a temporary sibling `.X.hylorada-tmp-<pid>-<hex>`, every file
   and folder fsynced, the stamp `.hylorada` written last, then renamed onto `X`:
   - `X` absent or empty: one `rename` (atomic);
   - `X` a previous output: `rename(X, .X.hylorada-old-<pid>-<hex>)`, `rename(tmp, X)`, then the
     old copy is deleted. Until the second rename the old output is intact under one of the
     two names.
3. `clean_stale(X)`, run at the start of every write, removes what a killed run left: a
   `.X.hylorada-tmp-*` of a dead process is deleted; a `.X.hylorada-old-*` of a dead process is
   renamed back to `X` when `X` is missing (killed between the two renames), else deleted.
   Only these two name patterns are touched, and only when their pid is not running.

Work folders that grow over a run (finetune --out with its checkpoints, benchmark --out with
its cells) are claimed with `claim_work_dir`: created and stamped when new, accepted when
ours, refused when foreign.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

from ..errors import UsageError

STAMP_NAME = ".hylorada"
STAMP_VERSION = 1
TMP_TAG = ".hylorada-tmp-"
OLD_TAG = ".hylorada-old-"
FAULT_ENV = "HYLORADA_FAULT_PAUSE"  # tests only: "fill:S" / "swap:S" sleeps S seconds there


# ---------------------------------------------------------------------------------- stamps
def write_stamp(folder: Path, kind: str, files: Iterable[str] | None = None) -> None:
    """`folder/.hylorada`: {"written_by": "hylorada", "kind", "stamp_version", "files"}.
    `files` (the top-level names we wrote) lets a later --overwrite see foreign files."""
    doc = {"written_by": "hylorada", "kind": kind, "stamp_version": STAMP_VERSION,
           "files": None if files is None else sorted(set(files) - {STAMP_NAME})}
    atomic_write_text(Path(folder) / STAMP_NAME, json.dumps(doc, indent=1) + "\n")


def read_stamp(folder: Path) -> dict | None:
    try:
        doc = json.loads((Path(folder) / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and doc.get("written_by") == "hylorada" else None


def json_field(path: Path, key: str):
    """doc[key] of the JSON object in `path`; None if unreadable, not an object, or absent."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc.get(key) if isinstance(doc, dict) else None


def ours(folder: str | os.PathLike) -> str | None:
    """The kind of hylorada output `folder` is (its stamp, or a marker file written before stamps
    existed), or None when hylorada did not write it."""
    folder = Path(folder)
    stamp = read_stamp(folder)
    if stamp is not None:
        return str(stamp.get("kind"))
    if json_field(folder / "compress.json", "format") == "hylorada.compressed":
        return "compressed"
    if any(json_field(folder / n, "format") == "hylorada"
           for n in ("hylorada_adapter.json", "adapter_config.json")):  # current, legacy name
        return "adapter"
    if (json_field(folder / "finetune.json", "command") == "finetune"
            or (folder / "checkpoint-last" / "trainer_state.json").is_file()):
        return "finetune"
    cells = folder / "cells"
    if cells.is_dir() and all(e.suffix == ".json" and e.is_file() for e in cells.iterdir()):
        return "benchmark"  # results.json and cells/*.json (or cells copied in to be merged)
    if (folder / "analysis.json").is_file() and (folder / "spectra.safetensors").is_file():
        return "analyze"
    return None


# ---------------------------------------------------------------------------------- checks
def check_output_dir(path: str | os.PathLike, *, overwrite: bool = False, flag: str = "--out",
                     known: Iterable[str] = (), kind: str | tuple[str, ...] | None = None) -> bool:
    """Raise UsageError unless writing the output folder `path` loses nothing (module doc, 1).
    Returns True when `path` is a previous output of ours that will be replaced. `known`: names
    that may be in an output of ours whose stamp lists no files (work folders). `kind`: the
    kind(s) of output that may be replaced (another kind of hylorada output is refused)."""
    p = Path(path).expanduser()
    if p.is_symlink() or (p.exists() and not p.is_dir()):
        raise UsageError(f"{flag} {p}: exists and is not a folder; hylorada never replaces a path it "
                         f"did not write. Choose another {flag}.")
    _check_parent_writable(p, flag)
    if not p.exists() or not any(p.iterdir()):
        return False
    found = ours(p)
    if found is None:
        raise UsageError(f"{flag} {p}: folder exists and was not written by hylorada (no {STAMP_NAME} "
                         f"stamp); refusing to replace it. Choose a new or empty folder for {flag}.")
    if not overwrite:
        raise UsageError(f"{flag} {p}: holds a previous hylorada output ({found}); pass --overwrite "
                         "(library: overwrite=True) to replace it, or choose another folder.")
    wanted = (kind,) if isinstance(kind, str) else kind
    if wanted and found not in wanted:
        raise UsageError(f"{flag} {p}: holds a hylorada {found} output, which this command does not "
                         f"write ({'/'.join(wanted)}); choose another folder.")
    stamp = read_stamp(p) or {}
    known = set(known)
    if isinstance(stamp.get("files"), list) or known:
        allowed = set(stamp.get("files") or ()) | known | {STAMP_NAME}
        foreign = sorted(e.name for e in p.iterdir() if e.name not in allowed)
        if foreign:
            raise UsageError(f"{flag} {p}: holds files hylorada did not write ({', '.join(foreign[:5])}"
                             f"{', ...' if len(foreign) > 5 else ''}); move them away or choose another "
                             "folder (they are never deleted).")
    return True


def _check_parent_writable(p: Path, flag: str) -> None:
    parent = p.parent
    while not parent.exists():
        if parent.parent == parent:
            break
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"{flag} {p}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {p}: cannot write into {parent} (permission denied); choose a "
                         "writable location")


# ---------------------------------------------------------------------------------- cleanup
def _pid_of(name: str, tag: str) -> int | None:
    try:
        return int(name.split(tag, 1)[1].split("-", 1)[0])
    except (IndexError, ValueError):
        return None


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(path: str | os.PathLike) -> list[str]:
    """Remove (or restore) what a killed writer of `path` left (module doc, 3); returns a line per
    action. Touches only `.NAME.hylorada-tmp-<pid>-*` / `.NAME.hylorada-old-<pid>-*` of dead pids."""
    p = Path(path).expanduser()
    if not p.parent.is_dir():
        return []
    done = []
    for tag in (OLD_TAG, TMP_TAG):  # old first: a restore must happen before anything else
        prefix = f".{p.name}{tag}"
        for entry in sorted(p.parent.iterdir()):
            if not entry.name.startswith(prefix) or entry.is_symlink() or not entry.is_dir():
                continue
            pid = _pid_of(entry.name, tag)
            if pid is None or _alive(pid):
                continue
            if tag == OLD_TAG and not p.exists():
                os.rename(entry, p)
                done.append(f"restored {p} from {entry.name} (a run was killed while replacing it)")
            else:
                shutil.rmtree(entry, ignore_errors=True)
                done.append(f"removed {entry} (left by a killed run)")
    return done


# ---------------------------------------------------------------------------------- writing
def _fault_pause(point: str) -> None:
    spec = os.environ.get(FAULT_ENV, "")
    if spec.startswith(point + ":"):
        time.sleep(float(spec.split(":", 1)[1]))


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def finish_tree(root: Path) -> None:
    """Usual umask modes (mkstemp and safetensors make owner-only files), fsync everything."""
    umask = os.umask(0)
    os.umask(umask)
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            fp = os.path.join(dirpath, f)
            os.chmod(fp, 0o666 & ~umask)
            with open(fp, "rb") as fh:
                os.fsync(fh.fileno())
        os.chmod(dirpath, 0o777 & ~umask)
        fsync_dir(Path(dirpath))


def new_temp_sibling(path: Path) -> Path:
    tmp = path.parent / f".{path.name}{TMP_TAG}{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir(parents=True)
    return tmp


def commit_dir(tmp: Path, path: Path, kind: str, *, files: Iterable[str] | None = None) -> None:
    """Stamp `tmp`, fsync it and rename it onto `path` (module doc, 2)."""
    write_stamp(tmp, kind, [e.name for e in tmp.iterdir()] if files is None else files)
    finish_tree(tmp)
    _fault_pause("fill")
    replace_dir(tmp, path, path.parent / f".{path.name}{OLD_TAG}{os.getpid()}-{secrets.token_hex(4)}")


def replace_dir(tmp: Path, path: Path, old: Path) -> None:
    """Rename the finished folder `tmp` onto `path`. A non-empty `path` is first renamed to `old`
    (which must not exist) and deleted after the swap: until the second rename the previous
    content is intact under one of the two names. The parent folder is fsynced."""
    if path.is_dir() and any(path.iterdir()):
        os.rename(path, old)
        _fault_pause("swap")
        os.rename(tmp, path)
        fsync_dir(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, path)  # onto a missing or empty folder; fails (never destroys) otherwise
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike, *, kind: str, overwrite: bool = False,
                      flag: str = "--out", checked: bool = False) -> Iterator[Path]:
    """`with atomic_output_dir(X, kind=...) as tmp:` fill `tmp`; on a normal exit it replaces `X`
    atomically, on an exception it is deleted and `X` is untouched. `checked=True`: the caller
    already ran check_output_dir (or owns `X`, e.g. a cache folder)."""
    path = Path(path).expanduser()
    clean_stale(path)  # first: a killed replacement is restored before the checks look at `path`
    if not checked:
        check_output_dir(path, overwrite=overwrite, flag=flag, kind=kind)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = new_temp_sibling(path)
    try:
        yield tmp
        if not checked:  # something may have appeared at `path` while we worked
            check_output_dir(path, overwrite=overwrite, flag=flag, kind=kind)
        commit_dir(tmp, path, kind)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def claim_work_dir(path: str | os.PathLike, kind: str, *, flag: str = "--out") -> Path:
    """A folder a run keeps writing into (finetune checkpoints, benchmark cells): created and
    stamped (files=None) when new or empty, accepted when ours, UsageError otherwise."""
    p = Path(path).expanduser()
    clean_stale(p)
    if p.is_symlink() or (p.exists() and not p.is_dir()):
        raise UsageError(f"{flag} {p}: exists and is not a folder; choose another {flag}.")
    _check_parent_writable(p, flag)
    if p.is_dir() and any(e.name != STAMP_NAME for e in p.iterdir()):
        found = ours(p)
        if found is None:
            raise UsageError(f"{flag} {p}: folder exists and was not written by hylorada (no "
                             f"{STAMP_NAME} stamp); choose a new or empty folder for {flag}.")
        if found != kind:
            raise UsageError(f"{flag} {p}: holds a hylorada {found} output, not a {kind} folder; "
                             f"choose another {flag}.")
        if read_stamp(p) is None:
            write_stamp(p, kind, None)
        return p
    p.mkdir(parents=True, exist_ok=True)
    write_stamp(p, kind, None)
    return p


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Create `path` atomically: `write(tmp)` fills a temporary file in the same folder, which is
    fsynced and renamed over `path` (os.replace); if `write` raises, `path` is untouched and the
    temporary file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically (`atomic_write`)."""
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
