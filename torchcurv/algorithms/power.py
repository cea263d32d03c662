"""Power iteration with deflation: the largest-magnitude eigenpairs, one at a time.

For each pair, iterate ``x <- P A x / ||P A x||`` with ``P = I - V V^T`` the projector off
the eigenvectors ``V`` found so far. On the complement of ``V`` this is Hotelling's
deflated operator ``A - sum_i lambda_i v_i v_i^T`` (found eigenvalues moved to 0), but
projecting the iterate keeps the deflation exact even when the found vectors are only
accurate to ``tol``. Each iteration costs one ``matvec`` and yields the deflated residual
for free: with ``y = A x`` and ``lambda = x . y`` (Rayleigh quotient), stop when
``||P y - lambda x|| <= tol * |lambda|``. A final Rayleigh-Ritz over the found vectors
(with their stored products, no extra matvecs) removes the error each pair inherits from
the earlier, only ``tol``-accurate, ones; the reported residuals are the true
``||A v - lambda v||``.

Convergence is linear with rate ``|lambda_next / lambda|``: slow for clustered spectra,
and absent when ``lambda`` and ``-lambda`` are both eigenvalues of the largest magnitude
(the iterate oscillates; the pair is then reported unconverged after ``maxiter``). Prefer
``lanczos`` for anything beyond a quick top eigenvalue.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from torchcurv.algorithms.arguments import (
    Which,
    check_callback,
    check_k,
    check_maxiter,
    check_start,
    check_tol,
    check_which,
    progress_bar,
    synchronized_clock,
)
from torchcurv.algorithms.eigsh import POWER_WHICH
from torchcurv.algorithms.krylov import inner_products
from torchcurv.algorithms.probing import check_operator
from torchcurv.algorithms.result import (
    ConvergenceHistory,
    EigshInfo,
    EigshResult,
    converged_mask,
    residual_norms,
    start_block,
)
from torchcurv.dtypes import accumulation_dtype

DEFAULT_MAXITER = 1000
"""Default iterations per eigenpair."""


def power_eigsh(
    op,
    *,
    k: int = 1,
    which: Which = "LM",
    tol: float = 1e-6,
    maxiter: int | None = None,
    seed: int | None = None,
    return_eigenvectors: bool = True,
    v0: torch.Tensor | None = None,
    callback: Callable[[dict], None] | None = None,
    progress: bool = False,
) -> EigshResult:
    """``k`` largest-magnitude eigenpairs by power iteration with deflation.

    Args:
        op: a torchcurv ``LinearOperator``.
        k: number of eigenpairs, ``1 <= k < n``.
        which: only ``"LM"`` (power iteration converges to the largest magnitude).
        tol: relative residual ``||A v - lambda v|| <= tol * |lambda|``; ``0`` means
            machine precision.
        maxiter: iterations per eigenpair (default 1000).
        seed: seeds the start vectors; same seed, same result on the same device.
        return_eigenvectors: also return the ``(n, k)`` eigenvectors.
        v0: start vector ``(n,)`` for the first pair (later pairs start from seeded
            random vectors).
        callback: called after every iteration with a dict (``pair``, ``iteration``,
            ``eigenvalue``, ``residual``).
        progress: tqdm bar over pairs (needs ``tqdm``).

    Returns:
        :class:`~torchcurv.algorithms.result.EigshResult` with ``backend="power"``,
        ascending eigenvalues; ``info.iterations_per_pair`` (in the order found);
        ``info.history`` (``source="checks"``): after every iteration, the relative
        deflated residuals of the pairs found so far (their last), of the pair being
        iterated, and ``inf`` for the pairs not started, in the order found.
    """
    check_operator(op, "power_eigsh")
    n = op.n
    k = check_k(k, n)
    if check_which(which) not in POWER_WHICH:
        raise ValueError(
            f"power iteration finds largest-magnitude eigenvalues only (which='LM'), got "
            f"which={which!r}; use the 'lanczos' or 'block' backend for LA/SA/BE"
        )
    maxiter = check_maxiter(maxiter, DEFAULT_MAXITER)
    check_callback(callback)
    dtype = accumulation_dtype(op.dtype)
    tol = check_tol(tol, op.dtype)
    generator = torch.Generator().manual_seed(0 if seed is None else int(seed))
    first = None if v0 is None else check_start(v0, n, 1)[:, 0]

    begin = synchronized_clock(op.device)
    matvecs_before = op.num_matvecs
    found = torch.zeros(n, 0, dtype=dtype, device=op.device)
    products = torch.zeros(n, 0, dtype=dtype, device=op.device)  # A @ found
    iterations: list[int] = []
    done: list[float] = []  # last relative residual of each pair found
    points: list[int] = []
    history: list[tuple[float, ...]] = []
    with progress_bar(progress, k, "torchcurv power") as bar:
        for pair in range(k):
            if pair == 0 and first is not None:
                x = first.to(op.device, dtype)
            else:
                x = start_block(n, 1, dtype, op.device, generator=generator)[:, 0]
            x = _unit(_deflate(x, found))
            for iteration in range(1, maxiter + 1):
                y = op.matvec(x.to(op.dtype)).to(dtype)
                value = float(x @ y)
                z = _deflate(y, found)
                residual = float((z - value * x).norm())
                relative = residual / max(abs(value), torch.finfo(torch.float64).tiny)
                points.append(op.num_matvecs - matvecs_before)
                history.append((*done, relative, *[math.inf] * (k - pair - 1)))
                if callback is not None:
                    callback({"pair": pair, "iteration": iteration, "eigenvalue": value,
                              "residual": residual})
                if residual <= tol * abs(value) or iteration == maxiter:
                    break
                x = _unit(z)
            iterations.append(iteration)
            done.append(relative)
            found = torch.cat([found, x[:, None]], dim=1)
            products = torch.cat([products, y[:, None]], dim=1)
            if bar is not None:
                bar.update(1)

    values, vectors = _rayleigh_ritz(found, products)
    vectors = vectors.to(op.dtype)
    residuals = residual_norms(op, values, vectors)
    num_matvecs = op.num_matvecs - matvecs_before
    wall_time = synchronized_clock(op.device) - begin
    return EigshResult(
        eigenvalues=values,
        eigenvectors=vectors if return_eigenvectors else None,
        residuals=residuals if return_eigenvectors else torch.full((k,), float("nan"),
                                                                   dtype=torch.float64),
        converged=converged_mask(values, residuals, tol),
        num_matvecs=num_matvecs,
        wall_time=wall_time,
        backend="power",
        which=which,
        tol=tol,
        info=EigshInfo(iterations_per_pair=tuple(iterations), check_matvecs=k,
                       history=ConvergenceHistory(tuple(points), tuple(history), "checks")),
    )


def _rayleigh_ritz(V: torch.Tensor, AV: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Best pairs in ``span(V)`` from the stored products (no extra matvecs).

    Each pair was converged against the previous, only ``tol``-accurate, vectors; a
    Rayleigh-Ritz over all of them removes that error (it is a rotation inside the
    nearly invariant subspace ``span(V)``). Returns ascending float64 CPU values and
    ``(n, k)`` vectors.
    """
    H = inner_products(V.T, AV.T).double()
    values, S = torch.linalg.eigh((H + H.T) / 2)
    return values.cpu(), V @ S.to(V.dtype)


def _deflate(x: torch.Tensor, found: torch.Tensor) -> torch.Tensor:
    """``x`` minus its components along the found eigenvectors (twice, for orthogonality)."""
    for _ in range(2):
        x = x - found @ inner_products(x[None], found.T)[0]
    return x


def _unit(x: torch.Tensor) -> torch.Tensor:
    norm = x.norm()
    if not bool(norm > 0):
        raise ValueError(
            "power iteration needs a start vector with a component off the eigenvectors "
            "found so far; got the zero vector"
        )
    return x / norm
