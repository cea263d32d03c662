"""Stochastic trace estimation: Hutchinson, Hutch++ and XTrace, on any torchcurv operator.

All three are unbiased. Hutch++ and XTrace first capture the dominant part of the spectrum
with a randomized sketch (computed as blocks through ``op.matmat``) and only estimate the
remainder stochastically, so on the fast-decaying spectra of curvature matrices they are
far more accurate than Hutchinson for the same number of products.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

import torch

from torchcurv.algorithms.krylov import inner_products
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
from torchcurv.distributed.reduce import common_seed, reports_failures
from torchcurv.dtypes import accumulation_dtype
from torchcurv.operators.base import LinearOperator

TraceMethod = Literal["hutchinson", "hutch++", "xtrace"]
TRACE_METHODS: tuple[TraceMethod, ...] = get_args(TraceMethod)
#: Smallest budget each method can run with.
MIN_MATVECS = {"hutchinson": 1, "hutch++": 3, "xtrace": 4}

Apply = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class TraceEstimate:
    """Result of :func:`torchcurv.trace`.

    Attributes:
        estimate: the trace estimate (float, in the operator's units).
        std_error: estimated standard error of ``estimate``; NaN where fewer than two
            samples exist to estimate it. How each method computes it is documented in
            :func:`torchcurv.trace`.
        num_matvecs: operator-vector products actually used (``<= num_matvecs`` asked).
        method: ``"hutchinson"``, ``"hutch++"`` or ``"xtrace"``.
        distribution: ``"rademacher"`` or ``"gaussian"``, the probe distribution.
    """

    estimate: float
    std_error: float
    num_matvecs: int
    method: TraceMethod
    distribution: Distribution

    def __float__(self) -> float:
        return self.estimate


@reports_failures
def trace(
    op: LinearOperator,
    *,
    num_matvecs: int,
    method: TraceMethod = "hutchinson",
    seed: int | None = None,
    generator: torch.Generator | None = None,
    distribution: Distribution = "rademacher",
    block_size: int | None = None,
    progress: bool = False,
    callback: ProgressCallback | None = None,
) -> TraceEstimate:
    """Estimate ``tr(A)`` of a symmetric operator from at most ``num_matvecs`` products.

    Methods (``m = num_matvecs``; all unbiased):

    * ``"hutchinson"``: ``mean_j w_j^T A w_j`` over ``m`` independent probes.
      ``std_error`` = sample standard deviation of the ``m`` quadratic forms / ``sqrt(m)``.
      Needs ``m >= 1``.
    * ``"hutch++"`` (Meyer, Musco, Musco & Woodruff 2021): ``s = m // 3`` probes sketch
      ``Q = orth(A S)``; ``tr(Q^T A Q)`` is exact, and the remainder
      ``tr((I-QQ^T) A (I-QQ^T))`` is estimated by Hutchinson with the other
      ``g = m - 2s`` probes (``A Q`` and the ``g`` projected probes share one block
      product). Exact when ``rank(A) <= s``. ``std_error`` = standard error of the
      Hutchinson part, i.e. the error given the sketch (the sketch part has none).
      Needs ``m >= 3`` and ``s <= n``.
    * ``"xtrace"`` (Epperly, Tropp & Webber 2024): ``s = m // 2`` probes, all used both
      for the sketch and as Hutchinson probes: estimate ``i`` uses the sketch of the other
      ``s - 1`` probes and probe ``i`` for the remainder; the result is the mean of the
      ``s`` exchangeable estimates, all computed from one QR (``2s`` products). Exact
      when ``rank(A) <= s - 1``. ``std_error`` = standard deviation of the ``s``
      estimates / ``sqrt(s)``, the authors' error estimate (the estimates are dependent,
      so it is a heuristic; they and our tests find it calibrated). An odd ``m`` leaves
      one product unused. Needs ``m >= 4`` and ``s <= n``.

    Args:
        op: a symmetric torchcurv operator (any dtype and device).
        num_matvecs: the budget of operator-vector products.
        method: ``"hutchinson"``, ``"hutch++"`` or ``"xtrace"``.
        seed: seed of a fresh CPU generator for the probes: the same seed gives the same
            probes on every device and for every ``block_size``, hence the same result on
            a device (to rounding across block sizes). On a distributed operator
            (``op.distributed``) with ``seed=None`` and no ``generator``, rank 0 draws a
            seed from its global generator and broadcasts it, so that every rank uses the
            same probes (docs/distributed.md).
        generator: a ``torch.Generator`` to draw the probes from instead, on its device
            (for very large ``n`` a CUDA generator avoids drawing on the host). Without
            ``seed`` and ``generator`` the probes come from torch's global CPU generator
            (``torch.manual_seed`` controls it).
        distribution: ``"rademacher"`` (random signs; lower variance for Hutchinson) or
            ``"gaussian"``.
        block_size: most vectors per ``op.matmat`` call (bounds memory: about ``n`` times
            ``block_size`` for Hutchinson; Hutch++/XTrace also hold their sketch,
            ``n x s``). ``None``: one call per stage.
        progress: show a tqdm progress bar over the products (``torchcurv[progress]``).
        callback: ``callback(num_matvecs_used, num_matvecs)`` after every operator call.

    Returns:
        :class:`TraceEstimate`.

    Example::

        H = torchcurv.HessianOperator(model, criterion, loader)
        est = torchcurv.trace(H, num_matvecs=100, method="xtrace", seed=0)
        print(f"tr(H) = {est.estimate:.4g} +- {est.std_error:.2g}")
    """
    op = check_operator(op, "trace")
    check_choice(method, TRACE_METHODS, "trace method")
    check_choice(distribution, DISTRIBUTIONS, "distribution")
    m = check_budget(num_matvecs, MIN_MATVECS[method], method)
    block_size = check_block_size(block_size)
    sketch = {"hutchinson": 0, "hutch++": m // 3, "xtrace": m // 2}[method]
    if sketch > op.n:
        raise ValueError(
            f"num_matvecs={m} gives {method} a sketch of {sketch} vectors, more than "
            f"n={op.n}; with this budget compute the exact trace: "
            "torchcurv.diagonal(op, method='exact').estimate.sum()"
        )
    dtype = accumulation_dtype(op.dtype)
    if generator is None:
        seed = common_seed(op, seed)
    probes = ProbeSource(op.n, distribution, dtype, op.device, seed, generator)
    with BudgetedProducts(op, m, block_size, progress, callback, f"trace ({method})") as apply:
        if method == "hutchinson":
            samples = hutchinson_samples(apply, probes, m, block_size)
            estimate, std_error = _mean_and_std_error(samples)
        elif method == "hutch++":
            S = probes.draw(sketch)
            Q = torch.linalg.qr(apply(S)).Q
            G = probes.draw(m - 2 * sketch)
            low_rank, samples = hutchpp_parts(apply, Q, G)
            remainder, std_error = _mean_and_std_error(samples)
            estimate = float(low_rank) + remainder
        else:
            samples = xtrace_samples(apply, probes.draw(sketch))
            estimate, std_error = _mean_and_std_error(samples)
        used = apply.used
    return TraceEstimate(estimate, std_error, used, method, distribution)


def hutchinson_samples(
    apply: Apply, probes: ProbeSource, m: int, block_size: int | None
) -> torch.Tensor:
    """``m`` quadratic forms ``w_j^T A w_j``, drawn and multiplied block by block.

    Returns ``(m,)`` float64.
    """
    step = m if block_size is None else block_size
    forms = []
    for start in range(0, m, step):
        W = probes.draw(min(step, m - start))
        forms.append((W * apply(W)).sum(dim=0, dtype=torch.float64))
    return torch.cat(forms)


def hutchpp_parts(apply: Apply, Q: torch.Tensor, G: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Hutch++ given the orthonormal sketch basis ``Q`` (n, s) and fresh probes ``G`` (n, g).

    Returns ``(tr(Q^T A Q), forms)``: a float64 scalar and ``(g,)`` float64 quadratic forms
    ``g_j^T (I-QQ^T) A (I-QQ^T) g_j``, whose mean is an unbiased estimate of the rest.
    """
    s = Q.shape[1]
    G = G - Q @ inner_products(Q.T, G.T)
    block = torch.cat([Q, G], dim=1)
    product = apply(block)
    forms = (block * product).sum(dim=0, dtype=torch.float64)
    return forms[:s].sum(), forms[s:]


