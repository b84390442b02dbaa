"""Load a causal LM and its tokenizer: `load_model(name_or_path) -> (model, tokenizer)`.

`name_or_path` is one of
- an alias in `MODEL_ALIASES` (default `smollm2-135m`: SmolLM2-135M-Instruct from a Q4_1 GGUF
  in the package registry, see `hylorada.assets`). The GGUF is dequantized and converted ONCE
  into a plain safetensors transformers folder in the cache (`<cache>/models/<alias>/`), so
  later loads take about a second instead of ~20 s;
- a local transformers folder (has `config.json`);
- a local `.gguf` file (dequantized by transformers, needs the `gguf` package; converted once
  into `<cache>/models/gguf-<sha256 of the file>/` the same way, see `gguf_folder`);
- a hub id such as `HuggingFaceTB/SmolLM2-135M` (only where a hub is reachable).

The model is returned in eval mode, on `device`, with weights in `dtype`.

GGUF tokenizers are rebuilt by transformers from the file's vocabulary, and some versions get
it wrong (transformers 5.17 tokenizes a Gemma-3 GGUF into 1.8x the tokens 5.23 gives), which
makes every perplexity wrong. So a tokenizer that comes from a GGUF (a `.gguf` path or an alias,
whose converted folder holds the tokenizer transformers built from the GGUF) must round-trip
`ROUNDTRIP_SAMPLE`: decode(encode(x)) == x, without special tokens and without clean-up of
spaces (`check_tokenizer_roundtrip`); otherwise `load_model` raises HyloradaError before any
number is computed. TESTED_TRANSFORMERS is the version the tests pass on (pyproject.toml's
lower bound).
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch

from . import assets
from .nn.cast import cast_weights  # noqa: F401 (also hylorada.loading.cast_weights)
from .utils.io import atomic_output_dir, clean_stale, json_field

log = logging.getLogger(__name__)

TESTED_TRANSFORMERS = "5.23.0"
ROUNDTRIP_SAMPLE = ("In the beginning God created the heaven and the earth.\n\n"
                    "To be, or not to be: that is the question -- 1611, 1623; \"quoted\" (parens)\n"
                    "  two spaces, a tab\there, caf\u00e9 na\u00efve \u00c6sop.\n")

# alias -> (asset key, GGUF member)
MODEL_ALIASES: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("smollm2-135m-gguf", assets.SMOLLM2_GGUF_MEMBER),
}
STAMP = "hylorada_stamp.json"  # written last into a converted folder: file sizes and sha256s

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower().removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}") from None


def load_model(name_or_path: str | os.PathLike = "smollm2-135m", dtype: torch.dtype | str = torch.float32,
               device: str | torch.device = "cpu"):
    """Returns `(model, tokenizer)`; the model in eval mode on `device` with `dtype` weights.
    A folder written by `save_compressed` (it has compress.json) loads as the compressed model.
    Any weight the checkpoint lacks, has in excess or has in another shape raises HyloradaError
    (never a warning followed by randomly initialised layers)."""
    from transformers import AutoTokenizer

    dtype = resolve_dtype(dtype)
    name = str(name_or_path)
    t0 = time.perf_counter()
    if name not in MODEL_ALIASES and not Path(name).expanduser().exists():
        clean_stale(Path(name))  # an output a killed run was replacing is put back (utils/io.py)
    if name in MODEL_ALIASES:
        folder = converted_folder(name)
        model = _from_pretrained_strict(folder, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        check_tokenizer_roundtrip(tokenizer, f"{folder} (converted from {MODEL_ALIASES[name][1]})")
    elif Path(name).expanduser().is_dir():
        model, tokenizer = _load_folder(Path(name).expanduser(), dtype)
    elif name.lower().endswith(".gguf"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"no such GGUF file: {path}")
        folder = gguf_folder(path)  # dequantized once, cached by the file's sha256
        model = _from_pretrained_strict(folder, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        check_tokenizer_roundtrip(tokenizer, f"{path} (converted to {folder})")
    else:
        if Path(name).exists() or name.startswith((".", "/", "~")):
            raise FileNotFoundError(f"{name!r} is neither a model folder nor a .gguf file")
        try:  # a hub id
            model = _from_pretrained_strict(name, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(name)
        except OSError as e:
            raise ValueError(
                f"could not load {name!r}: it is not a known alias ({sorted(MODEL_ALIASES)}), a local "
                f"folder or .gguf file, and the hub id could not be loaded ({e.__class__.__name__}: {e})"
            ) from e
    cast_weights(model, dtype)
    model.to(device=device)
    model.eval()
    log.info("loaded %s in %.1f s", name, time.perf_counter() - t0)
    return model, tokenizer


def check_tokenizer_roundtrip(tokenizer, source: str, sample: str = ROUNDTRIP_SAMPLE) -> None:
    """Raise HyloradaError unless decode(encode(sample)) == sample (no special tokens added,
    special tokens skipped in decoding, no clean-up of spaces); `source` names the file."""
    from .errors import HyloradaError

    try:
        ids = tokenizer(sample, add_special_tokens=False)["input_ids"]
        back = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    except Exception as e:  # noqa: BLE001 - any failure here means the tokenizer is unusable
        back, why = None, f"encoding/decoding failed ({type(e).__name__}: {e})"
    if back == sample:
        return
    if back is not None:
        i = next((k for k, (a, b) in enumerate(zip(sample, back)) if a != b), min(len(sample), len(back)))
        why = (f"decode(encode(x)) != x: first difference at character {i}, expected "
               f"{sample[i:i + 12]!r}, got {back[i:i + 12]!r}")
    raise HyloradaError(
        f"the tokenizer of {source} does not round-trip text: {why}. Its token counts and "
        f"perplexities would be wrong. transformers {_transformers_version()} is installed; install the "
        f"tested version: pip install 'transformers>={TESTED_TRANSFORMERS}'")


def _transformers_version() -> str:
    try:
        from importlib.metadata import version
        return version("transformers")
    except Exception:  # noqa: BLE001
        return "(unknown version)"


def _load_folder(folder: Path, dtype: torch.dtype):
    """A local transformers folder, or a hylorada compressed folder (compress.json)."""
    from transformers import AutoTokenizer

    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a transformers model folder (no config.json)")
    if (folder / "compress.json").is_file():  # written by hylorada.compress.save_compressed
        from .compress import load_compressed
        model = load_compressed(folder, dtype=dtype)
        # the config.json of a compressed folder is a marker: give the tokenizer the real config
        return model, AutoTokenizer.from_pretrained(folder, config=model.config)
    if json_field(folder / "config.json", "model_type") == "hylorada_compressed":
        from .errors import HyloradaError
        raise HyloradaError(f"{folder}: a hylorada compressed folder without compress.json (incomplete "
                            "copy?); copy the whole folder again")
    return _from_pretrained_strict(folder, dtype=dtype), AutoTokenizer.from_pretrained(folder)


def _from_pretrained_strict(source, **kwargs):
    """AutoModelForCausalLM.from_pretrained that raises HyloradaError when transformers reports
    missing, unexpected or mismatched weights (it would initialise them at random and warn)."""
    from transformers import AutoModelForCausalLM

    from .errors import HyloradaError

    model, info = AutoModelForCausalLM.from_pretrained(source, output_loading_info=True, **kwargs)
    bad = {k: sorted(map(str, info.get(k) or ())) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if any(bad.values()):
        where = f"{source}" + (f" ({kwargs['gguf_file']})" if kwargs.get("gguf_file") else "")
        raise HyloradaError(
            f"{where}: the checkpoint does not match the model: "
            + "; ".join(f"{k.replace('_', ' ')} {v[:10]}{' ...' if len(v) > 10 else ''}" for k, v in bad.items() if v)
            + ". Refusing to run with randomly initialised weights; the files are incomplete or "
              "belong to another architecture.")
    return model


def _load_gguf(path: Path, dtype: torch.dtype):
    """Dequantize a GGUF file with transformers (needs `gguf` and `accelerate`)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = _from_pretrained_strict(path.parent, gguf_file=path.name, dtype=dtype)
    return model, tokenizer


