"""Shift-invert for :func:`torchcurv.eigsh`: the eigenvalues of ``A`` nearest ``sigma``.

The eigenpairs of ``A`` are those of ``(A - sigma I)^{-1}`` with ``nu = 1 / (lambda -
sigma)``, so the eigenvalues nearest ``sigma`` become the largest in magnitude, which
Krylov methods find fast. ``(A - sigma I)^{-1}`` is an
:class:`~torchcurv.InverseOperator` with inner MINRES solves (``A - sigma I`` is
indefinite whenever ``sigma`` lies inside the spectrum). ``which`` refers to ``nu``, as in
scipy's ``eigsh(sigma=...)``: ``'LM'`` (nearest ``sigma``), ``'SM'`` (farthest),
``'LA'`` (nearest above), ``'SA'`` (nearest below), ``'BE'``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import scipy.sparse.linalg as sla
import torch

from torchcurv.algorithms.arguments import check_start, check_tol
from torchcurv.algorithms.assemble import Stopwatch, assemble_result
from torchcurv.algorithms.eigsh import backend_function, check_backend_options
from torchcurv.algorithms.result import ConvergenceHistory, EigshInfo, EigshResult, start_block
from torchcurv.interop.scipy import as_linear_operator
from torchcurv.operators.base import LinearOperator
from torchcurv.operators.inverse import InverseOperator

SHIFT_INVERT_BACKENDS = ("arpack", "lanczos", "block")


def shift_invert_eigsh(
    op: LinearOperator, *, sigma: float, backend: str, k: int, which: str, tol: float,
    maxiter: int | None, seed: int | None, return_eigenvectors: bool,
    solve_tol: float | None = None, solve_maxiter: int | None = None, **options: Any,
) -> EigshResult:
    """``k`` eigenpairs of ``op`` nearest ``sigma`` (``which`` on ``nu``, see above).

    ``arpack`` runs ``scipy.sparse.linalg.eigsh(A, sigma=sigma, OPinv=...)`` with the
    inverse's adapter as ``OPinv``; ``lanczos`` and ``block`` run on the inverse and
    map ``lambda = sigma + 1 / nu``. Every returned pair is checked against ``A`` itself
    (residuals and ``converged`` as for any :class:`EigshResult`).

    Args:
        solve_tol: relative tolerance of the inner MINRES solves (default ``tol / 100``,
            at least 10 machine epsilons): an inner error ``delta`` perturbs
            ``lambda - sigma`` by about ``delta`` relative.
        solve_maxiter: most MINRES iterations per inner solve (default ``10 n``).
        **options: passed to the backend (``ncv``, ``v0``, ...).

    ``num_matvecs`` counts every product with ``A`` the run made (the inner solves',
    those of the backend's checks on the inverse included). An inner solve that misses
    ``solve_tol`` raises :class:`~torchcurv.NotConvergedError` (``sigma`` on an
    eigenvalue makes ``A - sigma I`` singular: move ``sigma`` slightly).
    """
    if backend not in SHIFT_INVERT_BACKENDS:
        raise ValueError(
            f"shift-invert (sigma=) runs on the backends {SHIFT_INVERT_BACKENDS}, not "
            f"{backend!r}"
        )
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not np.isfinite(sigma):
        raise ValueError(f"sigma must be a finite real number, got {sigma!r}")
    tol = check_tol(tol, op.dtype)
    eps = float(torch.finfo(op.dtype).eps)
    inner_tol = max(tol / 100, 10 * eps) if solve_tol is None else check_tol(solve_tol, op.dtype)
    inverse = InverseOperator(op, -float(sigma), method="minres", tol=inner_tol,
                              maxiter=solve_maxiter)
    before = op.num_matvecs
    if backend == "arpack":
        result = _arpack(op, inverse, float(sigma), k, which, tol, maxiter, seed,
                         return_eigenvectors, **options)
    else:
        check_backend_options(backend, options)
        fn = backend_function(backend)
        clock = Stopwatch(op.device)
        inner = fn(inverse, k=k, which=which, tol=tol, maxiter=maxiter, seed=seed,
                   return_eigenvectors=return_eigenvectors, **options)
        nu = inner.eigenvalues
        lam = float(sigma) + 1.0 / nu
        result = assemble_result(
            op, lam.numpy(), inner.eigenvectors, k=k, backend=backend, which=which, tol=tol,
            num_matvecs=0, wall_time=clock.elapsed(), info=inner.info)
    # products of A (inside the inner solves), not of the inverse the backend iterated on:
    # the history is the final point in terms of lambda
    used = op.num_matvecs - before
    assert result.info.history is not None
    history = ConvergenceHistory((used,), result.info.history.residuals, "final")
    return dataclasses.replace(result, num_matvecs=used,
                               info=dataclasses.replace(result.info, history=history))


def _arpack(op, inverse, sigma, k, which, tol, maxiter, seed, return_eigenvectors,
            ncv=None, v0=None) -> EigshResult:
    if v0 is None:
        v0 = start_block(op.n, 1, torch.float64, torch.device("cpu"), seed)[:, 0]
    v0 = check_start(v0, op.n, 1)[:, 0].cpu().numpy()
    clock = Stopwatch(op.device)
    out = sla.eigsh(as_linear_operator(op), k=k, sigma=sigma, which=which,
                    OPinv=as_linear_operator(inverse), v0=v0, ncv=ncv, maxiter=maxiter,
                    tol=tol, return_eigenvectors=return_eigenvectors)
    vals, vecs = out if return_eigenvectors else (out, None)
    return assemble_result(op, vals, vecs, k=k, backend="arpack", which=which, tol=tol,
                           num_matvecs=0, wall_time=clock.elapsed(),
                           info=EigshInfo(ncv=ncv, solver_dtype="float64"))
