"""compress_model / CompressReport / save_compressed / load_compressed.

    report = compress_model(model, CompressConfig(method="whiten", ratio=0.2), calibration=ids)
    print(report.to_markdown())
    save_compressed(model, "out/smollm2-whiten-20", report=report)
    model = load_compressed("out/smollm2-whiten-20")

Whitening statistics come from the *dense* model (every layer sees the original activations,
as in SVD-LLM's first step); each target layer is then factorised independently, in place.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..layers import dense_weight, in_out_features
from .config import DTYPES, CompressConfig
from .factorized import FactorizedLinear
from .ranks import (LayerSpec, RankDecision, break_even_rank, decide_ranks, dense_params,
                    factorized_params, resolve_budget, round_to_multiple)
from .svd import SVDFactors, factors_from_svd, truncated_svd
from .whiten import Whitening, collect_grams, whitened_svd, whitening_factor

log = logging.getLogger(__name__)

FORMAT = "hylorada.compressed"
FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
META_NAME = "compress.json"
CONFIG_NAME = "config.json"


# --------------------------------------------------------------------------------------------
# Targets and sizes
# --------------------------------------------------------------------------------------------
def _conv1d_type():
    from transformers.pytorch_utils import Conv1D
    return Conv1D


def _dense_types():
    return (nn.Linear, _conv1d_type())


def decoder_layer_lists(model: nn.Module) -> list[str]:
    """Names of the ModuleLists holding the decoder blocks (length = config.num_hidden_layers)."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if not n:
        return []
    return [name for name, mod in model.named_modules()
            if isinstance(mod, nn.ModuleList) and len(mod) == n and name]


def find_target_layers(model: nn.Module, target_modules: list[str] | None = None
                       ) -> dict[str, nn.Module]:
    """name -> nn.Linear / Conv1D to compress, in module order.

    Candidates are the dense linears inside the decoder layers (every dense linear except the
    output embeddings when no decoder list is found); `target_modules` (dotted name pieces,
    see ranks.match_key) narrows them. lm_head / embeddings are never targets.
    """
    from .ranks import match_key

    excluded = set()
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    in_emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    for m in (out_emb, in_emb):
        if m is not None:
            excluded.add(id(m))
    prefixes = [p + "." for p in decoder_layer_lists(model)]
    types = _dense_types()
    found: dict[str, nn.Module] = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, types) or id(mod) in excluded or name.split(".")[-1] == "lm_head":
            continue
        if prefixes and not any(name.startswith(p) for p in prefixes):
            continue
        if target_modules is not None and not any(match_key(name, t) for t in target_modules):
            continue
        found[name] = mod
    if not found:
        raise ValueError(f"target_modules {target_modules!r} matched no Linear/Conv1D layer inside "
                         "the decoder layers")
    return found


def stored_size(model: nn.Module) -> tuple[int, int]:
    """(parameters, bytes) of everything a saved model stores: every parameter and persistent
    buffer, tensors shared by several names (tied embeddings) counted once."""
    params = {id(p) for p in model.parameters()}
    seen: set[tuple] = set()
    n_params = n_bytes = 0
    for t in model.state_dict(keep_vars=True).values():
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), t.numel(), t.dtype) \
            if t.device.type != "meta" else (id(t),)
        if key in seen:
            continue
        seen.add(key)
        n_bytes += t.numel() * t.element_size()
        if id(t) in params:
            n_params += t.numel()
    return n_params, n_bytes


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------
@dataclass
class LayerReport:
    name: str
    kind: str                 # Linear | Conv1D
    d_in: int
    d_out: int
    bias: bool
    rank: int | None          # None: kept dense
    break_even: float         # d_in·d_out / (d_in + d_out)
    params_before: int
    params_after: int
    bytes_before: int
    bytes_after: int
    energy_kept: float        # share of Σσ² kept (of W·L when whitened); 1.0 when dense
    dropped_energy: float     # Σ dropped σ² (whitened: mean squared output error per token)
    dense: bool
    reason: str               # why it stayed dense ("" when factorised)
    policy: str               # where the rank came from
    whitening: str = ""       # cholesky | cholesky+jitter(..) | eigh(rank r/n) | ""


