"""The "cupy" backend: CuPy's thick-restart Lanczos, entirely on the operator's GPU.

``cupyx.scipy.sparse.linalg.eigsh`` keeps its ``(ncv, n)`` basis on the device and
multiplies through :func:`torchcurv.as_cupy_linear_operator` (DLPack, zero-copy), so
no vector visits the host. It finds 'LA', 'SA' or 'LM' only.

CuPy stops when the 2-norm of the k Ritz residual estimates falls below an *absolute*
``tol``; torchcurv's contract is relative (``||r_i|| <= tol * |lambda_i|``). The first
run uses ``tol * ||A v0||`` (``v0`` a unit random vector, so ``||A v0||`` estimates the
RMS eigenvalue); if some wanted pair then misses the relative test, a new run starts
from the sum of the Ritz vectors (plus a little of ``v0``, so the start is not
confined to them) with ``tol * min_i |lambda_i|``, up to ``max_rounds`` runs. The
residual checks between runs cost ``k`` uncounted products each; ``wall_time``
excludes them.
"""

from __future__ import annotations

import inspect

import numpy as np
import torch

from torchcurv.algorithms.arguments import check_start, check_tol
from torchcurv.algorithms.assemble import Stopwatch, assemble_result
from torchcurv.algorithms.eigsh import check_backend_serves
from torchcurv.algorithms.result import (
    ConvergenceHistory,
    EigshInfo,
    EigshResult,
    converged_mask,
    relative_residuals,
    residual_norms,
    start_block,
)
from torchcurv.interop.cupy import as_cupy_linear_operator, import_cupy
from torchcurv.operators.base import LinearOperator


def cupy_eigsh(
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
    dtype=None,
    max_rounds: int = 3,
) -> EigshResult:
    """``k`` eigenpairs of a CUDA operator by ``cupyx.scipy.sparse.linalg.eigsh``.

    ``op``, ``k``, ``tol``, ``seed``, ``return_eigenvectors``: as for
    :func:`torchcurv.eigsh`.

    Args:
        which: 'LA', 'SA' or 'LM'.
        maxiter: Lanczos steps over all runs (CuPy's default ``10 n``).
        ncv: basis size (CuPy's default ``min(max(2k, k + 32), n - 1)``).
        v0: ``(n,)`` start vector (torch, CuPy or NumPy); default standard normal from
            ``seed``. CuPy versions whose ``eigsh`` takes no ``v0`` draw their own
            (from CuPy's global generator) and run once.
        dtype: precision of the Lanczos basis (default the operator's, see
            :func:`torchcurv.as_cupy_linear_operator`).
        max_rounds: runs at most (see the module notes).

    ``info.history`` (``source="checks"``): one point per run, the true residuals
    checked after it (CuPy shows nothing inside a run).
    """
    which = check_backend_serves("cupy", which)
    tol = check_tol(tol, op.dtype)
    cupy, csla = import_cupy("the 'cupy' eigsh backend")
    A = as_cupy_linear_operator(op, dtype)
    takes_v0 = "v0" in inspect.signature(csla.eigsh).parameters
    if v0 is None:
        v0 = start_block(op.n, 1, torch.float64, op.device, seed)[:, 0]
    elif not takes_v0:
        raise ValueError("this CuPy version's eigsh takes no start vector v0")
    v0 = check_start(v0, op.n, 1)[:, 0].to(op.device)
    v0 = cupy.from_dlpack((v0 / v0.norm()).to(_torch_dtype(A.dtype)).contiguous())
    budget = 10 * op.n if maxiter is None else maxiter

    clock = Stopwatch(op.device)
    scale = float(cupy.linalg.norm(A.matvec(v0)))
    floor = 10 * float(np.finfo(A.dtype).eps) * scale
    abs_tol = max(tol * scale, floor)
    start, rounds, check_time, check_matvecs = v0, 0, 0.0, 0
    points: list[int] = []
    history: list[tuple[float, ...]] = []
    while True:
        kwargs = {"k": k, "which": which, "ncv": ncv, "tol": abs_tol,
                  "maxiter": max(budget - A.num_matvecs, 1)}
        if takes_v0:
            kwargs["v0"] = start
        w, x = csla.eigsh(A, **kwargs)
        rounds += 1
        check = Stopwatch(op.device)
        vals = torch.from_dlpack(w).to("cpu", torch.float64)
        vecs = torch.from_dlpack(x)
        res = residual_norms(op, vals, vecs)
        check_matvecs += vals.numel()
        ok = converged_mask(vals, res, tol)
        order = torch.argsort(vals)
        points.append(A.num_matvecs)
        history.append(relative_residuals(vals[order], res[order]))
        check_time += check.elapsed()
        next_tol = max(tol * float(vals.abs().min()), floor)
        if (ok.all() or not takes_v0 or rounds >= max_rounds or A.num_matvecs >= budget
                or next_tol >= abs_tol):
            break
        abs_tol = next_tol
        start = x.sum(axis=1) + 1e-3 * v0
        start /= cupy.linalg.norm(start)
    wall = clock.elapsed() - check_time
    info = EigshInfo(rounds=rounds, final_abs_tol=abs_tol, solver_dtype=str(A.dtype), ncv=ncv,
                     check_matvecs=check_matvecs)
    return assemble_result(op, vals, vecs if return_eigenvectors else None, k=k,
                           backend="cupy", which=which, tol=tol, num_matvecs=A.num_matvecs,
                           wall_time=wall, info=info, residuals=res,
                           history=ConvergenceHistory(tuple(points), tuple(history), "checks"))


def _torch_dtype(dtype) -> torch.dtype:
    return {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}[
        np.dtype(dtype)]
