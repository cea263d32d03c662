"""The "lobpcg" backend: scipy's LOBPCG on the host, with block products.

LOBPCG multiplies whole blocks (one ``matmat`` per iteration through
:func:`torchcurv.as_linear_operator`), so it suits operators whose block product is
cheaper per vector than single products. It finds the largest ('LA') or smallest
('SA') eigenvalues only.

scipy's LOBPCG stops on an *absolute* residual norm, while torchcurv's contract is
relative (``||r_i|| <= tol * |lambda_i|``). This backend therefore runs LOBPCG in
rounds: the first with ``tol`` times a scale estimate (the root-mean-square of
``||A x|| / ||x||`` over the start block, which estimates the RMS eigenvalue), each
next one warm-started from the previous block with ``tol * min_i |lambda_i|``, until
every wanted pair meets the relative test, ``maxiter`` iterations are spent in total,
or ``max_rounds`` rounds ran.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse.linalg as sla
import torch

from torchcurv.algorithms.arguments import check_start, check_tol
from torchcurv.algorithms.assemble import Stopwatch, assemble_result
from torchcurv.algorithms.eigsh import check_backend_serves
from torchcurv.algorithms.result import (
    ConvergenceHistory,
    EigshInfo,
    EigshResult,
    relative_residuals,
    start_block,
)
from torchcurv.interop.scipy import as_linear_operator
from torchcurv.operators.base import LinearOperator

DEFAULT_MAXITER = 200


def lobpcg_eigsh(
    op: LinearOperator,
    *,
    k: int,
    which: str,
    tol: float,
    maxiter: int | None,
    seed: int | None,
    return_eigenvectors: bool,
    block_size: int | None = None,
    X0=None,
    dtype=np.float64,
    max_rounds: int = 4,
) -> EigshResult:
    """``k`` extreme eigenpairs of ``op`` by ``scipy.sparse.linalg.lobpcg``.

    ``op``, ``k``, ``tol``, ``seed``, ``return_eigenvectors``: as for
    :func:`torchcurv.eigsh`.

    Args:
        which: 'LA' or 'SA' (LOBPCG has no 'LM'/'SM'/'BE').
        maxiter: LOBPCG iterations over all rounds (default 200; scipy's own default
            of 20 rarely reaches 1e-6). Counted from operator calls, so approximate
            when LOBPCG restarts internally.
        block_size: vectors iterated, ``k <= block_size < n``. Default
            ``min(2k, k + 8)``, lowered to ``n // 5`` (not below ``k``) because scipy
            switches to a dense solver when ``n < 5 * block_size``. The extra vectors
            matter: with exactly ``k``, LOBPCG stalls near 1e-8 on the bottom of a
            spectrum whose condition is 200 (tests/spectra.py, 'conjugated').
        X0: ``(n, block_size)`` start block (NumPy or torch); default standard normal
            from ``seed``.
        dtype: precision LOBPCG works in (float64 default).
        max_rounds: limit on warm restarts with a tightened absolute tolerance.

    ``info.history`` holds LOBPCG's own residual norms of the wanted iterates at every
    iteration of every round (``source="iterates"``), read from
    ``retResidualNormsHistory``/``retLambdaHistory``, each at the product count of the
    block product it came from (recorded per call, so nothing changes in the solve).
    """
    which = check_backend_serves("lobpcg", which)
    tol = check_tol(tol, op.dtype)
    n = op.n
    m = max(k, min(2 * k, k + 8, n // 5)) if block_size is None else int(block_size)
    if not k <= m < n:
        raise ValueError(f"block_size must satisfy k={k} <= block_size < n={n}, got {m}")
    maxiter = DEFAULT_MAXITER if maxiter is None else maxiter
    A = as_linear_operator(op, dtype)
    if X0 is None:
        X = start_block(n, m, torch.float64, torch.device("cpu"), seed).numpy()
    else:
        X = check_start(X0, n, m, "X0").cpu().numpy()
    X = X.astype(A.dtype)

    clock = Stopwatch(op.device)
    scale = float(np.linalg.norm(A.matmat(X)) / np.linalg.norm(X))
    floor = 10 * np.finfo(A.dtype).eps * scale
    abs_tol = max(tol * scale, floor)
    iterations = rounds = 0
    calls: list[int] = []  # products so far after each of LOBPCG's block products

    def recorded(V: np.ndarray) -> np.ndarray:
        out = A.matmat(V)
        calls.append(A.num_matvecs)
        return out

    # the same products through a recording front: LOBPCG's results do not change
    counted = sla.LinearOperator(A.shape, matvec=recorded, matmat=recorded, dtype=A.dtype)
    points: list[int] = []
    residuals: list[tuple[float, ...]] = []
    with warnings.catch_warnings():
        # LOBPCG warns when its absolute tolerance is missed; the relative check below
        # and the result's converged flags report that instead.
        warnings.filterwarnings("ignore", message="Exited", category=UserWarning)
        while True:
            first = len(calls)
            lam, X, lam_history, history = sla.lobpcg(
                counted, X, tol=abs_tol, maxiter=max(maxiter - iterations, 1),
                largest=which == "LA", retLambdaHistory=True, retResidualNormsHistory=True)
            iterations += max(len(calls) - first - 2, 1)
            rounds += 1
            _record(points, residuals, calls[first:], lam_history, history, k, which)
            lam = np.atleast_1d(lam)
            res = np.atleast_1d(history[-1])
            wanted = np.argsort(lam)[-k:] if which == "LA" else np.argsort(lam)[:k]
            ok = res[wanted] <= tol * np.abs(lam[wanted])
            next_tol = max(tol * float(np.abs(lam[wanted]).min()), floor)
            if ok.all() or iterations >= maxiter or rounds >= max_rounds or next_tol >= abs_tol:
                break
            abs_tol = next_tol
    wall = clock.elapsed()
    info = EigshInfo(rounds=rounds, iterations=iterations, block_size=m,
                     final_abs_tol=float(abs_tol), solver_dtype=str(A.dtype))
    vecs = X[:, wanted] if return_eigenvectors else None
    return assemble_result(op, lam[wanted], vecs, k=k, backend="lobpcg", which=which, tol=tol,
                           num_matvecs=A.num_matvecs, wall_time=wall, info=info,
                           history=ConvergenceHistory(tuple(points), tuple(residuals),
                                                      "iterates"))


def _record(points: list[int], residuals: list[tuple[float, ...]], calls: list[int],
            lam_history: list, res_history: list, k: int, which: str) -> None:
    """Append one round's history: entry ``j`` of LOBPCG's histories comes from its
    ``j``-th block product, the last (postprocessing) one from its last product."""
    for j, (lam, res) in enumerate(zip(lam_history, res_history)):
        last = j == len(res_history) - 1
        points.append(calls[-1] if last else min(calls[min(j, len(calls) - 1)], calls[-1]))
        lam, res = np.atleast_1d(lam), np.atleast_1d(res)
        order = np.argsort(lam)
        wanted = order[-k:] if which == "LA" else order[:k]
        residuals.append(relative_residuals(torch.from_numpy(lam[wanted].astype(np.float64)),
                                            torch.from_numpy(res[wanted].astype(np.float64))))