@dataclass
class CompressReport:
    method: str
    config: dict
    layers: list[LayerReport]
    target_params_before: int
    target_params_after: int
    target_bytes_before: int
    target_bytes_after: int
    model_params_before: int
    model_params_after: int
    model_bytes_before: int
    model_bytes_after: int
    calib_tokens: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def target_ratio(self) -> float:
        """Fraction of the target layers' parameters removed (SVD-LLM's compression ratio)."""
        return 1 - self.target_params_after / max(self.target_params_before, 1)

    @property
    def model_ratio(self) -> float:
        """Fraction of the whole model's parameters removed."""
        return 1 - self.model_params_after / max(self.model_params_before, 1)

    @property
    def n_factorized(self) -> int:
        return sum(not r.dense for r in self.layers)

    @property
    def n_dense(self) -> int:
        return sum(r.dense for r in self.layers)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(target_ratio=self.target_ratio, model_ratio=self.model_ratio,
                 n_factorized=self.n_factorized, n_dense=self.n_dense)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "CompressReport":
        keys = {f for f in cls.__dataclass_fields__}
        d = {k: v for k, v in d.items() if k in keys}
        d["layers"] = [LayerReport(**r) for r in d["layers"]]
        return cls(**d)

    def summary(self) -> str:
        mb = 1024 ** 2
        return (f"{self.method}: {self.n_factorized} layers factorised, {self.n_dense} kept dense; "
                f"target linears {self.target_params_before:,} -> {self.target_params_after:,} params "
                f"({100 * self.target_ratio:.2f}% removed, {self.target_bytes_before / mb:.1f} -> "
                f"{self.target_bytes_after / mb:.1f} MiB); whole model {self.model_params_before:,} -> "
                f"{self.model_params_after:,} params ({100 * self.model_ratio:.2f}% removed, "
                f"{self.model_bytes_before / mb:.1f} -> {self.model_bytes_after / mb:.1f} MiB)")

    def to_markdown(self) -> str:
        mb = 1024 ** 2
        lines = [
            "| layer | d_out x d_in | rank | break-even | params before | params after | "
            "energy kept | note |",
            "|---|---|---:|---:|---:|---:|---:|---|",
        ]
        for r in self.layers:
            rank = "dense" if r.dense else str(r.rank)
            note = r.reason if r.dense else r.policy
            if r.whitening:
                note = f"{note}; {r.whitening}" if note else r.whitening
            lines.append(f"| {r.name} | {r.d_out} x {r.d_in} | {rank} | {r.break_even:.1f} | "
                         f"{r.params_before:,} | {r.params_after:,} | {100 * r.energy_kept:.2f}% | "
                         f"{note} |")
        lines += [
            "",
            "| total | params before | params after | removed | MiB before | MiB after |",
            "|---|---:|---:|---:|---:|---:|",
            f"| target linears | {self.target_params_before:,} | {self.target_params_after:,} | "
            f"{100 * self.target_ratio:.2f}% | {self.target_bytes_before / mb:.2f} | "
            f"{self.target_bytes_after / mb:.2f} |",
            f"| whole model | {self.model_params_before:,} | {self.model_params_after:,} | "
            f"{100 * self.model_ratio:.2f}% | {self.model_bytes_before / mb:.2f} | "
            f"{self.model_bytes_after / mb:.2f} |",
            "",
            f"method {self.method}, {self.n_factorized} factorised, {self.n_dense} dense, "
            f"{self.calib_tokens:,} calibration tokens, {self.seconds:.1f} s.",
        ]
        lines += [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# compress_model
# --------------------------------------------------------------------------------------------
def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def compress_model(model: nn.Module, config: CompressConfig, calibration=None,
                   progress: bool = False, grams: dict | None = None) -> CompressReport:
    """Replace each target Linear/Conv1D of `model` by a FactorizedLinear in place (same
    device; the layer's dtype unless config.dtype) and return the report.

    calibration: LongTensor [n_blocks, seq_len] of token ids, or a dict with input_ids and
    attention_mask (padding is left out of the statistics); required for method="whiten",
    unused for "svd". It runs through the model in batches of config.calib_batch_size.
    grams: precomputed `collect_grams(model, find_target_layers(model, ...), calibration)`
    (reused across several compressions of the same dense model); replaces calibration.
    """
    if not isinstance(config, CompressConfig):
        raise ValueError(f"config must be a CompressConfig, got {type(config).__name__}")
    t0 = time.perf_counter()
    if config.method == "whiten" and calibration is None and grams is None:
        raise ValueError("calibration: method='whiten' needs calibration token ids "
                         "(LongTensor [n_blocks, seq_len] or dict with input_ids/attention_mask); "
                         "use method='svd' to compress without data")
    targets = find_target_layers(model, config.target_modules)
    model_params_before, model_bytes_before = stored_size(model)
    notes: list[str] = []
    cdt = config.torch_compute_dtype

    calib_tokens = 0
    if config.method == "whiten" and grams is not None:
        if not any(n in grams for n in targets):
            raise ValueError("grams: no statistics for any target layer (names differ?)")
        grams = dict(grams)  # entries are released below; the caller's dict stays whole
        calib_tokens = max((g.n_tokens for g in grams.values()), default=0)
    elif config.method == "whiten":
        grams = collect_grams(model, targets, calibration, batch_size=config.calib_batch_size,
                              n_blocks=config.calib_blocks, seq_len=config.calib_seq_len,
                              progress=progress, precision=config.calib_precision)
        calib_tokens = max((g.n_tokens for g in grams.values()), default=0)
    else:
        grams = {}
        if calibration is not None:
            notes.append("calibration ignored: method='svd' does not use data")

    specs = []
    for name, layer in targets.items():
        d_in, d_out = in_out_features(layer)
        specs.append(LayerSpec(name, d_out, d_in, layer.bias is not None))
    by_name = {s.name: s for s in specs}

    # whitening factors, one per shared Gram matrix; per layer memoised (None: plain SVD)
    factors: dict[int, Whitening] = {}
    chosen: dict[str, Whitening | None] = {}
    thin: dict[str, tuple[int, int]] = {}  # layer -> (calibration tokens, d_in) when tokens < 4·d_in

    def whitening_for(name: str) -> Whitening | None:
        if name in chosen:
            return chosen[name]
        wh = None
        if config.method == "whiten":
            g = grams.get(name)
            if g is None or g.n_tokens == 0:
                notes.append(f"{name}: no calibration tokens reached it; plain SVD used")
            else:
                if id(g) not in factors:
                    factors[id(g)] = whitening_factor(g.G.to(cdt), config.whiten_method, config.jitter)
                if g.n_tokens < 4 * g.G.shape[0]:
                    thin[name] = (g.n_tokens, g.G.shape[0])
                wh = factors[id(g)]
        chosen[name] = wh
        return wh

    def target_matrix(W: torch.Tensor, wh: Whitening | None) -> torch.Tensor:
        return W.detach().to(cdt) if wh is None else wh.whiten(W.detach())

    value = config.policy_value
    decisions: dict[str, RankDecision] = {}
    if config.policy == "budget":  # global: every spectrum first (svdvals), then the factors
        value = resolve_budget(config.budget, sum(dense_params(s.m, s.n, s.bias) for s in specs))
        spectra = {name: torch.linalg.svdvals(target_matrix(dense_weight(layer), whitening_for(name)))
                   for name, layer in targets.items()}
        decisions = decide_ranks(specs, "budget", value, config.overrides, spectra, config.force,
                                 config.budget_energy)
        del spectra
    elif config.policy != "energy":  # ratio / alpha: ranks from the shapes alone
        decisions = decide_ranks(specs, config.policy, value, config.overrides, None, config.force)
    elif config.svd_solver != "full":
        notes.append("energy policy: every singular value is needed, so the full SVD was used")
    # energy: decided per layer below, from the one full SVD that also gives the factors

    items = targets.items()
    if progress:
        from tqdm.auto import tqdm
        items = tqdm(list(items), desc="factorising", unit="layer")
    # free each Gram matrix and its whitening factor after the last layer that uses it (a 7B
    # model's float64 Grams alone take ~44 GB; their factors would double that)
    uses: dict[int, int] = {}
    for g in (grams.get(n) for n in targets):
        if g is not None:
            uses[id(g)] = uses.get(id(g), 0) + 1

    def release(name: str) -> None:
        g = grams.pop(name, None)
        if g is not None:
            uses[id(g)] -= 1
            if uses[id(g)] == 0:
                factors.pop(id(g), None)
        chosen.pop(name, None)

    reports: list[LayerReport] = []
    for name, layer in items:
        spec = by_name[name]
        W = dense_weight(layer)
        bytes_el = W.element_size()
        out_dtype = config.torch_dtype or W.dtype
        p_before = dense_params(spec.m, spec.n, spec.bias)
        wh = whitening_for(name)
        svd_once = None
        if config.policy == "energy":
            M = target_matrix(W, wh)
            U, S, Vh = torch.linalg.svd(M, full_matrices=False)
            svd_once = (U, S, Vh, float(M.square().sum()))
            decisions[name] = decide_ranks([spec], "energy", value, config.overrides, {name: S},
                                           config.force)[name]
            del M
        dec = decisions[name]
        common = dict(name=name, kind=type(layer).__name__, d_in=spec.n, d_out=spec.m,
                      bias=spec.bias, break_even=break_even_rank(spec.m, spec.n),
                      params_before=p_before, bytes_before=p_before * bytes_el, policy=dec.policy)
        if dec.rank is None:
            reports.append(LayerReport(**common, rank=None, params_after=p_before,
                                       bytes_after=p_before * bytes_el, energy_kept=1.0,
                                       dropped_energy=0.0, dense=True, reason=dec.reason))
            release(name)
            continue
        k, note = round_to_multiple(dec.rank, config.rank_multiple, spec.m, spec.n, config.force)
        if k is None:  # rounding reached break-even or the layer's size: stays dense
            reports.append(LayerReport(**common, rank=None, params_after=p_before,
                                       bytes_after=p_before * bytes_el, energy_kept=1.0,
                                       dropped_energy=0.0, dense=True, reason=note))
            release(name)
            continue
        if note:
            common["policy"] = f"{dec.policy}; {note}"
        if wh is not None and k > wh.rank:
            k = wh.rank
            common["policy"] = f"{dec.policy}; capped at whitening rank {wh.rank}"
        unwhiten = None if wh is None else wh.unwhiten
        if svd_once is not None:
            U, S, Vh, total = svd_once
            f: SVDFactors = factors_from_svd(U, S, Vh, k, total, out_dtype, unwhiten)
        elif wh is None:
            f = truncated_svd(W, k, config.svd_solver, config.oversample, config.n_iter, cdt,
                              out_dtype, config.seed)
        else:
            f = whitened_svd(W, wh, k, config.svd_solver, config.oversample, config.n_iter,
                             out_dtype, config.seed)
        bias = None if layer.bias is None else layer.bias.detach().to(out_dtype)
        new = FactorizedLinear.from_factors(f.up.to(W.device), f.down.to(W.device), bias)
        new.train(layer.training)
        _set_module(model, name, new)
        p_after = factorized_params(k, spec.m, spec.n, spec.bias)
        el_after = torch.empty((), dtype=out_dtype).element_size()
        reports.append(LayerReport(**common, rank=k, params_after=p_after,
                                   bytes_after=p_after * el_after, energy_kept=f.energy_kept(),
                                   dropped_energy=f.dropped_energy(), dense=False, reason="",
                                   whitening=wh.describe() if wh is not None else ""))
        del W, f, svd_once
        release(name)
    del grams, factors, chosen
    if thin:
        notes.append(thin_calibration_note(thin, len(targets)))
    model_params_after, model_bytes_after = stored_size(model)
    return CompressReport(
        method=config.method, config=config.to_dict(), layers=reports,
        target_params_before=sum(r.params_before for r in reports),
        target_params_after=sum(r.params_after for r in reports),
        target_bytes_before=sum(r.bytes_before for r in reports),
        target_bytes_after=sum(r.bytes_after for r in reports),
        model_params_before=model_params_before, model_params_after=model_params_after,
        model_bytes_before=model_bytes_before, model_bytes_after=model_bytes_after,
        calib_tokens=calib_tokens, seconds=time.perf_counter() - t0, notes=notes)


def thin_calibration_note(thin: dict[str, tuple[int, int]], n_layers: int) -> str:
    """One note for every layer whose whitening saw fewer than 4·d_in calibration tokens
    (`thin`: layer -> (tokens, d_in)), with the layer count per (tokens, d_in)."""
    groups: dict[tuple[int, int], int] = {}
    for key in thin.values():
        groups[key] = groups.get(key, 0) + 1
    detail = "; ".join(f"{n} layer(s) with {t:,} tokens for {d} input features"
                       for (t, d), n in sorted(groups.items(), key=lambda kv: kv[0][1]))
    return (f"{len(thin)} of {n_layers} layers saw fewer calibration tokens than 4 x their input "
            f"features ({detail}, e.g. {next(iter(thin))}): the whitening sees too small a subspace; "
            "use more calibration tokens, at least several times d_in")


def factorized_layers(model: nn.Module) -> dict[str, FactorizedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, FactorizedLinear)}


