"""Block eigensolver: thick-restart block Lanczos on ``matmat``.

Why block Lanczos and not LOBPCG: ``torch.lobpcg`` takes dense or sparse tensors only
(not operators) and solves only for the largest or smallest algebraic eigenvalues; a
LOBPCG of our own would need its own soft-locking and ill-conditioned Gram handling to be
robust, and it also finds only the ends of the spectrum. Block Lanczos with thick restart
is the same algorithm as :func:`~torchcurv.algorithms.lanczos.lanczos_eigsh` with blocks
of ``p`` vectors (one shared driver, one shared recurrence): it handles every ``which``
(LA, SA, LM, BE), keeps the full reorthogonalization, and each step is one ``matmat`` of
``p`` vectors, which for curvature operators costs far less than ``p`` ``matvec`` calls
(one forward and backward pass per batch for the whole block).

Repeated eigenvalues: a start block of ``p`` random vectors spans ``p`` directions of
every eigenspace, so an eigenvalue of multiplicity ``r <= p`` is found ``r`` times. (A
block step that finds an invariant subspace replaces the dependent directions by fresh
random ones, so the search never stalls.)

Cost: block Krylov spaces grow in steps of ``p``; convergence per matvec is usually
somewhat slower than single-vector Lanczos, but there are ``p`` times fewer operator
calls. Memory: the basis is ``ncv x n``, default ``ncv = min(n, max(2k + 1, 20, 2k + 4p))``.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from torchcurv.algorithms.arguments import Which
from torchcurv.algorithms.lanczos import thick_restart_lanczos
from torchcurv.algorithms.result import EigshResult


def default_block_size(n: int, k: int) -> int:
    """``min(k, 16)``, at least 2, shrunk so that ``k + 2 * block_size <= n``."""
    return max(1, min(max(k, 2), 16, (n - k) // 2))


def block_eigsh(
    op,
    *,
    k: int = 6,
    which: Which = "LA",
    tol: float = 1e-6,
    maxiter: int | None = None,
    seed: int | None = None,
    return_eigenvectors: bool = True,
    block_size: int | None = None,
    ncv: int | None = None,
    v0: torch.Tensor | None = None,
    basis_dtype: torch.dtype | None = None,
    basis_device: torch.device | str | None = None,
    callback: Callable[[dict], None] | None = None,
    progress: bool = False,
    checkpoint: str | os.PathLike | None = None,
) -> EigshResult:
    """``k`` eigenpairs by thick-restart block Lanczos, one ``matmat`` per block step.

    ``op``, ``k``, ``which``, ``tol``, ``maxiter``, ``seed``, ``return_eigenvectors``,
    ``basis_dtype``, ``basis_device``, ``callback``, ``progress``, ``checkpoint``: as for
    :func:`~torchcurv.algorithms.lanczos.lanczos_eigsh`.

    Args:
        block_size: vectors per ``matmat`` (``p``); default ``min(k, 16)`` (at least 2).
            Choose ``p >= r`` to find an eigenvalue of multiplicity ``r``.
        ncv: basis size, ``k + block_size <= ncv <= n``; default
            ``min(n, max(2k + 1, 20, 2k + 4 * block_size))``.
        v0: start block ``(n, block_size)`` (overrides ``seed`` for the start).

    Returns:
        :class:`~torchcurv.algorithms.result.EigshResult` with ``backend="block"``.
    """
    n = getattr(op, "n", None)
    if block_size is None:
        if not isinstance(n, int) or not isinstance(k, int):
            block_size = 1  # let the driver report the bad argument
        else:
            block_size = default_block_size(n, k)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    return thick_restart_lanczos(
        op, k=k, which=which, tol=tol, maxiter=maxiter, seed=seed,
        return_eigenvectors=return_eigenvectors, block_size=block_size, ncv=ncv, v0=v0,
        basis_dtype=basis_dtype, basis_device=basis_device, callback=callback,
        progress=progress, backend="block", checkpoint=checkpoint,
    )
