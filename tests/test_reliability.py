"""The promises of docs/RELIABILITY.md: no data loss at output paths, atomic outputs that survive
kill -9, compressed/merged folders that reload exactly (and that plain transformers refuses),
loud failure on missing weights, no overwriting of checkpoints, archives verified before use."""
from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_assets, tiny_llama

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------- helpers
def cli(*args: str, env_extra: dict | None = None, wait: bool = True, cache: Path | None = None):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    if cache is not None:
        env["HYLORADA_CACHE"] = str(cache)
    env.update(env_extra or {})
    cmd = [sys.executable, "-m", "hylorada.cli", *args]
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def snapshot(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under `folder` (the folder itself included if a file)."""
    if folder.is_file():
        return {".": hashlib.sha256(folder.read_bytes()).hexdigest()}
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".hylorada-tmp-" in p.name or ".hylorada-old-" in p.name)


def compress_args(model: str, out: Path, *extra: str) -> list[str]:
    return ["compress", "--model", model, "--method", "svd", "--ratio", "0.3", "--no-eval", "--no-progress",
            "--out", str(out), *extra]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny model and corpus, and one `compress --out` of it (copied by the tests that use it)."""
    root = tmp_path_factory.mktemp("tiny")
    model, data = make_tiny_assets(root)
    comp = root / "compressed"
    proc = cli(*compress_args(model, comp), cache=root / "cache")
    assert proc.returncode == 0, proc.stderr
    return {"root": root, "model": model, "data": data, "cache": root / "cache", "compressed": comp}


def copy_compressed(tiny, dest: Path) -> Path:
    import shutil

    shutil.copytree(tiny["compressed"], dest)
    return dest


# ------------------------------------------------------------------- 1. nothing at --out is lost
def test_compress_refuses_a_file_and_a_foreign_folder_before_any_work(tiny, tmp_path):
    victim = tmp_path / "notes.txt"
    victim.write_text("my notes")
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    for out in (victim, foreign):
        before = snapshot(out)
        t0 = time.perf_counter()
        proc = cli(*compress_args(tiny["model"], out), cache=tiny["cache"])
        assert proc.returncode != 0, proc.stdout
        assert str(out) in proc.stderr and "--out" in proc.stderr
        assert "factorised" not in proc.stdout  # refused before the compression ran
        assert snapshot(out) == before
        assert time.perf_counter() - t0 < 60
    assert leftovers(tmp_path) == []


def test_previous_output_needs_overwrite_and_foreign_files_inside_block_it(tiny, tmp_path):
    out = copy_compressed(tiny, tmp_path / "c")
    first = snapshot(out)
    proc = cli(*compress_args(tiny["model"], out, "--ratio", "0.5"), cache=tiny["cache"])
    assert proc.returncode != 0 and "--overwrite" in proc.stderr
    assert snapshot(out) == first
    (out / "my-notes.txt").write_text("mine")
    proc = cli(*compress_args(tiny["model"], out, "--overwrite"), cache=tiny["cache"])
    assert proc.returncode != 0 and "my-notes.txt" in proc.stderr
    assert (out / "my-notes.txt").read_text() == "mine"
    (out / "my-notes.txt").unlink()
    proc = cli("compress", "--model", tiny["model"], "--method", "svd", "--ratio", "0.6", "--no-eval",
               "--no-progress", "--out", str(out), "--overwrite", cache=tiny["cache"])
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "compress.json").read_text())["report"]["config"]["ratio"] == 0.6
    assert leftovers(tmp_path) == []


def test_library_writers_refuse_foreign_folders(tmp_path):
    from hylorada.compress import CompressConfig, compress_model, save_compressed
    from hylorada.config import HyLoRADAConfig
    from hylorada.errors import UsageError
    from hylorada.model import HyLoRADAModel

    foreign = tmp_path / "f"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("keep")
    model = tiny_llama()
    compress_model(model, CompressConfig(method="svd", ratio=0.3))
    wrapped = HyLoRADAModel(tiny_llama(), HyLoRADAConfig(method="lora"))
    for write in (lambda p, **k: save_compressed(model, p, **k), wrapped.save_adapter, wrapped.export_peft):
        with pytest.raises(UsageError, match="not written by hylorada"):
            write(foreign, overwrite=True)
        assert snapshot(foreign) == {"keep.txt": hashlib.sha256(b"keep").hexdigest()}
    wrapped.save_adapter(tmp_path / "a")
    with pytest.raises(UsageError, match="overwrite"):
        wrapped.save_adapter(tmp_path / "a")
    wrapped.save_adapter(tmp_path / "a", overwrite=True)
    with pytest.raises(UsageError, match="adapter output"):  # another kind of our outputs
        save_compressed(model, tmp_path / "a", overwrite=True)