# --------------------------------------------------------------------------------------------
# save / load
# --------------------------------------------------------------------------------------------
def _write_atomically(directory: Path, fill) -> None:
    """Fill a temporary sibling directory, then rename it onto `directory` (replacing it)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    umask = os.umask(0)
    os.umask(umask)
    try:
        fill(tmp)
        # mkdtemp (and safetensors) create owner-only entries; give them the usual umask modes
        os.chmod(tmp, 0o777 & ~umask)
        for f in tmp.iterdir():
            if f.is_file():
                os.chmod(f, 0o666 & ~umask)
        if directory.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=directory.parent))
            os.replace(directory, old / "d")
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_compressed(model: nn.Module, directory: str | os.PathLike, report: CompressReport | None = None,
                    tokenizer=None, extra: dict[str, str] | None = None) -> Path:
    """Write `directory` (atomically: a temporary sibling renamed into place, replacing an
    existing one): config.json (the base model's HF config, no quantization_config),
    model.safetensors (the whole state dict, tied tensors stored once) and compress.json
    (format, per-layer ranks and shapes, optionally the report); the tokenizer's files when
    given, and `extra` text files (name -> content). No pickle anywhere."""
    from safetensors.torch import save_model

    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise ValueError("save_compressed needs a transformers model with a .config")
    cfg = config.to_dict()
    cfg.pop("quantization_config", None)
    layers = {name: {"rank": m.rank, "d_in": m.in_features, "d_out": m.out_features,
                     "bias": m.bias is not None}
              for name, m in factorized_layers(model).items()}
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "layers": layers,
            "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
            "report": None if report is None else report.to_dict()}

    def fill(tmp: Path) -> None:
        (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str) + "\n")
        (tmp / META_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        save_model(model, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        for fname, text in (extra or {}).items():
            if Path(fname).name != fname or fname in (CONFIG_NAME, META_NAME, WEIGHTS_NAME):
                raise ValueError(f"extra file name {fname!r} must be a plain, unused file name")
            (tmp / fname).write_text(text)

    directory = Path(directory)
    _write_atomically(directory, fill)
    return directory


def read_compressed_meta(directory: str | os.PathLike) -> dict:
    meta = json.loads((Path(directory) / META_NAME).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{directory}: not a hylorada compressed model (format {meta.get('format')!r})")
    if meta.get("version", 0) > FORMAT_VERSION:
        raise ValueError(f"{directory}: format version {meta['version']} is newer than this "
                         f"hylorada ({FORMAT_VERSION})")
    return meta


def load_compressed(directory: str | os.PathLike, dtype: torch.dtype | str | None = None,
                    device: torch.device | str | None = None) -> nn.Module:
    """Rebuild the model from config.json (AutoModelForCausalLM.from_config, no remote code),
    swap in FactorizedLinear layers of the saved ranks, load model.safetensors strictly
    (each tensor in its saved dtype; tied weights re-tied by the architecture), then cast to
    `dtype` / move to `device` if given. Returns the model in eval mode."""
    from safetensors import safe_open
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    meta = read_compressed_meta(directory)
    config = AutoConfig.from_pretrained(str(directory), trust_remote_code=False,
                                        local_files_only=True)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    weights = directory / WEIGHTS_NAME
    st_dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                 "F64": torch.float64}
    with safe_open(str(weights), framework="pt") as f:
        saved_dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    floating = [st_dtypes[c] for c in saved_dtypes.values() if c in st_dtypes]
    if dtype is not None:
        dtype = DTYPES[dtype.removeprefix("torch.")] if isinstance(dtype, str) else dtype
    # built in the final dtype as from_pretrained(dtype=...) builds it: non-persistent buffers
    # (RoPE inv_freq: float32 always) come out as transformers makes them
    build = dtype or (max(set(floating), key=floating.count) if floating else torch.float32)
    model = AutoModelForCausalLM.from_config(config, trust_remote_code=False, dtype=build)
    for name, spec in meta["layers"].items():
        old = model.get_submodule(name)
        d_in, d_out = in_out_features(old)
        if (d_in, d_out) != (spec["d_in"], spec["d_out"]):
            raise ValueError(f"{name}: saved shape {spec['d_out']} x {spec['d_in']} does not match "
                             f"the architecture's {d_out} x {d_in}")
        _set_module(model, name, FactorizedLinear(d_in, d_out, spec["rank"], bias=spec["bias"],
                                                  dtype=build))
    named = dict(model.named_parameters(remove_duplicate=False))
    named.update(dict(model.named_buffers(remove_duplicate=False)))
    with torch.no_grad():
        for k, code in saved_dtypes.items():
            t = named.get(k)
            want = st_dtypes.get(code)
            if t is not None and want is not None and t.dtype != want:
                t.data = t.data.to(want)
    load_model(model, str(weights), strict=True)
    if dtype is not None:
        from ..loading import cast_weights
        cast_weights(model, dtype)
    if device is not None:
        model.to(device)
    return model.eval()


# --------------------------------------------------------------------------------------------
# recovery: adapters on the factors, trained, merged back
# --------------------------------------------------------------------------------------------
RECOVER_SCHEDULES = ("sequential", "joint")
RECOVER_TARGETS = ("factors", "layers")


def recover_compressed(model: nn.Module, train_blocks: dict, *, method: str = "hylorada",
                       steps: int = 200, lora_rank: int = 8, lora_alpha: float | None = None,
                       schedule: str = "sequential", targets: str = "factors",
                       valid_blocks: dict | None = None, train_config: dict | None = None,
                       adapter_config: dict | None = None) -> dict:
    """Fine-tune a compressed model with adapters, merge them back and return a summary.

    targets="factors" (default): adapters wrap the `up` and `down` nn.Linear children of each
    FactorizedLinear, so merging writes into the factors and the layer KEEPS rank k (the size
    is unchanged). With schedule="sequential" (SVD-LLM) the up factors are adapted and merged
    first, then the down factors, ceil(steps/2) and floor(steps/2) steps; "joint" adapts both at
    once for `steps` steps. targets="layers": adapters wrap whole FactorizedLinear layers and the
    merge concatenates them, so each layer GROWS to rank k + lora_rank (the summary reports the
    size after merging either way). LoRaDA's attention temperature needs the query projection
    itself: use targets="layers" with it.

    train_blocks / valid_blocks: hylorada.data.pack_blocks dicts. `train_config`: extra
    hylorada.train.TrainConfig fields (batch_size, lr, ...); `adapter_config`: extra
    HyLoRADAConfig fields.
    """
    from ..config import HyLoRADAConfig
    from ..model import HyLoRADAModel
    from ..train import TrainConfig, train

    if schedule not in RECOVER_SCHEDULES:
        raise ValueError(f"schedule must be one of {RECOVER_SCHEDULES}, got {schedule!r}")
    if targets not in RECOVER_TARGETS:
        raise ValueError(f"targets must be one of {RECOVER_TARGETS}, got {targets!r}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if method == "lorada" and targets == "factors":
        raise ValueError("method='lorada' scales attention logits per head and needs the query "
                         "projection itself: use targets='layers'")
    layers = factorized_layers(model)
    if not layers:
        raise ValueError("recover_compressed: the model has no FactorizedLinear layer")
    if targets == "layers":
        phases = [("layers", list(layers), steps)]
    elif schedule == "sequential":
        phases = [("up", [f"{n}.up" for n in layers], (steps + 1) // 2),
                  ("down", [f"{n}.down" for n in layers], steps // 2)]
    else:
        phases = [("up+down", [f"{n}.{c}" for n in layers for c in ("up", "down")], steps)]
    acfg = dict(method=method, lora_rank=lora_rank,
                lora_alpha=float(lora_alpha if lora_alpha is not None else 2 * lora_rank))
    acfg.update(adapter_config or {})
    was_training = model.training
    device = next(model.parameters()).device  # the trainer may move the model to its accelerator
    grad_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = stored_size(model)
    summary: dict = {"method": method, "schedule": schedule if targets == "factors" else "joint",
                     "targets": targets, "lora_rank": lora_rank, "phases": []}
    t0 = time.perf_counter()
    for phase, names, n_steps in phases:
        if n_steps < 1:
            continue
        wrapped = HyLoRADAModel(model, HyLoRADAConfig(**acfg), target_names=names)
        tcfg = TrainConfig(**{"steps": n_steps, **(train_config or {})})
        result = train(wrapped, train_blocks, valid_blocks, tcfg)
        model = wrapped.merge_and_unload()
        summary["phases"].append({
            "phase": phase, "layers": len(names), "steps": n_steps,
            "first_loss": result.losses[0] if result.losses else None,
            "last_loss": result.losses[-1] if result.losses else None,
            "best_valid_loss": result.best_valid_loss, "train_time_s": result.train_time_s,
            "mean_tokens_per_s": result.mean_tokens_per_s})
    for n, p in model.named_parameters():
        p.requires_grad_(grad_flags.get(n, True))
    model.to(device)
    model.train(was_training)
    after = stored_size(model)
    summary.update(params_before=before[0], params_after=after[0], bytes_before=before[1],
                   bytes_after=after[1], seconds=time.perf_counter() - t0,
                   ranks_after={n: m.rank for n, m in factorized_layers(model).items()})
    return summary
