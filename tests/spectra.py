"""Symmetric float64 matrices with chosen spectra, for the statistical estimator tests.

Each is ``U diag(eigenvalues) U^T`` with one fixed random orthogonal ``U``, so its trace
is the sum of the eigenvalues and its diagonal is spread over all entries (not a diagonal
matrix, which would flatter Rademacher probes).
"""

from __future__ import annotations

import torch

DT = torch.float64


def rotated(eigenvalues: torch.Tensor, seed: int = 0) -> torch.Tensor:
    n = eigenvalues.numel()
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(n, n, dtype=DT, generator=g))
    A = U @ torch.diag(eigenvalues.to(DT)) @ U.T
    return (A + A.T) / 2


def decaying(n: int) -> torch.Tensor:
    """Eigenvalues ``k^-2``: the fast decay of a curvature spectrum."""
    return rotated(torch.arange(1, n + 1, dtype=DT) ** -2.0)


def indefinite(n: int) -> torch.Tensor:
    """Eigenvalues ``+-k^-1.5`` (every third negative), like a Hessian away from a minimum."""
    k = torch.arange(1, n + 1, dtype=DT)
    return rotated(k**-1.5 * torch.where(k % 3 == 0, -1.0, 1.0).to(DT))


def low_rank_plus_noise(n: int, rank: int = 10, noise: float = 0.05) -> torch.Tensor:
    """``rank`` outliers from 10 down to 1 over a flat bulk at ``noise``."""
    top = torch.linspace(10, 1, rank, dtype=DT)
    return rotated(torch.cat([top, torch.full((n - rank,), noise, dtype=DT)]))


def low_rank(n: int, rank: int) -> torch.Tensor:
    """Exactly rank ``rank``, eigenvalues of both signs."""
    top = torch.linspace(3, 1, rank, dtype=DT) * torch.where(
        torch.arange(rank) % 2 == 0, 1.0, -1.0
    ).to(DT)
    return rotated(torch.cat([top, torch.zeros(n - rank, dtype=DT)]))
