"""The "arpack" backend: scipy's ``eigsh`` (ARPACK, implicitly restarted Lanczos) on the host.

ARPACK multiplies one vector at a time through :func:`torchcurv.as_linear_operator`
and keeps its ``(ncv + 3) * n`` workspace in host memory; every product crosses to the
operator's device and back. Its stopping rule is ARPACK's own ``||r_i|| <= tol*|lambda_i|``
(Ritz estimates), the same relative criterion the result's ``converged`` flags check
after the fact.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse.linalg as sla
import torch

from torchcurv.algorithms.arguments import check_start, check_tol
from torchcurv.algorithms.assemble import Stopwatch, assemble_result
from torchcurv.algorithms.eigsh import check_backend_serves
from torchcurv.algorithms.result import EigshInfo, EigshResult, start_block
from torchcurv.interop.scipy import as_linear_operator
from torchcurv.operators.base import LinearOperator


def arpack_eigsh(
    op: LinearOperator,
    *,
    k: int,
    which: str,
    tol: float,
    maxiter: int | None,
    seed: int | None,
    return_eigenvectors: bool,
    ncv: int | None = None,
    v0=None,
    dtype=np.float64,
) -> EigshResult:
    """``k`` eigenpairs of ``op`` by ``scipy.sparse.linalg.eigsh``.

    ``op``, ``k``, ``which``, ``tol``, ``maxiter``, ``seed``, ``return_eigenvectors``: as
    for :func:`torchcurv.eigsh`; ``which`` in LA, SA, LM, SM, BE; ``maxiter`` is ARPACK's
    restart limit (default ``10 n``).

    Args:
        ncv: Lanczos basis size (scipy's default ``min(n, max(2k + 1, 20))``).
        v0: ``(n,)`` start vector (NumPy or torch); default a standard-normal vector
            drawn from ``seed`` (:func:`~torchcurv.algorithms.result.start_block`), so
            runs are reproducible.
        dtype: precision ARPACK works in (float64 default; see ``as_linear_operator``).

    Non-convergence within ``maxiter`` is not an error: the result holds the pairs
    ARPACK did converge, the rest NaN with ``converged=False``, and a
    ``RuntimeWarning`` says how many.
    """
    which = check_backend_serves("arpack", which)
    tol = check_tol(tol, op.dtype)
    A = as_linear_operator(op, dtype)
    if v0 is None:
        v0 = start_block(op.n, 1, torch.float64, torch.device("cpu"), seed)[:, 0]
    v0 = check_start(v0, op.n, 1)[:, 0].cpu().numpy().astype(A.dtype)
    clock = Stopwatch(op.device)
    no_convergence = None
    try:
        out = sla.eigsh(A, k=k, which=which, v0=v0, ncv=ncv, maxiter=maxiter, tol=tol,
                        return_eigenvectors=return_eigenvectors)
        vals, vecs = out if return_eigenvectors else (out, None)
    except sla.ArpackNoConvergence as e:
        vals = e.eigenvalues
        vecs = e.eigenvectors if return_eigenvectors else None
        no_convergence = str(e)
        warnings.warn(
            f"ARPACK converged {len(vals)} of {k} eigenpairs within maxiter={maxiter}; the "
            "result marks the rest as NaN / not converged",
            RuntimeWarning,
            stacklevel=3,
        )
    wall = clock.elapsed()
    info = EigshInfo(ncv=ncv, solver_dtype=str(A.dtype), arpack_no_convergence=no_convergence)
    return assemble_result(op, vals, vecs, k=k, backend="arpack", which=which, tol=tol,
                           num_matvecs=A.num_matvecs, wall_time=wall, info=info)
