"""Turning a backend's raw eigenpairs into an :class:`EigshResult` the same way everywhere.

Backends hand over whatever their solver returned (NumPy, CuPy or torch; any order;
possibly fewer pairs than asked for); this module sorts ascending, puts the vectors on
the operator's device in its dtype, checks residuals and pads missing pairs with NaN.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch

from torchcurv.algorithms.arguments import as_tensor, check_which
from torchcurv.algorithms.result import (
    ConvergenceHistory,
    EigshInfo,
    EigshResult,
    converged_mask,
    relative_residuals,
    residual_norms,
)
from torchcurv.operators.base import LinearOperator


def synchronize(device: torch.device) -> None:
    """Wait for queued work on ``device`` (a no-op on the CPU), so timings are honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """Wall-clock seconds on ``device``, synchronised at start and stop."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        synchronize(device)
        self._start = time.perf_counter()

    def elapsed(self) -> float:
        synchronize(self.device)
        return time.perf_counter() - self._start


def assemble_result(
    op: LinearOperator,
    eigenvalues: Any,
    eigenvectors: Any | None,
    *,
    k: int,
    backend: str,
    which: str,
    tol: float,
    num_matvecs: int,
    wall_time: float,
    info: EigshInfo | None = None,
    residuals: torch.Tensor | None = None,
    history: ConvergenceHistory | None = None,
) -> EigshResult:
    """Build the result from ``k' <= k`` found pairs.

    Args:
        op: the operator the pairs belong to (residuals use its ``matmat``, uncounted).
        eigenvalues: ``(k',)`` in any order.
        eigenvectors: ``(n, k')`` matching ``eigenvalues``, or ``None``.
        residuals: ``(k',)`` already computed by the backend for these pairs (saves
            the check's products); computed here from the vectors when ``None``, and
            the ``k'`` products added to ``info.check_matvecs``.
        history: what the backend saw while it ran; ``None``: one point, the result's
            true residuals after all ``num_matvecs`` products (``source="final"``).

    The ``k - k'`` missing pairs become NaN eigenvalues (sorted last, as NumPy sorts NaN),
    NaN eigenvector columns and ``converged=False``. Without vectors or residuals, each
    found value counts as converged (the backend's own verdict) and residuals are NaN.
    """
    vals = as_tensor(eigenvalues).detach().to("cpu", torch.float64).reshape(-1)
    found = vals.numel()
    if found > k:
        raise AssertionError(f"backend {backend!r} returned {found} eigenvalues for k={k}")
    order = torch.argsort(vals)
    vals = vals[order]
    missing = k - found
    nan = torch.full((missing,), float("nan"), dtype=torch.float64)
    info = EigshInfo() if info is None else info
    if residuals is not None:
        residuals = residuals.to("cpu", torch.float64).reshape(-1)[order]
    if eigenvectors is None:
        vecs = None
    else:
        V = as_tensor(eigenvectors).detach().to(op.device, op.dtype)[:, order.to(op.device)]
        if residuals is None and found:
            residuals = residual_norms(op, vals, V)
            info = dataclasses.replace(info, check_matvecs=(info.check_matvecs or 0) + found)
        pad = torch.full((op.n, missing), float("nan"), dtype=op.dtype, device=op.device)
        vecs = torch.cat([V, pad], dim=1)
    if residuals is None:
        # No vectors to check: each found value carries the backend's own verdict.
        res = torch.full((k,), float("nan"), dtype=torch.float64)
        found_ok = torch.ones(found, dtype=torch.bool)
    else:
        res = torch.cat([residuals, nan])
        found_ok = converged_mask(vals, residuals, tol)
    converged = torch.cat([found_ok, torch.zeros(missing, dtype=torch.bool)])
    if history is None:
        history = ConvergenceHistory((int(num_matvecs),),
                                     (relative_residuals(torch.cat([vals, nan]), res),), "final")
    return EigshResult(
        eigenvalues=torch.cat([vals, nan]),
        eigenvectors=vecs,
        residuals=res,
        converged=converged,
        num_matvecs=int(num_matvecs),
        wall_time=float(wall_time),
        backend=backend,
        which=check_which(which),
        tol=float(tol),
        info=dataclasses.replace(info, history=history),
    )