def test_clean_stale_removes_dead_temps_restores_dead_swaps_and_keeps_the_rest(tmp_path):
    from hylorada.utils.io import clean_stale

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "x"
    (tmp_path / f".x.hylorada-tmp-{dead.pid}-ab").mkdir()
    (tmp_path / f".x.hylorada-old-{dead.pid}-cd").mkdir()
    (tmp_path / f".x.hylorada-old-{dead.pid}-cd" / "model.safetensors").write_text("old output")
    (tmp_path / f".x.hylorada-tmp-{os.getpid()}-ef").mkdir()  # a live writer's: untouched
    (tmp_path / ".x.other").mkdir()  # not our pattern: untouched
    clean_stale(out)
    assert (out / "model.safetensors").read_text() == "old output"  # killed mid-swap: restored
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["x", f".x.hylorada-tmp-{os.getpid()}-ef", ".x.other"])


# ------------------------------------------------------------------------- 5. the fault test
@pytest.mark.parametrize("point", ["fill", "swap"])
def test_kill_9_during_compress_keeps_the_previous_output(tiny, tmp_path, point):
    """kill -9 while the new output is complete in its temp folder ("fill") or between the two
    renames ("swap"); the old output stays intact, and the next run leaves no temp folder."""
    out = copy_compressed(tiny, tmp_path / "c")
    before = snapshot(out)
    proc = cli(*compress_args(tiny["model"], out, "--ratio", "0.5", "--overwrite"), wait=False,
               cache=tiny["cache"], env_extra={"HYLORADA_FAULT_PAUSE": f"{point}:60"})
    tag = ".hylorada-tmp-" if point == "fill" else ".hylorada-old-"
    deadline = time.time() + 120
    while not any(tag in n for n in leftovers(tmp_path)) and time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert leftovers(tmp_path)  # the killed run left its temp folder (or the old copy)
    if point == "fill":
        assert snapshot(out) == before
    # loading restores a replacement killed mid-swap; the old output is exactly the old one
    from hylorada.loading import load_model

    load_model(out)
    assert snapshot(out) == before
    rerun = cli(*compress_args(tiny["model"], out, "--ratio", "0.5", "--overwrite"), cache=tiny["cache"])
    assert rerun.returncode == 0, rerun.stderr
    assert leftovers(tmp_path) == []
    assert json.loads((out / "compress.json").read_text())["report"]["config"]["ratio"] == 0.5


# --------------------------------------------------- 2. compressed and merged folders reload exactly
def _compressed_folder(tiny, tmp_path) -> Path:
    return copy_compressed(tiny, tmp_path / "c")


def test_plain_transformers_refuses_a_compressed_folder(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    out = _compressed_folder(tiny, tmp_path)
    with pytest.raises(ValueError, match="hylorada_compressed"):
        AutoModelForCausalLM.from_pretrained(out)


def test_finetune_merge_of_a_compressed_model_reloads_exactly(tiny, tmp_path):
    """finetune --merge on a compressed model: OUT/merged loads through load_model with the
    factors the run merged, i.e. the same logits as the base + the saved adapter (unmerged)."""
    from hylorada.compress.factorized import FactorizedLinear
    from hylorada.loading import load_model
    from hylorada.model import HyLoRADAModel

    comp = _compressed_folder(tiny, tmp_path)
    out = tmp_path / "f"
    proc = cli("finetune", "--model", str(comp), "--data", tiny["data"], "--steps", "3", "--seq-len", "16",
               "--batch-size", "2", "--eval-seq-len", "16", "--max-eval-tokens", "64", "--lr", "1e-2",
               "--no-progress", "--merge", "--out", str(out), cache=tiny["cache"])
    assert proc.returncode == 0, proc.stderr
    merged, tok = load_model(out / "merged")
    assert any(isinstance(m, FactorizedLinear) for m in merged.modules())
    base, _ = load_model(comp)
    adapted = HyLoRADAModel.from_pretrained(base, out / "adapter").eval()
    ids = torch.tensor([tok(" ".join(f"w{i}" for i in range(20)))["input_ids"]])
    with torch.no_grad():
        want, got = adapted(input_ids=ids).logits, merged(input_ids=ids).logits
        unadapted = load_model(comp)[0](input_ids=ids).logits
    assert (got - want).abs().max().item() < 1e-4
    assert (want - unadapted).abs().max().item() > 1e-3  # the adapter is not a no-op


def test_merged_compressed_save_reload_is_bit_exact(tiny, tmp_path):
    from hylorada.recipes.finetune import save_merged as _save_merged
    from hylorada.config import HyLoRADAConfig
    from hylorada.loading import load_model
    from hylorada.model import HyLoRADAModel

    comp = _compressed_folder(tiny, tmp_path)
    base, tok = load_model(comp)
    wrapped = HyLoRADAModel(base, HyLoRADAConfig(method="hylorada", target_modules="all-linear"))
    with torch.no_grad():
        for p in wrapped.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    merged = wrapped.merge_and_unload()
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = merged(input_ids=ids).logits
    _save_merged(merged, tok, tmp_path / "m")
    with torch.no_grad():
        got = load_model(tmp_path / "m")[0](input_ids=ids).logits
    assert torch.equal(got, ref)


def _drop_tensor(weights: Path, prefix: str) -> str:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(weights))
    key = next(k for k in sorted(tensors) if k.startswith(prefix) or prefix in k)
    del tensors[key]
    save_file(tensors, str(weights), metadata={"format": "pt"})
    return key


