"""Activation-aware ("whitened") truncated SVD, as in SVD-LLM (Wang et al., 2024).

Let X (N x n) hold the N calibration inputs of a layer y = W x + b (W is m x n) and
G = XᵀX / N their second-moment (Gram) matrix. For any L with L Lᵀ = G the output error of a
replacement W' on the calibration set is

    ||(W - W') Xᵀ||_F² / N = tr((W - W') G (W - W')ᵀ) = ||(W - W') L||_F².

So with W L = U Σ Vᵀ, the best rank-k W' is U_k Σ_k V_kᵀ L⁻¹ (Eckart–Young applied to W L),
and its error equals Σ_{i>k} σ_i² of W L: truncating the smallest whitened singular values is
exactly truncating the least output energy. We store up = U_k Σ_k^½ and
down = Σ_k^½ V_kᵀ L⁻¹; L⁻¹ is never formed (triangular solve, or the eigen-pseudo-inverse).

The factor L:
- "cholesky": G = L Lᵀ with L lower triangular. When G is not numerically positive definite
  (fewer tokens than features, dead features) a jitter λ·I, λ = jitter·tr(G)/n, is added and
  multiplied by 10 until the factorisation succeeds; the identity above then holds for
  G + λI (a ridge: directions the calibration never visited are approximated like plain SVD).
- "eigh": G = Q Λ Qᵀ, eigenvalues ≤ rcond·λ_max treated as 0, L = Q_r Λ_r^½ (n x r) and
  L⁺ = Λ_r^{-½} Q_rᵀ. W' then acts as 0 on the part of the input space the calibration never
  reached (it is exact on the calibration data, which is what the identity measures).

Gram matrices are accumulated in float64 by forward pre-hooks (`collect_grams`); padding
tokens are excluded through the attention mask. Layers that read the very same input tensor
(q/k/v projections, gate/up projections) share one Gram matrix.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..layers import in_out_features
from .svd import SVDFactors, factors_from_svd, svd

log = logging.getLogger(__name__)

WHITEN_METHODS = ("cholesky", "eigh")
# "exact": every product xᵀx in float64; "mixed": per-batch products in the activation dtype with
# float32 accumulation (tensor cores on a GPU), summed over batches in float64.
CALIB_PRECISIONS = ("exact", "mixed")


# --------------------------------------------------------------------------------------------
# Gram matrices from calibration data
# --------------------------------------------------------------------------------------------
@dataclass
class Gram:
    """G = Σ x xᵀ / n_tokens over the calibration tokens that reached the layer (float64)."""

    G: torch.Tensor
    n_tokens: int


class GramCollector:
    """Forward pre-hooks on `modules` (name -> Linear/Conv1D) accumulating Σ xᵀx in `dtype`.

    Use as a context manager around the calibration forward passes; call `set_mask(mask)`
    before each forward with the batch's attention mask ([B, T], or None for no padding).
    Modules whose input is the same tensor object as the previous hooked module's input (and
    was not modified in place since) join that module's group and share its Gram matrix;
    `share_inputs=False` turns this off.
    """

    def __init__(self, modules: Mapping[str, nn.Module], dtype: torch.dtype = torch.float64,
                 share_inputs: bool = True, precision: str = "exact") -> None:
        if precision not in CALIB_PRECISIONS:
            raise ValueError(f"precision must be one of {CALIB_PRECISIONS}, got {precision!r}")
        self.modules = dict(modules)
        self.dtype = dtype
        self.precision = precision
        self.share_inputs = share_inputs
        self.leader: dict[str, str] = {}          # module name -> name owning its Gram
        self.sums: dict[str, torch.Tensor] = {}   # leader -> Σ x xᵀ
        self.counts: dict[str, int] = {}
        self._final: dict[str, Gram] = {}
        self._mask: torch.Tensor | None = None
        self._last: tuple[torch.Tensor, int, str] | None = None  # (input, its _version, leader)
        self._handles: list = []

    def set_mask(self, mask: torch.Tensor | None) -> None:
        self._mask = None if mask is None else mask.bool()
        self._last = None

    def __enter__(self) -> "GramCollector":
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_pre_hook(self._hook(name), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._last = None
        self._mask = None

    def _rows(self, x: torch.Tensor, d_in: int) -> torch.Tensor:
        if x.shape[-1] != d_in:
            raise RuntimeError(f"hooked input has {x.shape[-1]} features, layer expects {d_in}")
        rows = x.reshape(-1, d_in)
        mask = self._mask
        if mask is None:
            return rows
        if tuple(x.shape[:-1]) == tuple(mask.shape):
            return rows[mask.reshape(-1).to(rows.device)]
        if bool(mask.all()):
            return rows
        raise RuntimeError(f"cannot align the attention mask {tuple(mask.shape)} with a layer input "
                           f"of shape {tuple(x.shape)}; pass calibration without padding")

    def _hook(self, name: str):
        d_in = in_out_features(self.modules[name])[0]

        def hook(module, args, kwargs):
            x = args[0] if args else kwargs.get("input", kwargs.get("x"))
            last = self._last
            same = (self.share_inputs and last is not None and x is last[0]
                    and x._version == last[1])
            leader = self.leader.get(name)
            if leader is None:  # first call: join the previous module's group or start one
                leader = last[2] if same else name
                self.leader[name] = leader
            if leader != name:
                if same and last[2] == leader:
                    return None  # same tensor as the group's leader: already counted
                raise RuntimeError(
                    f"{name} shared its input with {leader} on the first calibration batch but not "
                    "now; collect with share_inputs=False")
            rows = self._rows(x.detach(), d_in)
            acc = self.sums.get(name)
            if acc is None:
                acc = self.sums[name] = torch.zeros(d_in, d_in, dtype=self.dtype, device=rows.device)
                self.counts[name] = 0
            if self.precision == "mixed":
                acc.add_(batch_gram(rows))
            else:
                rows = rows.to(self.dtype)
                acc.addmm_(rows.mT, rows)
            self.counts[name] += rows.shape[0]
            self._last = (x, x._version, name)
            return None

        return hook

    def grams(self) -> dict[str, Gram]:
        """name -> Gram (the mean x xᵀ); members of a shared group get the same object.

        The sums are divided in place (no second copy of every Gram matrix in memory), so
        collection ends here: later calls return the same Gram objects."""
        out: dict[str, Gram] = {}
        for name in self.modules:
            leader = self.leader.get(name)
            if leader is None or leader not in self.sums:
                continue
            if leader not in self._final:
                n = self.counts[leader]
                self._final[leader] = Gram(self.sums[leader].div_(max(n, 1)), n)
            out[name] = self._final[leader]
        return out


def batch_gram(rows: torch.Tensor) -> torch.Tensor:
    """xᵀx of one batch for the "mixed" precision: half-precision inputs multiplied on the tensor
    cores with float32 accumulation (their products are exact in float32), float32 inputs in
    float32; the caller sums batches in float64."""
    if rows.is_cuda and rows.dtype in (torch.bfloat16, torch.float16):
        try:
            return torch.mm(rows.mT, rows, out_dtype=torch.float32)
        except (TypeError, RuntimeError):  # torch without mm(out_dtype=)
            pass
    rows = rows.float()
    return rows.mT @ rows


def iter_batches(calibration, batch_size: int, n_blocks: int | None = None,
                 seq_len: int | None = None
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """(input_ids, attention_mask | None) batches of a LongTensor [n_blocks, seq_len] or a dict
    with "input_ids" (and optionally "attention_mask"); keeps the first `n_blocks` blocks and
    the first `seq_len` tokens of each when given."""
    if isinstance(calibration, Mapping):
        if "input_ids" not in calibration:
            raise ValueError("calibration dict needs an 'input_ids' entry")
        ids, mask = calibration["input_ids"], calibration.get("attention_mask")
    else:
        ids, mask = calibration, None
    if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.long, torch.int32, torch.int64):
        raise ValueError("calibration must be a LongTensor [n_blocks, seq_len] of token ids "
                         "(or a dict with input_ids / attention_mask)")
    if ids.dim() == 1:
        ids = ids[None]
        mask = None if mask is None else mask.reshape(1, -1)
    if ids.dim() != 2 or ids.numel() == 0:
        raise ValueError(f"calibration must be [n_blocks, seq_len], got shape {tuple(ids.shape)}")
    if mask is not None and mask.shape != ids.shape:
        raise ValueError(f"attention_mask {tuple(mask.shape)} does not match input_ids {tuple(ids.shape)}")
    ids = ids[:n_blocks, :seq_len]
    mask = None if mask is None else mask[:n_blocks, :seq_len]
    for i in range(0, ids.shape[0], batch_size):
        yield ids[i:i + batch_size], None if mask is None else mask[i:i + batch_size]


@torch.no_grad()
def collect_grams(model: nn.Module, modules: Mapping[str, nn.Module], calibration,
                  batch_size: int = 4, n_blocks: int | None = None, seq_len: int | None = None,
                  dtype: torch.dtype = torch.float64, share_inputs: bool = True,
                  progress: bool = False, precision: str = "exact") -> dict[str, Gram]:
    """Run `model` over the calibration blocks (eval mode, no cache) and return the input Gram
    of every module in `modules`."""
    was_training = model.training
    model.eval()
    try:
        with GramCollector(modules, dtype=dtype, share_inputs=share_inputs, precision=precision) as collector:
            for kwargs, mask in model_batches(model, calibration, batch_size, n_blocks, seq_len, progress):
                collector.set_mask(mask)
                model(**kwargs)
        return collector.grams()
    finally:
        model.train(was_training)


def model_batches(model: nn.Module, calibration, batch_size: int, n_blocks: int | None = None,
                  seq_len: int | None = None, progress: bool = False, desc: str = "calibration"
                  ) -> Iterator[tuple[dict, torch.Tensor | None]]:
    """(the model's keyword arguments, attention mask | None) per calibration batch
    (`iter_batches`), on the model's device, without a KV cache."""
    device = next(model.parameters()).device
    batches: Iterable = list(iter_batches(calibration, batch_size, n_blocks, seq_len))
    if progress:
        from tqdm.auto import tqdm
        batches = tqdm(batches, desc=desc, unit="batch")
    for ids, mask in batches:
        kwargs = {"input_ids": ids.to(device), "use_cache": False}
        mask = None if mask is None else mask.to(device)
        if mask is not None:
            kwargs["attention_mask"] = mask
        yield kwargs, mask


# --------------------------------------------------------------------------------------------
# Whitening factor and whitened SVD
# --------------------------------------------------------------------------------------------
@dataclass
class Whitening:
    """L with L Lᵀ = G (+ jitter·I): lower triangular (n x n) for "cholesky", Q_r Λ_r^½ (n x r)
    for "eigh" (where `scale` holds Λ_r^½ and `Q` the kept eigenvectors)."""

    method: str
    L: torch.Tensor
    jitter: float = 0.0          # absolute value added to G's diagonal (0: none)
    rank: int = 0                # columns of L
    Q: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    left: "Whitening | None" = None  # R (R Rᵀ = F, the output-gradient Gram) for method="fisher"

    def whiten(self, W: torch.Tensor) -> torch.Tensor:
        """W L (m x r), or Rᵀ W L with an output factor R, computed in L's dtype."""
        M = W.to(self.L.dtype) @ self.L
        return M if self.left is None else self.left.L.mT.to(M.dtype) @ M

    def unwhiten_up(self, M: torch.Tensor) -> torch.Tensor:
        """R⁻ᵀ M (m x k) for an output factor R (triangular solve); M itself without one."""
        if self.left is None:
            return M
        if self.left.method != "cholesky":
            raise ValueError("the output factor R must be a Cholesky factor")
        return torch.linalg.solve_triangular(self.left.L.mT.to(M.dtype), M, upper=True)

    def unwhiten(self, M: torch.Tensor) -> torch.Tensor:
        """M L⁻¹ (k x n) for M (k x r): triangular solve, or M Λ_r^{-½} Q_rᵀ for "eigh"."""
        M = M.to(self.L.dtype)
        if self.method == "cholesky":
            return torch.linalg.solve_triangular(self.L, M, upper=False, left=False)
        return (M / self.scale) @ self.Q.mT

    def describe(self) -> str:
        if self.method == "cholesky":
            text = "cholesky" if self.jitter == 0 else f"cholesky+jitter({self.jitter:.2e})"
        else:
            text = f"eigh(rank {self.rank}/{self.L.shape[0]})"
        return text if self.left is None else f"{text}; output {self.left.describe()}"


def whitening_factor(G: torch.Tensor, method: str = "cholesky", jitter: float = 1e-8,
                     max_tries: int = 10, rcond: float | None = None) -> Whitening:
    """Factor the Gram matrix G (n x n, symmetric PSD) as L Lᵀ, in G's dtype (use float64).

    cholesky: plain first; when it fails, or a pivot is tiny (L_ii² ≤ n·eps·max G_ii, i.e. G
    is singular to working precision), retry with G + λI, λ = jitter·tr(G)/n, λ x10 per try.
    eigh: eigenvalues ≤ rcond·λ_max (default rcond = n·eps) are dropped (pseudo-inverse).
    """
    if method not in WHITEN_METHODS:
        raise ValueError(f"whiten_method must be one of {WHITEN_METHODS}, got {method!r}")
    if G.dim() != 2 or G.shape[0] != G.shape[1]:
        raise ValueError(f"G must be square, got {tuple(G.shape)}")
    n = G.shape[0]
    G = (G + G.mT) / 2  # exact symmetry; accumulation rounding can break it by an ulp
    eps = torch.finfo(G.dtype).eps
    diag_max = float(G.diagonal().max()) if n else 0.0
    if method == "eigh":
        evals, Q = torch.linalg.eigh(G)
        cut = (rcond if rcond is not None else n * eps) * max(float(evals[-1]), 0.0)
        keep = evals > cut
        if not bool(keep.any()):
            raise ValueError("Gram matrix is zero: no calibration signal reached this layer")
        Q = Q[:, keep].flip(-1)                  # descending eigenvalues
        scale = evals[keep].flip(-1).sqrt()
        return Whitening("eigh", Q * scale, 0.0, int(keep.sum()), Q, scale)

    tiny = n * eps * max(diag_max, 0.0)
    base = float(G.diagonal().sum()) / max(n, 1)
    if base <= 0:
        raise ValueError("Gram matrix is zero: no calibration signal reached this layer")
    lam = 0.0
    eye = torch.eye(n, dtype=G.dtype, device=G.device)
    for attempt in range(max_tries + 1):
        L, info = torch.linalg.cholesky_ex(G + lam * eye if lam else G)
        if int(info) == 0 and float(L.diagonal().square().min()) > tiny:
            if lam:
                log.info("cholesky needed jitter %.3e (%.1e x mean diagonal)", lam, lam / base)
            return Whitening("cholesky", L, lam, n)
        lam = jitter * base if attempt == 0 else lam * 10
    raise ValueError(f"Cholesky of the Gram matrix failed even with jitter {lam / 10:.3e}; "
                     "use whiten_method='eigh'")


def whitened_spectrum(W: torch.Tensor, whitening: Whitening) -> torch.Tensor:
    """Singular values of W L (descending, in L's dtype)."""
    return torch.linalg.svdvals(whitening.whiten(W.detach()))


def whitened_svd(W: torch.Tensor, whitening: Whitening, k: int, solver: str = "full",
                 oversample: int = 10, n_iter: int = 2, dtype: torch.dtype | None = None,
                 seed: int = 0) -> SVDFactors:
    """Rank-k factors minimising the calibration output error: up = U_k Σ_k^½,
    down = Σ_k^½ V_kᵀ L⁻¹ with W L = U Σ Vᵀ (with an output factor R: Rᵀ W L = U Σ Vᵀ and
    up = R⁻ᵀ U_k Σ_k^½, the K-FAC loss model of hylorada/compress/curvature.py). `s` / `total_energy` are those of W L, so
    `dropped_energy()` is the mean squared output error per calibration token."""
    M = whitening.whiten(W.detach())
    m, r = M.shape
    if not 1 <= k <= min(m, r):
        raise ValueError(f"k must be in [1, {min(m, r)}] (min of d_out and the whitening rank), got {k}")
    gen = None
    if solver == "randomized":
        gen = torch.Generator(device=M.device).manual_seed(seed)
    U, S, Vh = svd(M, k, solver, oversample, n_iter, gen)
    return factors_from_svd(U, S, Vh, k, float(M.square().sum()), dtype or W.dtype, whitening.unwhiten,
                            whitening.unwhiten_up)