def _plain_copy(model):
    """A copy of a GGUF-loaded model rebuilt from its config without `quantization_config`
    (transformers refuses to `save_pretrained` a GGUF-loaded model)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.pop("_name_or_path", None)
    config = AutoConfig.for_model(**cfg)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    # tied weights may be listed once; anything else is an error
    tied = {k for k in missing if k.endswith("lm_head.weight") and getattr(config, "tie_word_embeddings", False)}
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"state dict mismatch converting GGUF: missing {missing}, unexpected {unexpected}")
    if tied:
        plain.tie_weights()
    return plain.eval()


def _stamp_of(folder: Path) -> dict:
    return {p.name: {"size": p.stat().st_size, "sha256": assets.sha256_file(p)}
            for p in sorted(folder.iterdir()) if p.is_file() and p.name != STAMP}


def _folder_ok(folder: Path, *, full: bool = True) -> bool:
    """True if `folder` was fully written and its files match the stamp (sizes; sha256 if `full`)."""
    stamp_path = folder / STAMP
    if not stamp_path.is_file():
        return False
    try:
        stamp = json.loads(stamp_path.read_text())
        files = stamp["files"]
        for name, info in files.items():
            p = folder / name
            if not p.is_file() or p.stat().st_size != info["size"]:
                return False
            if full and assets.sha256_file(p) != info["sha256"]:
                return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


def converted_folder(alias: str = "smollm2-135m", *, verify: bool = True) -> Path:
    """The cached plain safetensors folder of a GGUF alias, converting it on first use.

    A folder whose files do not match its stamp (sizes, and sha256 when `verify`) is removed and
    converted again. Writes go to a temporary folder that is renamed into place when complete.
    """
    if alias not in MODEL_ALIASES:
        raise KeyError(f"unknown model alias {alias!r}; known: {sorted(MODEL_ALIASES)}")
    asset_key, member = MODEL_ALIASES[alias]
    return _cached_conversion(alias, lambda: assets.fetch_member(asset_key, member), verify=verify,
                              stamp={"alias": alias, "source": member,
                                     "source_sha256": assets.get_asset(asset_key).members[member]})


def gguf_folder(path: str | os.PathLike, *, verify: bool = True) -> Path:
    """The cached plain safetensors folder of the GGUF file at `path`, converting it on first use.

    The cache key is the sha256 of the file's bytes (`<cache>/models/gguf-<sha256>/`), so a file
    that is renamed or moved is found again, and a file changed in place is converted anew.
    Conversion, stamp, verification, lock and atomic rename are those of `converted_folder`.
    Hashing reads the whole file (about a second per GB); converting dequantizes it (tens of
    seconds), once.
    """
    path = Path(path).expanduser().resolve()
    digest = assets.sha256_file(path)
    return _cached_conversion(f"gguf-{digest}", lambda: path, verify=verify,
                              stamp={"source": str(path), "source_sha256": digest})


def _cached_conversion(name: str, source, *, verify: bool, stamp: dict) -> Path:
    """`<cache>/models/<name>`: the GGUF returned by `source()` as a float32 safetensors folder
    with its tokenizer and a stamp (`stamp` + the files' sizes and sha256s), written last. Built
    under one lock per name in a temporary folder renamed into place; reused while it matches its
    stamp."""
    root = assets.cache_dir() / "models"
    root.mkdir(parents=True, exist_ok=True)
    folder = root / name
    if _folder_ok(folder, full=verify):
        return folder
    with assets.file_lock(root / f".{name}.lock"):
        if _folder_ok(folder, full=verify):  # another process converted it meanwhile
            return folder
        if folder.exists():
            log.warning("cached model folder %s is incomplete or corrupt; converting again", folder)
        gguf = source()
        t0 = time.perf_counter()
        log.info("converting %s to a safetensors folder (once; ~30 s on CPU)", gguf.name)
        model, tokenizer = _load_gguf(gguf, torch.float32)
        plain = _plain_copy(model)
        del model
        with atomic_output_dir(folder, kind="converted", checked=True) as tmp:  # replaces a corrupt one
            plain.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / STAMP).write_text(json.dumps({**stamp, "files": _stamp_of(tmp)}, indent=1))
        log.info("converted in %.1f s -> %s", time.perf_counter() - t0, folder)
    return folder