def xtrace_samples(apply: Apply, Omega: torch.Tensor) -> torch.Tensor:
    """The ``s`` exchangeable XTrace estimates for probes ``Omega`` (n, s); ``2s`` products.

    Estimate ``i`` is ``tr(P_i A) + w_i^T (I - P_i) A (I - P_i) w_i`` with ``P_i`` the
    projector onto the sketch of all probes but ``w_i``. With ``Y = A Omega = Q R``,
    ``Z = A Q``, ``H = Q^T Z``, ``W = Q^T Omega`` and ``s_i`` from
    :func:`leave_one_out_directions`, ``P_i = Q (I - s_i s_i^T) Q^T`` and, writing
    ``(I - P_i) w_i = u_i + c_i Q s_i`` with ``u_i = (I - QQ^T) w_i``, ``c_i = s_i^T W_i``,
    every term is an ``s x s`` product (symmetry of ``A`` gives ``Z^T Omega = R``):

    ``tr(P_i A) = tr H - s_i^T H s_i``,
    ``u_i^T A u_i = W_i^T H W_i - R_i^T W_i``,
    ``u_i^T A Q s_i = R_i^T s_i - W_i^T H s_i``.

    Returns ``(s,)`` float64.
    """
    Q, R = torch.linalg.qr(apply(Omega))
    Z = apply(Q)
    H = inner_products(Q.T, Z.T)
    H = ((H + H.T) / 2).double()
    W = inner_products(Q.T, Omega.T).double()
    R = R.double()
    S = leave_one_out_directions(R)
    HS = H @ S
    sHs = (S * HS).sum(0)
    c = (S * W).sum(0)
    uAu = (W * (H @ W)).sum(0) - (R * W).sum(0)
    uAq = (R * S).sum(0) - (W * HS).sum(0)
    return (H.trace() - sHs) + uAu + 2 * c * uAq + c**2 * sHs


def _mean_and_std_error(samples: torch.Tensor) -> tuple[float, float]:
    """Mean and ``std / sqrt(len)`` (NaN for a single sample) as Python floats."""
    mean = float(samples.mean())
    if samples.numel() < 2:
        return mean, math.nan
    return mean, float(samples.std() / math.sqrt(samples.numel()))
