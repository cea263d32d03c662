"""Symmetric test matrices whose spectra are known exactly (by construction)."""

from __future__ import annotations

import numpy as np

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
