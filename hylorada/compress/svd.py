"""Truncated SVD of a weight matrix, split into the two factors of a FactorizedLinear.

For W (m x n) = U Σ Vᵀ, the best rank-k approximation in the Frobenius (and spectral) norm is
W_k = U_k Σ_k V_kᵀ (Eckart–Young–Mirsky), with ||W - W_k||_F² = Σ_{i>k} σ_i². We split it
symmetrically: up = U_k Σ_k^½ (m x k), down = Σ_k^½ V_kᵀ (k x n), so W_k = up @ down.

Two solvers:
- "full": LAPACK/cuSOLVER SVD (`torch.linalg.svd`, reduced), exact to working precision and
  returns every singular value;
- "randomized": Halko, Martinsson & Tropp (2011), Algorithm 4.4 with oversampling p and q
  power (subspace) iterations, re-orthonormalised by QR at every step so that the small
  singular values are not lost to rounding. Cost O(m n (k + p) (2q + 2)) instead of
  O(m n min(m, n)); only the top k + p singular values are estimated.

- "gram": the eigen-decomposition of the smaller Gram matrix (MᵀM or MMᵀ): σ_i² are its
  eigenvalues, the other side's vectors follow by one product (U_k = M V_k Σ_k⁻¹). On a GPU
  `eigh` is several times faster than `svd` (cuSOLVER syevd vs gesvd); squaring the condition
  number costs relative accuracy only in singular values below sqrt(eps)·σ_max, which the kept
  energy and the top-k factors do not depend on (the benchmark checks the kept energy against
  the "full" path).

Computation runs in `compute_dtype` (float64 by default) and the factors are cast back to the
requested dtype (the input's by default).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

SOLVERS = ("full", "randomized", "gram")


@dataclass
class SVDFactors:
    """up (m x k) @ down (k x n) ≈ W; `s` the singular values the solver computed (descending,
    in compute precision): all min(m, n) of them for "full", the top k + oversample estimates for
    "randomized"; `total_energy` = ||W||_F² (exact, in compute precision)."""

    up: torch.Tensor
    down: torch.Tensor
    s: torch.Tensor
    total_energy: float

    @property
    def rank(self) -> int:
        return self.up.shape[1]

    def energy_kept(self) -> float:
        """Fraction of ||W||_F² in the kept singular values: Σ_{i≤k} σ_i² / Σ σ_i²."""
        if self.total_energy <= 0.0:
            return 1.0
        return float((self.s[: self.rank].double().square().sum() / self.total_energy).clamp(max=1.0))

    def dropped_energy(self) -> float:
        """Σ_{i>k} σ_i² = ||W - up@down||_F² (exact arithmetic), from the total minus the kept part."""
        kept = float(self.s[: self.rank].double().square().sum())
        return max(self.total_energy - kept, 0.0)


def _check_solver(solver: str) -> None:
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")


def randomized_svd(A: torch.Tensor, q: int, n_iter: int = 2,
                   generator: torch.Generator | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Approximate top-q SVD of A (m x n): returns U (m x q), S (q), Vh (q x n).

    Range finder with a Gaussian test matrix, `n_iter` power iterations (each A Aᵀ application
    re-orthonormalised by QR), then an exact SVD of the small q x n matrix B = Qᵀ A.
    """
    m, n = A.shape
    q = min(q, m, n)
    transpose = m < n  # work on the tall orientation: the sketch is n x q with n the short side
    if transpose:
        A = A.mT
        m, n = n, m
    omega = torch.randn(n, q, dtype=A.dtype, device=A.device, generator=generator)
    Q = torch.linalg.qr(A @ omega).Q
    for _ in range(n_iter):
        Z = torch.linalg.qr(A.mT @ Q).Q
        Q = torch.linalg.qr(A @ Z).Q
    B = Q.mT @ A  # q x n
    Ub, S, Vh = torch.linalg.svd(B, full_matrices=False)
    U = Q @ Ub
    if transpose:
        return Vh.mT, S, U.mT
    return U, S, Vh


