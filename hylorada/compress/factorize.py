"""compress_model: replace each target linear layer by a FactorizedLinear, in place.

    report = compress_model(model, CompressConfig(method="whiten", ratio=0.2), calibration=ids)

The flow (CompressConfig names the options):
1. targets (hylorada/compress/targets.py) and, when anything needs data, calibration
   statistics: calibrate="dense" collects every layer's input Gram from the dense model in one
   pass (SVD-LLM); calibrate="sequential" streams one input group at a time from the model as
   compressed so far (hylorada/compress/sequential.py).
2. ranks: the rank policy, or with allocate="loss"/"sensitivity" a global allocation under
   the uniform ratio's budget (hylorada/compress/allocate.py), decided from dense statistics.
3. per layer (`factorize_layer`): rounding and the break-even guard, truncated SVD of W or of
   W·L (whitened), with update="lstsq" the least-squares re-solve of `up`
   (hylorada/compress/update.py), and the swap.
Seconds per stage go to CompressReport.timings (factorize_s includes update_s).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from ..layers import dense_weight, in_out_features
from .allocate import (allocate_by_loss, allocate_by_sensitivity, calibration_loss, resolve_allocate,
                       candidate_ranks, measure_sensitivity)
from .config import CompressConfig
from .factorized import FactorizedLinear
from .ranks import (LayerSpec, RankDecision, break_even_rank, decide_ranks, dense_params,
                    factorized_params, find_override, resolve_budget, round_to_multiple)
from .replay import BlockReplay
from .report import CompressReport, LayerReport, thin_calibration_note
from .sequential import GroupStats, forward_groups, stream_stats
from .svd import factors_from_svd, truncated_svd
from .targets import find_target_layers, set_module, stored_size
from .update import lstsq_up, output_error
from .curvature import collect_output_grams
from .whiten import Gram, Whitening, collect_grams, whitened_svd, whitening_factor


@dataclass
class _Run:
    """State shared by the steps of one compress_model call."""

    model: nn.Module
    config: CompressConfig
    targets: dict[str, nn.Module]
    specs: dict[str, LayerSpec]
    progress: bool
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    noted: set = field(default_factory=set)
    thin: dict = field(default_factory=dict)  # layer -> (calibration tokens, d_in), tokens < 4·d_in

    @contextlib.contextmanager
    def timed(self, key: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.timings[key] = self.timings.get(key, 0.0) + time.perf_counter() - t

    def note_once(self, key: str, text: str) -> None:
        if key not in self.noted:
            self.noted.add(key)
            self.notes.append(text)


def _needs_grams(config: CompressConfig) -> bool:
    return config.whitened or config.update == "lstsq"


def _resolved(config, model: nn.Module, calibration) -> tuple[CompressConfig, str]:
    """`config` with allocate="auto" resolved (allocate.resolve_allocate) and the note saying so."""
    if not isinstance(config, CompressConfig):
        return config, ""  # _check_inputs names the error
    device = next(model.parameters()).device
    allocate, why = resolve_allocate(config.allocate, config.method, config.policy, calibration is not None, device)
    return (config if allocate == config.allocate else dataclasses.replace(config, allocate=allocate)), why


def _check_inputs(config, calibration, grams, output_grams=None) -> None:
    if not isinstance(config, CompressConfig):
        raise ValueError(f"config must be a CompressConfig, got {type(config).__name__}")
    if calibration is not None:
        return
    what = {"calibrate": config.calibrate == "sequential", "allocate": config.allocate == "sensitivity",
            "method": config.whitened and (grams is None or (config.method == "fisher" and output_grams is None)),
            "update": config.update == "lstsq" and grams is None}
    for name, needs in what.items():
        if needs:
            raise ValueError(f"calibration: {name}={getattr(config, name)!r} needs calibration token "
                             "ids (LongTensor [n_blocks, seq_len] or dict with input_ids/attention_mask)"
                             + ("; use method='svd' to compress without data" if name == "method" else ""))


def compress_model(model: nn.Module, config: CompressConfig, calibration=None,
                   progress: bool = False, grams: dict | None = None,
                   output_grams: dict | None = None) -> CompressReport:
    """Replace each target Linear/Conv1D of `model` by a FactorizedLinear in place (same
    device; the layer's dtype unless config.dtype) and return the report.

    calibration: LongTensor [n_blocks, seq_len] of token ids, or a dict with input_ids and
    attention_mask (padding is left out of the statistics); required for method="whiten",
    update="lstsq", allocate="sensitivity" and calibrate="sequential". It runs through the model
    in batches of config.calib_batch_size.
    grams: precomputed `collect_grams(model, find_target_layers(model, ...), calibration)`
    (reused across several compressions of the same dense model); replaces the dense
    calibration pass (calibrate="dense" only).
    output_grams: precomputed `collect_output_grams(...)` (hylorada/compress/curvature.py) for
    method="fisher", reused the same way.
    """
    t0 = time.perf_counter()
    config, why = _resolved(config, model, calibration)
    _check_inputs(config, calibration, grams, output_grams)
    targets = find_target_layers(model, config.target_modules)
    before = stored_size(model)
    specs = {}
    for name, layer in targets.items():
        d_in, d_out = in_out_features(layer)
        specs[name] = LayerSpec(name, d_out, d_in, layer.bias is not None)
    run = _Run(model, config, targets, specs, progress)
    if why:
        run.notes.append(why)
    if config.calibrate == "sequential":
        reports, tokens = _compress_sequential(run, calibration)
    else:
        reports, tokens = _compress_dense(run, calibration, grams, output_grams)
    if run.thin:
        run.notes.append(thin_calibration_note(run.thin, len(targets)))
    after = stored_size(model)
    return CompressReport(
        method=config.method, config=config.to_dict(), layers=reports,
        target_params_before=sum(r.params_before for r in reports),
        target_params_after=sum(r.params_after for r in reports),
        target_bytes_before=sum(r.bytes_before for r in reports),
        target_bytes_after=sum(r.bytes_after for r in reports),
        model_params_before=before[0], model_params_after=after[0],
        model_bytes_before=before[1], model_bytes_after=after[1],
        calib_tokens=tokens, seconds=time.perf_counter() - t0, notes=run.notes,
        timings=run.timings)


# --------------------------------------------------------------------------------------------
# statistics and whitening
# --------------------------------------------------------------------------------------------
def _dense_grams(run: _Run, calibration, grams: dict | None) -> tuple[dict[str, Gram], int]:
    cfg = run.config
    if not _needs_grams(cfg):
        if calibration is not None and cfg.allocate != "sensitivity":
            run.notes.append("calibration ignored: method='svd' does not use data")
        return {}, 0
    if grams is not None:
        if not any(n in grams for n in run.targets):
            raise ValueError("grams: no statistics for any target layer (names differ?)")
        grams = dict(grams)  # entries are released below; the caller's dict stays whole
    else:
        with run.timed("calibration_s"):
            grams = collect_grams(run.model, run.targets, calibration, batch_size=cfg.calib_batch_size,
                                  n_blocks=cfg.calib_blocks, seq_len=cfg.calib_seq_len,
                                  progress=run.progress, precision=cfg.calib_precision)
    return grams, max((g.n_tokens for g in grams.values()), default=0)


def _whitening(run: _Run, name: str, gram: Gram | None) -> Whitening | None:
    """L with L Lᵀ = G for method="whiten"/"fisher" (None for "svd" or when no token reached the layer)."""
    cfg = run.config
    if not cfg.whitened:
        return None
    if gram is None or gram.n_tokens == 0:
        run.note_once(name, f"{name}: no calibration tokens reached it; plain SVD used")
        return None
    return whitening_factor(gram.G.to(cfg.torch_compute_dtype), cfg.whiten_method, cfg.jitter)


def _record_thin(run: _Run, names, gram: Gram | None) -> None:
    """Remember the layers whose Gram saw fewer than 4·d_in tokens (one note for all of them at
    the end: report.thin_calibration_note)."""
    if gram is not None and 0 < gram.n_tokens < 4 * gram.G.shape[0]:
        for name in names:
            run.thin[name] = (gram.n_tokens, gram.G.shape[0])


def _output_grams(run: _Run, calibration, given: dict | None) -> dict[str, Gram]:
    """F per target for method="fisher" (hylorada/compress/curvature.py); {} otherwise."""
    cfg = run.config
    if cfg.method != "fisher":
        return {}
    if given is not None:
        return dict(given)
    with run.timed("curvature_s"):
        return collect_output_grams(run.model, run.targets, calibration, batch_size=cfg.calib_batch_size,
                                    n_blocks=cfg.calib_blocks, seq_len=cfg.calib_seq_len, seed=cfg.seed,
                                    progress=run.progress)


class _DenseWhitenings:
    """Whitening per shared Gram matrix (memoised); a Gram and its factor are freed after the
    last layer that uses them (a 7B model's float64 Grams alone take ~44 GB). With output
    Grams (method="fisher") each layer's whitening also carries its own output factor R."""

    def __init__(self, run: _Run, grams: dict[str, Gram], outputs: dict[str, Gram] | None = None):
        self.run, self.grams, self.factors = run, grams, {}
        self.outputs, self.left = outputs or {}, {}
        self.uses = Counter(id(grams[n]) for n in run.targets if n in grams)

    def get(self, name: str) -> Whitening | None:
        g = self.grams.get(name)
        if self.run.config.whitened:
            _record_thin(self.run, [name], g)
        if g is None or id(g) not in self.factors:
            wh = _whitening(self.run, name, g)
            if g is None:
                return wh
            self.factors[id(g)] = wh
        return self._with_output(name, self.factors[id(g)])

    def _with_output(self, name: str, wh: Whitening | None) -> Whitening | None:
        """`wh` with R (R Rᵀ = F, Cholesky with the jitter convention of the inputs' factor)."""
        cfg = self.run.config
        if wh is None or cfg.method != "fisher":
            return wh
        F = self.outputs.get(name)
        if F is None or F.n_tokens == 0:
            self.run.note_once(f"{name}:F", f"{name}: no loss gradient reached its output; whitened SVD used")
            return wh
        if name not in self.left:
            self.left[name] = whitening_factor(F.G.to(cfg.torch_compute_dtype), "cholesky", cfg.jitter)
        return dataclasses.replace(wh, left=self.left[name])

    def release(self, name: str) -> None:
        self.outputs.pop(name, None)
        self.left.pop(name, None)
        g = self.grams.pop(name, None)
        if g is not None:
            self.uses[id(g)] -= 1
            if self.uses[id(g)] == 0:
                self.factors.pop(id(g), None)

    def pairs(self):
        for name in self.run.targets:
            yield name, self.get(name)


def _streamed_pairs(run: _Run, groups: list[list[str]], calibration):
    """(name, whitening) from dense statistics streamed one group at a time (bounded memory)."""
    cfg = run.config
    for stats in stream_stats(run.model, groups, calibration, cfg.calib_batch_size,
                              cfg.calib_blocks, cfg.calib_seq_len):
        wh = _whitening(run, stats.names[0], stats.gram)
        if cfg.whitened:
            _record_thin(run, stats.names, stats.gram)
        for name in stats.names:
            yield name, wh


# --------------------------------------------------------------------------------------------
# ranks
# --------------------------------------------------------------------------------------------
def _target_matrix(run: _Run, W: torch.Tensor, wh: Whitening | None) -> torch.Tensor:
    return W.detach().to(run.config.torch_compute_dtype) if wh is None else wh.whiten(W.detach())


def _decide(run: _Run, pairs, calibration) -> dict[str, RankDecision]:
    """Rank per layer; {} for the energy policy (decided per layer from its own SVD).
    `pairs` (name, whitening) is consumed only by the policies that need spectra or losses."""
    cfg, specs = run.config, list(run.specs.values())
    if cfg.policy == "energy":
        if cfg.svd_solver != "full":
            run.notes.append("energy policy: every singular value is needed, so the full SVD was used")
        return {}
    if cfg.allocate == "uniform" and cfg.policy != "budget":  # ranks from the shapes alone
        return decide_ranks(specs, cfg.policy, cfg.policy_value, cfg.overrides, None, cfg.force)
    if cfg.allocate == "sensitivity":
        table = _sensitivity_table(run, pairs, calibration)
        return allocate_by_sensitivity(specs, cfg.ratio, table, cfg.overrides, cfg.force)
    spectra = {name: torch.linalg.svdvals(_target_matrix(run, dense_weight(run.targets[name]), wh))
               for name, wh in pairs}
    if cfg.allocate == "loss":
        return allocate_by_loss(specs, cfg.ratio, spectra, cfg.overrides, cfg.force,
                                "absolute" if cfg.method == "fisher" else "relative")
    value = resolve_budget(cfg.budget, sum(dense_params(s.m, s.n, s.bias) for s in specs))
    return decide_ranks(specs, "budget", value, cfg.overrides, spectra, cfg.force, cfg.budget_energy)


REPLAY_MAX_BYTES = 4 * 2**30  # the recorded block outputs kept for the sensitivity replay


def _sensitivity_table(run: _Run, pairs, calibration) -> dict[str, list[tuple[int, float]]]:
    """name -> [(candidate rank, calibration-loss change)] for every layer without override."""
    cfg = run.config
    n_blocks = cfg.sensitivity_blocks if cfg.calib_blocks is None else min(cfg.sensitivity_blocks,
                                                                           cfg.calib_blocks)

    def loss_fn() -> float:
        return calibration_loss(run.model, calibration, cfg.calib_batch_size, n_blocks,
                                cfg.calib_seq_len)

    replay = BlockReplay(run.model)  # the blocks below a matrix replay their dense outputs
    base = replay.record(loss_fn, REPLAY_MAX_BYTES)
    if replay.enabled and not replay.check(loss_fn, base):
        run.notes.append("sensitivity: replaying the blocks below a matrix changed the loss, so every "
                         "measurement ran the whole model")
    table = {}
    if run.progress:
        from tqdm.auto import tqdm
        pairs = tqdm(pairs, total=len(run.targets), desc="sensitivity", unit="layer")
    for name, wh in pairs:
        if find_override(name, cfg.overrides) is not None:
            continue
        layer = run.targets[name]
        with replay.below(replay.index_of(name)):
            table[name] = measure_sensitivity(run.model, name, layer, dense_weight(layer), wh,
                                              candidate_ranks(run.specs[name], cfg.ratio), loss_fn, base)
    return table


# --------------------------------------------------------------------------------------------
# the two calibration modes
# --------------------------------------------------------------------------------------------
def _items(run: _Run, names):
    if run.progress:
        from tqdm.auto import tqdm
        return tqdm(list(names), desc="factorising", unit="layer")
    return names


def _compress_dense(run: _Run, calibration, grams, output_grams=None) -> tuple[list[LayerReport], int]:
    grams, tokens = _dense_grams(run, calibration, grams)
    whitenings = _DenseWhitenings(run, grams, _output_grams(run, calibration, output_grams))
    with run.timed("allocation_s"):
        decisions = _decide(run, whitenings.pairs(), calibration)
    reports = []
    for name in _items(run, list(run.targets)):
        g = grams.get(name)
        stats = None if g is None or g.n_tokens == 0 else GroupStats([name], g)
        with run.timed("factorize_s"):
            reports.append(factorize_layer(run, name, decisions.get(name), whitenings.get(name), stats))
        whitenings.release(name)
    return reports, tokens


def _compress_sequential(run: _Run, calibration) -> tuple[list[LayerReport], int]:
    """Each group whitened (and updated) with the inputs the compressed layers below produce."""
    cfg = run.config
    with run.timed("calibration_s"):
        groups = forward_groups(run.model, run.targets, calibration)
    with run.timed("allocation_s"):
        decisions = _decide(run, _streamed_pairs(run, groups, calibration), calibration)
    reference = copy.deepcopy(run.model) if cfg.update == "lstsq" else None  # still dense here
    stream = stream_stats(run.model, groups, calibration, cfg.calib_batch_size, cfg.calib_blocks,
                          cfg.calib_seq_len, reference)
    reports: dict[str, LayerReport] = {}
    tokens = 0
    for names in _items(run, groups):
        with run.timed("calibration_s"):
            stats = next(stream)
        tokens = max(tokens, stats.gram.n_tokens)
        with run.timed("factorize_s"):
            wh = _whitening(run, names[0], stats.gram)
            if run.config.whitened:
                _record_thin(run, names, stats.gram)
            for name in names:
                reports[name] = factorize_layer(run, name, decisions.get(name), wh, stats)
    del reference
    return [reports[n] for n in run.targets], tokens


# --------------------------------------------------------------------------------------------
# one layer
# --------------------------------------------------------------------------------------------
def _final_rank(run: _Run, spec: LayerSpec, dec: RankDecision, wh: Whitening | None
                ) -> tuple[int | None, str, str]:
    """(rank or None for dense, policy text, reason) after rounding and the whitening cap."""
    if dec.rank is None:
        return None, dec.policy, dec.reason
    cfg = run.config
    k, note = round_to_multiple(dec.rank, cfg.rank_multiple, spec.m, spec.n, cfg.force)
    if k is None:  # rounding reached break-even or the layer's size: stays dense
        return None, dec.policy, note
    policy = f"{dec.policy}; {note}" if note else dec.policy
    if wh is not None and k > wh.rank:
        k, policy = wh.rank, f"{dec.policy}; capped at whitening rank {wh.rank}"
    return k, policy, ""


def _lstsq_update(W: torch.Tensor, up: torch.Tensor, down: torch.Tensor, stats: GroupStats,
                  ridge: float = 0.0) -> tuple[torch.Tensor, float]:
    """(new up, share of the output error removed); cross/ref default to G (dense inputs).

    `ridge`: the jitter λ the whitening added to G; it is added to G, C and G_ref alike (as if
    pseudo-inputs √λ·e_i reached both models), so the update solves the very problem the
    whitened truncation solved and leaves it unchanged under dense calibration."""
    G = stats.gram.G
    C = G if stats.cross is None else stats.cross
    R = G if stats.ref_gram is None else stats.ref_gram
    if ridge:
        eye = ridge * torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
        G, C, R = G + eye, C + eye, R + eye
    new = lstsq_up(W, down, C, G)
    e0, e1 = output_error(W, up, down, C, G, R), output_error(W, new, down, C, G, R)
    return new, (1 - e1 / e0 if e0 > 0 else 0.0)


def factorize_layer(run: _Run, name: str, dec: RankDecision | None, wh: Whitening | None,
                    stats: GroupStats | None) -> LayerReport:
    """Factorise target `name` at its decided rank (dec None: energy policy, decided here from
    one full SVD), apply the update, swap the FactorizedLinear in; return its LayerReport."""
    cfg, spec, layer = run.config, run.specs[name], run.targets[name]
    W = dense_weight(layer)
    cdt, out_dtype = cfg.torch_compute_dtype, cfg.torch_dtype or W.dtype
    svd_once = None
    if dec is None:
        M = _target_matrix(run, W, wh)
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        svd_once = (U, S, Vh, float(M.square().sum()))
        dec = decide_ranks([spec], "energy", cfg.energy, cfg.overrides, {name: S}, cfg.force)[name]
    p_before = dense_params(spec.m, spec.n, spec.bias)
    k, policy, reason = _final_rank(run, spec, dec, wh)
    common = dict(name=name, kind=type(layer).__name__, d_in=spec.n, d_out=spec.m, bias=spec.bias,
                  break_even=break_even_rank(spec.m, spec.n), params_before=p_before,
                  bytes_before=p_before * W.element_size(), policy=policy)
    if k is None:
        return LayerReport(**common, rank=None, params_after=p_before, bytes_after=p_before * W.element_size(),
                           energy_kept=1.0, dropped_energy=0.0, dense=True, reason=reason)
    unwhiten = None if wh is None else wh.unwhiten
    if svd_once is not None:
        f = factors_from_svd(*svd_once[:3], k, svd_once[3], cdt, unwhiten, None if wh is None else wh.unwhiten_up)
    elif wh is None:
        f = truncated_svd(W, k, cfg.svd_solver, cfg.oversample, cfg.n_iter, cdt, cdt, cfg.seed)
    else:
        f = whitened_svd(W, wh, k, cfg.svd_solver, cfg.oversample, cfg.n_iter, cdt, cfg.seed)
    up, gain = f.up, None
    if cfg.update == "lstsq" and stats is not None:
        with run.timed("update_s"):
            up, gain = _lstsq_update(W, f.up, f.down, stats, wh.jitter if wh is not None else 0.0)
    bias = None if layer.bias is None else layer.bias.detach().to(out_dtype)
    new = FactorizedLinear.from_factors(up.to(W.device, out_dtype), f.down.to(W.device, out_dtype), bias)
    new.train(layer.training)
    set_module(run.model, name, new)
    p_after = factorized_params(k, spec.m, spec.n, spec.bias)
    return LayerReport(**common, rank=k, params_after=p_after,
                       bytes_after=p_after * torch.empty((), dtype=out_dtype).element_size(),
                       energy_kept=f.energy_kept(), dropped_energy=f.dropped_energy(), dense=False,
                       reason="", whitening=wh.describe() if wh is not None else "", update_gain=gain)