def test_a_missing_tensor_is_an_error_naming_file_and_key(tiny, tmp_path):
    import shutil

    from hylorada.errors import HyloradaError
    from hylorada.loading import load_model

    comp = _compressed_folder(tiny, tmp_path)
    key = _drop_tensor(comp / "model.safetensors", "model.layers.0.mlp")
    with pytest.raises(HyloradaError) as err:
        load_model(comp)
    assert key in str(err.value) and "model.safetensors" in str(err.value)
    plain = tmp_path / "plain"
    shutil.copytree(tiny["model"], plain)
    key = _drop_tensor(plain / "model.safetensors", "model.layers.1.self_attn.q_proj")
    with pytest.raises(HyloradaError) as err:
        load_model(plain)
    assert key in str(err.value) and str(plain) in str(err.value)


# ------------------------------------------------------------------- 3. checkpoints are not overwritten
def test_finetune_refuses_a_folder_with_checkpoints_without_resume(tiny, tmp_path):
    out = tmp_path / "run"
    args = ["finetune", "--model", tiny["model"], "--data", tiny["data"], "--steps", "2", "--seq-len", "16",
            "--batch-size", "2", "--eval-seq-len", "16", "--max-eval-tokens", "64", "--no-progress",
            "--no-eval-before", "--out", str(out)]
    assert cli(*args, cache=tiny["cache"]).returncode == 0
    before = snapshot(out)
    proc = cli(*args, cache=tiny["cache"])
    assert proc.returncode != 0
    assert "--resume" in proc.stderr and "checkpoint-last" in proc.stderr
    assert "global batch" not in proc.stdout  # refused before loading data
    assert snapshot(out) == before
    proc = cli(*args, "--overwrite", "--steps", "3", cache=tiny["cache"])
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "checkpoint-last" / "trainer_state.json").read_text())["step"] == 3
    assert leftovers(tmp_path) == []


def _train_tiny(out_dir, **kw):
    """LoRA on a tiny Llama, trained by hylorada.train into `out_dir` (4 blocks of 8 tokens)."""
    from hylorada.config import HyLoRADAConfig
    from hylorada.model import HyLoRADAModel
    from hylorada.train import TrainConfig, train

    g = torch.Generator().manual_seed(0)
    blocks = {"input_ids": torch.randint(0, 100, (4, 8), generator=g),
              "attention_mask": torch.ones(4, 8, dtype=torch.long)}
    blocks["labels"] = blocks["input_ids"].clone()
    model = HyLoRADAModel(tiny_llama(), HyLoRADAConfig(method="lora"))
    return train(model, blocks, None, TrainConfig(batch_size=2, out_dir=str(out_dir), progress=False,
                                                  log_every=0, **kw))


def test_train_refuses_to_overwrite_checkpoints(tmp_path):
    from hylorada.errors import UsageError

    def run(**kw):
        return _train_tiny(tmp_path, steps=1, **kw)

    run()
    state = (tmp_path / "checkpoint-last" / "trainer_state.json").read_bytes()
    with pytest.raises(UsageError, match="resume"):
        run()
    assert (tmp_path / "checkpoint-last" / "trainer_state.json").read_bytes() == state


