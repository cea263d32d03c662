"""Symmetric float64 matrices whose spectra are known by construction.

Two families: torch matrices ``U diag(eigenvalues) U^T`` for the statistical estimator
tests (one fixed random orthogonal ``U``, so the diagonal is spread over all entries and
does not flatter Rademacher probes), and NumPy matrices with clustered, degenerate and
indefinite spectra for the eigensolver tests.
"""

from __future__ import annotations

import numpy as np
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

KINDS = ["diagonal", "conjugated", "clustered", "degenerate", "indefinite"]


def known_spectrum(kind: str, n: int = 48) -> np.ndarray:
    """The eigenvalues, ascending, of the matrix :func:`known_matrix` builds."""
    if kind == "diagonal":
        return np.linspace(1.0, 10.0, n)
    if kind == "conjugated":
        return np.geomspace(0.1, 20.0, n)
    if kind == "clustered":
        # two tight clusters at the top and bottom, gap 1e-3 inside each
        mid = np.linspace(2.0, 8.0, n - 8)
        return np.sort(np.concatenate([1 + 1e-3 * np.arange(4), 10 + 1e-3 * np.arange(4), mid]))
    if kind == "degenerate":
        # a triple eigenvalue at each end
        return np.sort(np.concatenate([[0.5] * 3, [9.0] * 3, np.linspace(1.0, 8.0, n - 6)]))
    if kind == "indefinite":
        return np.linspace(-4.0, 6.0, n)
    raise KeyError(kind)


def known_matrix(kind: str, n: int = 48, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(A, eigenvalues)``: ``A = Q diag(eigenvalues) Q^T``, float64 (diagonal: Q = I)."""
    lam = known_spectrum(kind, n)
    if kind == "diagonal":
        return np.diag(lam), lam
    Q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    A = (Q * lam) @ Q.T
    return (A + A.T) / 2, lam


def expected(lam: np.ndarray, k: int, which: str) -> np.ndarray:
    """The ``k`` eigenvalues ``which`` selects, ascending (scipy's order)."""
    if which == "LA":
        return lam[-k:]
    if which == "SA":
        return lam[:k]
    if which == "LM":
        return np.sort(lam[np.argsort(np.abs(lam))[-k:]])
    if which == "SM":
        return np.sort(lam[np.argsort(np.abs(lam))[:k]])
    if which == "BE":
        # scipy: one more from the high end when k is odd
        return np.concatenate([lam[: k // 2], lam[-(k - k // 2):]])
    raise KeyError(which)
