"""Closed-form update of the up factor after truncation (`CompressConfig.update="lstsq"`).

A layer y = W x + b is replaced by y' = up·down·x' + b, where x' is the input the layer sees
in the compressed model and x the input it saw in the dense model (x' = x under dense
calibration). With `down` (k x n) fixed, the up factor (m x k) minimising the mean output error
over the N calibration tokens,

    E(up) = (1/N) Σ ||W x - up·down·x'||²,

is the least-squares solution  up = W C Dᵀ (D G' Dᵀ)⁻¹  with D = down,
C = (1/N) Σ x x'ᵀ (the cross-Gram) and G' = (1/N) Σ x' x'ᵀ; the bias cancels. A ridge
λ·I, λ = ridge·tr(D G' Dᵀ)/k, keeps the solve defined when D G' Dᵀ is singular.

Under dense calibration (C = G' = G = L Lᵀ) and whitened truncation (down = Σ_k^½ V_kᵀ L⁻¹,
W L = U Σ Vᵀ): D G Dᵀ = Σ_k and W G Dᵀ = U_k Σ_k^{3/2}, so up = U_k Σ_k^½ — the whitened
factors already are the joint rank-k optimum (Eckart–Young on W L) and the update changes
nothing. It helps with sequential calibration (x' ≠ x) and with plain SVD (down ignores G).
"""
from __future__ import annotations

import torch

RIDGE = 1e-8


def lstsq_up(W: torch.Tensor, down: torch.Tensor, cross: torch.Tensor, gram: torch.Tensor,
             ridge: float = RIDGE) -> torch.Tensor:
    """up = W C Dᵀ (D G' Dᵀ + λI)⁻¹ in float64 (W: m x n, down D: k x n, cross C and gram G':
    n x n as in the module docstring); λ = ridge·tr(D G' Dᵀ)/k."""
    W, D = W.detach().double(), down.detach().double()
    C, G = cross.double(), gram.double()
    A = D @ G @ D.mT
    A = (A + A.mT) / 2
    lam = ridge * float(A.diagonal().sum()) / max(A.shape[0], 1)
    A = A + lam * torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    B = W @ C @ D.mT                                   # m x k
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) == 0:
        return torch.cholesky_solve(B.mT, L).mT
    return torch.linalg.lstsq(A, B.mT).solution.mT     # singular even with the ridge


def output_error(W: torch.Tensor, up: torch.Tensor, down: torch.Tensor, cross: torch.Tensor,
                 gram: torch.Tensor, ref_gram: torch.Tensor) -> float:
    """E(up) = tr(W G_ref Wᵀ) - 2 tr(up D Cᵀ Wᵀ) + tr(up D G' Dᵀ upᵀ), G_ref = (1/N) Σ x xᵀ."""
    W, U, D = W.detach().double(), up.detach().double(), down.detach().double()
    P = U @ D
    e = ((W @ ref_gram.double()) * W).sum() - 2 * ((P @ cross.double().mT) * W).sum() \
        + ((P @ gram.double()) * P).sum()
    return max(float(e), 0.0)