# --------------------------------------------------------------- 4. archives verified before use
EVIL_SETUP = """import os, pathlib
pathlib.Path(os.environ["HYLORADA_TEST_MARK"]).write_text("setup.py ran")
from setuptools import setup
setup(name="evilpkg", version="1.0")
"""


@pytest.fixture
def evil_index(tmp_path, monkeypatch):
    """A pip configured with only a local find-links folder holding an sdist whose setup.py
    leaves a mark when it runs."""
    links = tmp_path / "links"
    links.mkdir()
    archive = links / "evilpkg-1.0.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        for name, text in (("evilpkg-1.0/setup.py", EVIL_SETUP),
                           ("evilpkg-1.0/PKG-INFO", "Metadata-Version: 2.1\nName: evilpkg\nVersion: 1.0\n"),
                           ("evilpkg-1.0/data/text.txt", "payload\n")):
            info = tarfile.TarInfo(name)
            info.size = len(text.encode())
            tf.addfile(info, io.BytesIO(text.encode()))
    mark = tmp_path / "MARK"
    for k in [k for k in os.environ if k.startswith("PIP_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    monkeypatch.setenv("HYLORADA_TEST_MARK", str(mark))
    monkeypatch.setenv("HYLORADA_CACHE", str(tmp_path / "cache"))
    from hylorada.assets import Asset

    sha = hashlib.sha256(archive.read_bytes()).hexdigest()
    asset = Asset(key="evil", package="evilpkg", version="1.0", archive=archive.name, archive_sha256=sha,
                  members={"evilpkg-1.0/data/text.txt": hashlib.sha256(b"payload\n").hexdigest()})
    return {"asset": asset, "mark": mark, "dest": tmp_path / "dest"}


def test_archive_from_the_index_is_verified_and_nothing_in_it_runs(evil_index):
    import dataclasses

    from hylorada import assets

    e = evil_index
    bad = dataclasses.replace(e["asset"], archive_sha256="0" * 64)
    with pytest.raises(assets.AssetError, match="sha256"):
        assets.fetch(bad)
    assert not e["mark"].exists()
    path = assets.fetch(e["asset"])["evilpkg-1.0/data/text.txt"]
    assert path.read_text() == "payload\n"
    assert not e["mark"].exists()  # the right archive: still nothing ran


def test_pip_fallback_rejects_a_wrong_hash_before_any_build_step(evil_index):
    """The fallback (`pip download` in hash-checking mode) with a wrong pinned hash: pip refuses
    the archive before running its setup.py (no mark, no "Preparing metadata")."""
    import dataclasses

    from hylorada import assets

    e = evil_index
    e["dest"].mkdir()
    bad = dataclasses.replace(e["asset"], archive_sha256="0" * 64)
    with pytest.raises(assets.AssetError, match="sha256 differs") as err:
        assets.pip_download_hashed(bad, e["dest"])
    assert not e["mark"].exists()
    assert "Preparing metadata" not in str(err.value) and "egg_info" not in str(err.value)
    assert sorted(p.name for p in e["dest"].iterdir()) == []


# ----------------------------------------------------------------------------------- no pickle
class _Evil:
    def __init__(self, mark: str) -> None:
        self.mark = mark

    def __reduce__(self):
        return (Path(self.mark).write_text, ("unpickling ran code",))


def test_a_crafted_checkpoint_pickle_is_refused(tmp_path):
    """resume loads optimizer.pt with weights_only=True: a pickle that would run code is refused."""
    import pickle

    def run(**kw):
        return _train_tiny(tmp_path, steps=2, **kw)

    run(save_every=1)
    mark = tmp_path / "MARK"
    (tmp_path / "checkpoint-last" / "optimizer.pt").write_bytes(pickle.dumps(_Evil(str(mark))))
    from hylorada.errors import HyloradaError

    with pytest.raises(HyloradaError, match="optimizer.pt") as info:  # refused, the file named
        run(resume=True)
    assert isinstance(info.value.__cause__, pickle.UnpicklingError)
    assert not mark.exists()


def test_no_unsafe_deserialisation_in_the_package():
    """Every torch.load passes weights_only=True; no pickle/marshal/yaml.load of files."""
    bad = []
    for path in (ROOT / "hylorada").rglob("*.py"):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if "torch.load(" in code and "weights_only=True" not in code:
                bad.append(f"{path.name}:{i}")
            if any(s in code for s in ("pickle.load", "marshal.load", "yaml.load(", "trust_remote_code=True")):
                bad.append(f"{path.name}:{i}")
    assert bad == []