def svd(M: torch.Tensor, k: int, solver: str = "full", oversample: int = 10, n_iter: int = 2,
        generator: torch.Generator | None = None
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U (m x r), S (r), Vh (r x n) of M in M's dtype; r = min(m, n) for "full", k + oversample
    (capped) for "randomized"."""
    _check_solver(solver)
    if solver == "full":
        return torch.linalg.svd(M, full_matrices=False)
    if solver == "gram":
        return gram_svd(M, k)
    return randomized_svd(M, k + oversample, n_iter=n_iter, generator=generator)


def gram_svd(M: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U (m x k), S (all min(m, n) singular values), Vh (k x n) of M from `eigh` of the smaller
    Gram matrix. Directions with σ = 0 get a zero vector (their factor contributes nothing)."""
    m, n = M.shape
    tall = m >= n
    evals, vecs = torch.linalg.eigh(M.mT @ M if tall else M @ M.mT)
    S = evals.flip(0).clamp_min(0).sqrt()
    top = vecs[:, -k:].flip(1) if k else vecs[:, :0]
    inv = torch.where(S[:k] > 0, 1.0 / S[:k].clamp_min(torch.finfo(S.dtype).tiny), torch.zeros_like(S[:k]))
    if tall:  # V_k = top, U_k = M V_k / σ
        return (M @ top) * inv, S, top.mT
    return top, S, (top.mT @ M) * inv[:, None]


def split_factors(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, k: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """up = U_k Σ_k^½, down = Σ_k^½ V_kᵀ (same dtype as the inputs)."""
    root = S[:k].clamp(min=0).sqrt()
    return U[:, :k] * root, root[:, None] * Vh[:k]


def factors_from_svd(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, k: int, total: float,
                     dtype: torch.dtype, unwhiten=None, unwhiten_up=None) -> SVDFactors:
    """SVDFactors of rank k from an SVD U S Vh of M (whose ||M||_F² is `total`): up = U_k Σ_k^½,
    down = Σ_k^½ V_kᵀ, passed through `unwhiten` (M ↦ M L⁻¹) when M was whitened, and up
    through `unwhiten_up` (M ↦ R⁻ᵀ M) when M was also weighted on the output side."""
    up, down = split_factors(U, S, Vh, k)
    if unwhiten is not None:
        down = unwhiten(down)
    if unwhiten_up is not None:
        up = unwhiten_up(up)
    return SVDFactors(up.to(dtype), down.to(dtype), S, total)


def truncated_svd(W: torch.Tensor, k: int, solver: str = "full", oversample: int = 10,
                  n_iter: int = 2, compute_dtype: torch.dtype = torch.float64,
                  dtype: torch.dtype | None = None, seed: int = 0) -> SVDFactors:
    """Rank-k factors of W (m x n): up = U_k Σ_k^½ (m x k), down = Σ_k^½ V_kᵀ (k x n).

    `solver` "full" or "randomized" (`oversample` extra columns, `n_iter` power iterations,
    a Gaussian sketch seeded by `seed`). The SVD runs in `compute_dtype`; the factors come back
    in `dtype` (default: W's dtype) on W's device.
    """
    _check_solver(solver)
    if W.dim() != 2:
        raise ValueError(f"W must be a matrix, got shape {tuple(W.shape)}")
    m, n = W.shape
    if not 1 <= k <= min(m, n):
        raise ValueError(f"k must be in [1, min(m, n) = {min(m, n)}], got {k}")
    if oversample < 0 or n_iter < 0:
        raise ValueError(f"oversample and n_iter must be >= 0, got {oversample}, {n_iter}")
    out_dtype = dtype or W.dtype
    M = W.detach().to(compute_dtype)
    gen = None
    if solver == "randomized":
        gen = torch.Generator(device=M.device).manual_seed(seed)
    U, S, Vh = svd(M, k, solver, oversample, n_iter, gen)
    return factors_from_svd(U, S, Vh, k, float(M.square().sum()), out_dtype)
