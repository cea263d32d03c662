"""Diagonal of a symmetric operator: Hutchinson and XDiag estimates, or exact for small n.

For a model's curvature the diagonal is indexed like the flattened parameters; turn it
back into parameter shapes with ``op.unflatten(result.estimate.to(op.dtype))``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch

from torchcurv.algorithms.probing import (
    DISTRIBUTIONS,
    BudgetedProducts,
    Distribution,
    ProbeSource,
    ProgressCallback,
    check_block_size,
    check_budget,
    check_choice,
    check_operator,
    leave_one_out_directions,
)
from torchcurv.algorithms.trace import Apply
from torchcurv.distributed.reduce import common_seed, reports_failures
from torchcurv.dtypes import accumulation_dtype
from torchcurv.operators.base import LinearOperator

DiagonalMethod = Literal["hutchinson", "xdiag", "exact"]
DIAGONAL_METHODS: tuple[DiagonalMethod, ...] = get_args(DiagonalMethod)
#: Smallest budget each stochastic method can run with.
MIN_MATVECS = {"hutchinson": 1, "xdiag": 4}
#: Identity columns per product for method="exact" when block_size is None.
EXACT_BLOCK_SIZE = 256


@dataclass(frozen=True)
class DiagonalEstimate:
    """Result of :func:`torchcurv.diagonal`.

    Attributes:
        estimate: ``(n,)`` diagonal estimate on the operator's device, in the operator's
            dtype promoted to at least float32.
        std_error: ``(n,)`` estimated standard error of each entry (see
            :func:`torchcurv.diagonal`); zeros for ``"exact"``; NaN where fewer than two
            samples exist.
        num_matvecs: operator-vector products actually used.
        method: ``"hutchinson"``, ``"xdiag"`` or ``"exact"``.
        distribution: the probe distribution (``None`` for ``"exact"``).
    """

    estimate: torch.Tensor
    std_error: torch.Tensor
    num_matvecs: int
    method: DiagonalMethod
    distribution: Distribution | None


@reports_failures
def diagonal(
    op: LinearOperator,
    *,
    num_matvecs: int | None = None,
    method: DiagonalMethod = "hutchinson",
    seed: int | None = None,
    generator: torch.Generator | None = None,
    distribution: Distribution = "rademacher",
    block_size: int | None = None,
    progress: bool = False,
    callback: ProgressCallback | None = None,
    max_exact_n: int = 50_000,
) -> DiagonalEstimate:
    """Estimate (or compute) ``diag(A)`` of a symmetric operator.

    Methods (``m = num_matvecs``):

    * ``"hutchinson"`` (Bekas, Kokiopoulou & Saad 2007): ``mean_j w_j * (A w_j)`` over
      ``m`` probes, unbiased; with Rademacher probes the error of entry ``k`` comes only
      from the off-diagonal entries of row ``k``. ``std_error`` = per-entry sample
      standard deviation / ``sqrt(m)``. Needs ``m >= 1``.
    * ``"xdiag"`` (Epperly, Tropp & Webber 2024): the exchangeable estimator behind XTrace
      applied to the diagonal; ``s = m // 2`` probes, ``2s`` products. Estimate ``i`` is
      ``diag(P_i A) + w_i * ((I - P_i) A w_i)`` with ``P_i`` the projector onto the sketch
      of the other probes; the result is their mean. Unbiased, and exact when
      ``rank(A) <= s - 1``. ``std_error`` = per-entry standard deviation of the ``s``
      estimates / ``sqrt(s)`` (the estimates are dependent: a heuristic, like XTrace's).
      Needs ``m >= 4`` and ``s <= n``.
    * ``"exact"``: ``A`` times blocks of identity columns, ``n`` products; ``num_matvecs``
      may be left out (if given it must be at least ``n``). Refused for
      ``n > max_exact_n``.

    Args:
        op: a symmetric torchcurv operator (any dtype and device).
        num_matvecs: the budget of operator-vector products (required unless exact).
        method: ``"hutchinson"``, ``"xdiag"`` or ``"exact"``.
        seed: seed of a fresh CPU generator for the probes: the same seed gives the same
            probes on every device and for every ``block_size``, hence the same result on
            a device (to rounding across block sizes). On a distributed operator
            (``op.distributed``) with ``seed=None`` and no ``generator``, rank 0 draws a
            seed from its global generator and broadcasts it, so that every rank uses the
            same probes (docs/distributed.md).
        generator: a ``torch.Generator`` to draw the probes from instead, on its device.
            Without either, torch's global CPU generator is used.
        distribution: ``"rademacher"`` (recommended) or ``"gaussian"``.
        block_size: most vectors per ``op.matmat`` call (``None``: one call per stage for
            the estimators, 256 identity columns for ``"exact"``).
        progress: show a tqdm progress bar over the products (``torchcurv[progress]``).
        callback: ``callback(num_matvecs_used, num_matvecs)`` after every operator call.
        max_exact_n: largest ``n`` for which ``"exact"`` runs.

    Returns:
        :class:`DiagonalEstimate`.
    """
    op = check_operator(op, "diagonal")
    check_choice(method, DIAGONAL_METHODS, "diagonal method")
    check_choice(distribution, DISTRIBUTIONS, "distribution")
    block_size = check_block_size(block_size)
    if method == "exact":
        return _exact(op, num_matvecs, block_size, progress, callback, max_exact_n)
    if num_matvecs is None:
        raise TypeError(f"diagonal(method={method!r}) needs num_matvecs")
    m = check_budget(num_matvecs, MIN_MATVECS[method], method)
    if method == "xdiag" and m // 2 > op.n:
        raise ValueError(
            f"num_matvecs={m} gives xdiag a sketch of {m // 2} vectors, more than n={op.n}; "
            "with this budget use method='exact'"
        )
    if generator is None:
        seed = common_seed(op, seed)
    probes = ProbeSource(op.n, distribution, accumulation_dtype(op.dtype), op.device, seed,
                         generator)
    with BudgetedProducts(op, m, block_size, progress, callback, f"diagonal ({method})") as apply:
        if method == "hutchinson":
            estimate, std_error = _hutchinson(apply, probes, m, block_size)
        else:
            base, terms = xdiag_terms(apply, probes.draw(m // 2))
            estimate = base + terms.mean(dim=1)
            std_error = terms.std(dim=1) / math.sqrt(terms.shape[1])
        used = apply.used
    return DiagonalEstimate(estimate, std_error, used, method, distribution)


def xdiag_terms(apply: Apply, Omega: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """XDiag for probes ``Omega`` (n, s), ``2s`` products: estimate ``i`` is ``base + terms[:, i]``.

    With ``Y = A Omega = Q R``, ``Z = A Q``, ``s_i`` from :func:`leave_one_out_directions`
    and ``P_i = Q (I - s_i s_i^T) Q^T``:
    ``diag(P_i A) = rowsum(Q * Z) - (Q s_i) * (Z s_i)`` and, because ``A w_i = Q R_i``
    lies in ``range(Q)``, ``(I - P_i) A w_i = (Q s_i) (s_i^T R_i)``.

    Returns ``base`` ``(n,)`` and ``terms`` ``(n, s)``, in Omega's dtype.
    """
    Q, R = torch.linalg.qr(apply(Omega))
    Z = apply(Q)
    S64 = leave_one_out_directions(R)
    weights = (S64 * R.double()).sum(dim=0).to(Q.dtype)  # s_i^T R_i
    S = S64.to(Q.dtype)
    QS = Q @ S
    terms = QS * (Omega * weights - Z @ S)
    return (Q * Z).sum(dim=1), terms


def _hutchinson(
    apply: Apply, probes: ProbeSource, m: int, block_size: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-entry mean and standard error of ``w * (A w)`` over ``m`` probes, block by block.

    Blocks are merged with Chan et al.'s pairwise update of mean and sum of squared
    deviations, so memory stays ``O(n * block)`` and no variance is formed by cancellation.
    """
    step = m if block_size is None else block_size
    mean: torch.Tensor | None = None
    M2: torch.Tensor | None = None
    count = 0
    for start in range(0, m, step):
        W = probes.draw(min(step, m - start))
        samples = W * apply(W)
        b = samples.shape[1]
        block_mean = samples.mean(dim=1)
        block_M2 = ((samples - block_mean[:, None]) ** 2).sum(dim=1)
        if mean is None or M2 is None:
            mean, M2 = block_mean, block_M2
        else:
            delta = block_mean - mean
            total = count + b
            mean = mean + delta * (b / total)
            M2 = M2 + block_M2 + delta**2 * (count * b / total)
        count += b
    assert mean is not None and M2 is not None  # m >= 1 probes, so one block at least
    if count < 2:
        return mean, torch.full_like(mean, math.nan)
    return mean, (M2 / (count - 1)).sqrt() / math.sqrt(count)


def _exact(
    op: LinearOperator,
    num_matvecs: int | None,
    block_size: int | None,
    progress: bool,
    callback: ProgressCallback | None,
    max_exact_n: int,
) -> DiagonalEstimate:
    n = op.n
    if n > max_exact_n:
        raise ValueError(
            f"the exact diagonal of an operator with n={n} needs {n} products; that is more "
            f"than max_exact_n={max_exact_n}. Estimate it with method='xdiag' or "
            "'hutchinson', or raise max_exact_n"
        )
    if num_matvecs is not None:
        check_budget(num_matvecs, n, "exact")
    step = EXACT_BLOCK_SIZE if block_size is None else block_size
    dtype = accumulation_dtype(op.dtype)
    out = torch.empty(n, dtype=dtype, device=op.device)
    with BudgetedProducts(op, n, None, progress, callback, "diagonal (exact)") as apply:
        for start in range(0, n, step):
            stop = min(start + step, n)
            cols = torch.arange(stop - start, device=op.device)
            E = torch.zeros(n, stop - start, dtype=op.dtype, device=op.device)
            E[start + cols, cols] = 1
            out[start:stop] = apply(E)[start + cols, cols].to(dtype)
        used = apply.used
    return DiagonalEstimate(out, torch.zeros_like(out), used, "exact", None)
