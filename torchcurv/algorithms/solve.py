"""``torchcurv.solve``: damped linear solves ``(A + damping I) x = b`` in torch.

Newton-CG and natural-gradient steps, influence functions (inverse-HVPs of gradients),
Laplace approximations and shift-invert all need solves with a curvature matrix known
only through its products. The iterations run on the operator's device in torch, so on a
GPU no vector ever crosses to the host.

A block right-hand side ``(n, m)`` runs ``m`` independent recurrences (conjugate
gradients, or MINRES) that share one ``matmat`` per iteration: a curvature product of a
block costs far less than ``m`` single products (one data pass, batched kernels). Each
column stops on its own relative residual and then leaves the block, so later products
carry only the columns still running.

Every answer is checked: after the recurrences stop, the true residual
``b - (A + damping I) x`` is computed with one product (counted: it is part of the
solve). A column whose recurrence claimed convergence but whose true residual misses the
tolerance (rounding drift, or a preconditioner whose norm differs from the 2-norm)
restarts from its true residual while that still at least halves the residual each
round; ``converged`` reports the true residual against ``tol``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from torchcurv.algorithms.arguments import (
    check_maxiter,
    check_tol,
    progress_bar,
    synchronized_clock,
)
from torchcurv.algorithms.probing import check_choice, check_operator
from torchcurv.distributed.reduce import reports_failures
from torchcurv.dtypes import accumulation_dtype
from torchcurv.errors import NotConvergedError, OperatorInputError
from torchcurv.interop.reverse import from_linear_operator
from torchcurv.operators.base import LinearOperator, _check_finite, check_vector

SolveMethod = Literal["cg", "minres"]
SOLVE_METHODS: tuple[SolveMethod, ...] = ("cg", "minres")

Apply = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class SolveResult:
    """Result of :func:`torchcurv.solve`; per-column fields have one entry per column of
    ``b`` (one entry for a vector ``b``).

    Attributes:
        x: the solution, shaped like ``b``, on the operator's device in its dtype.
        residual_norms: ``(m,)`` float64 on the CPU, ``||b - (A + damping I) x||_2``,
            computed from ``x`` after the solve (not the recurrence's estimate).
        rhs_norms: ``(m,)`` float64 on the CPU, ``||b||_2``.
        converged: ``(m,)`` bool, ``residual_norms <= tol * rhs_norms``.
        indefinite: ``(m,)`` bool, CG met a direction ``p`` with
            ``p^T (A + damping I) p <= 0`` in that column: the damped matrix is not
            positive definite, so CG stopped the column there (its ``x`` is the last
            iterate before that direction); always ``False`` for MINRES.
        iterations: ``(m,)`` int64, recurrence steps of each column.
        num_matvecs: products with ``A`` the solve used (a block of ``m`` counts ``m``),
            the true-residual checks included; preconditioner products are not counted.
        wall_time: seconds, synchronised with the device.
        method: ``"cg"`` or ``"minres"``.
        tol: the relative tolerance used.
        damping: the damping used.
    """

    x: torch.Tensor
    residual_norms: torch.Tensor
    rhs_norms: torch.Tensor
    converged: torch.Tensor
    indefinite: torch.Tensor
    iterations: torch.Tensor
    num_matvecs: int
    wall_time: float
    method: str
    tol: float
    damping: float

    @property
    def all_converged(self) -> bool:
        return bool(self.converged.all())

    @property
    def relative_residuals(self) -> torch.Tensor:
        """``residual_norms / rhs_norms`` (0 for a zero right-hand side)."""
        return self.residual_norms / self.rhs_norms.clamp_min(torch.finfo(torch.float64).tiny)

    def raise_if_not_converged(self, what: str = "torchcurv.solve") -> None:
        """Raise :class:`~torchcurv.NotConvergedError` naming the columns that missed
        ``tol``, by how much, and what to change."""
        if self.all_converged:
            return
        bad = (~self.converged).nonzero().flatten().tolist()
        worst = float(self.relative_residuals[bad].max())
        shown = ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else "")
        message = (
            f"{what}: the {self.method} solve of ({_damped(self.damping)}) x = b did not "
            f"converge in column(s) [{shown}] of {len(self.converged)}: relative residual "
            f"up to {worst:.2e} > tol {self.tol:.2e} after up to "
            f"{int(self.iterations[bad].max())} iterations"
        )
        if bool(self.indefinite.any()):
            message += (
                "; CG met a direction of non-positive curvature, so A + damping I is not "
                "positive definite: use method='minres' (symmetric indefinite), or more "
                "damping"
            )
        else:
            message += ("; raise maxiter, loosen tol, add damping or a preconditioner (a "
                        "singular matrix, e.g. a shift on an eigenvalue, has no solution)")
        raise NotConvergedError(message, self)

    def __repr__(self) -> str:
        return (
            f"SolveResult(method={self.method!r}, system={_damped(self.damping)!r}, converged="
            f"{int(self.converged.sum())}/{len(self.converged)}, max relative residual="
            f"{float(self.relative_residuals.max()):.2e}, iterations="
            f"{int(self.iterations.max())}, num_matvecs={self.num_matvecs}, "
            f"wall_time={self.wall_time:.3g}s)"
        )


def _damped(damping: float) -> str:
    if damping == 0:
        return "A"
    return f"A {'+' if damping > 0 else '-'} {abs(damping):g} I"


@reports_failures
def solve(
    op: Any,
    b: torch.Tensor,
    *,
    damping: float = 0.0,
    method: SolveMethod = "cg",
    tol: float = 1e-6,
    maxiter: int | None = None,
    preconditioner: Any = None,
    x0: torch.Tensor | None = None,
    progress: bool = False,
) -> SolveResult:
    """Solve ``(A + damping I) x = b`` on the operator's device.

    Methods:

    * ``"cg"`` (default): conjugate gradients (Hestenes & Stiefel 1952), for a positive
      definite ``A + damping I`` (a GGN or Fisher with ``damping > 0``; a Hessian near a
      minimum). One product per iteration. A direction of non-positive curvature stops
      its column and is reported (``result.indefinite``) instead of stepping into it.
    * ``"minres"``: MINRES (Paige & Saunders 1975), for any symmetric system, indefinite
      ones included (Hessians away from a minimum, shift-invert's ``A - sigma I``). One
      product per iteration; it minimises the residual, so a singular, inconsistent
      system ends with the least-squares residual and ``converged=False``.

    Cost: one ``(n, m_active)`` product per iteration, plus one product per checking
    round; memory about six ``(n, m)`` blocks in the working dtype (the operator's,
    at least float32).

    Args:
        op: a torchcurv operator, or anything :func:`torchcurv.from_linear_operator`
            accepts (a matrix, a scipy or curvlinops operator).
        b: ``(n,)`` or ``(n, m)`` torch tensor in the operator's dtype on its device.
        damping: ``lambda`` in ``A + lambda I``; any finite real (negative shifts too).
        method: ``"cg"`` or ``"minres"``.
        tol: relative residual asked for, ``||b - (A + damping I) x|| <= tol * ||b||``
            per column; ``0`` means machine precision of the operator's dtype.
        maxiter: most iterations per column (default ``10 n``, scipy's).
        preconditioner: ``M``, an approximation of ``(A + damping I)^{-1}``, symmetric
            positive definite, applied as ``z = M r``: a torchcurv operator or anything
            :func:`torchcurv.from_linear_operator` accepts (a KFAC inverse from
            curvlinops, a user matrix), or a :class:`~torchcurv.DiagonalEstimate` of
            ``A`` (from :func:`torchcurv.diagonal`), used as the Jacobi preconditioner
            ``1 / |diag(A) + damping|``.
        x0: start ``(n,)`` / ``(n, m)`` like ``b`` (default zero).
        progress: show a tqdm bar over iterations (``torchcurv[progress]``).

    Returns:
        :class:`SolveResult`; a column that missed ``tol`` is flagged, not raised (see
        :meth:`SolveResult.raise_if_not_converged` and :class:`~torchcurv.InverseOperator`,
        which raises).

    Raises:
        OperatorInputError: ``b`` or ``x0`` of the wrong shape, dtype or device, or with
            NaN/inf entries.
        ValueError: bad ``method``, ``damping``, ``tol``, ``maxiter``; a preconditioner
            of another size, or one found not positive definite.

    Example::

        G = torchcurv.GGNOperator(model, criterion, loader)
        step = torchcurv.solve(G, -gradient, damping=1e-3, tol=1e-4).x
    """
    if not isinstance(op, LinearOperator):
        op = from_linear_operator(op)
    op = check_operator(op, "solve")
    check_choice(method, SOLVE_METHODS, "solve method")
    damping = check_damping(damping)
    tol = check_tol(tol, op.dtype)
    maxiter = check_maxiter(maxiter, 10 * op.n)
    B, one = _block(op, b, "b")
    X0 = None if x0 is None else _block(op, x0, "x0")[0]
    if X0 is not None and X0.shape != B.shape:
        raise OperatorInputError(
            f"x0 has shape {tuple(X0.shape)} as a block, b has {tuple(B.shape)}")
    precondition = as_preconditioner(preconditioner, op, damping)
    clock_start = synchronized_clock(op.device)
    system = DampedSystem(op, damping)
    with progress_bar(progress, maxiter, f"solve ({method})") as bar:
        X, iterations, indefinite, R = refine(system, B, X0, method, tol, maxiter,
                                              precondition, bar)
    residuals = R.norm(dim=0).double().cpu()
    rhs = B.norm(dim=0).double().cpu()
    x = X.to(op.dtype)
    return SolveResult(
        x=x.squeeze(1) if one else x,
        residual_norms=residuals,
        rhs_norms=rhs,
        converged=residuals <= tol * rhs,
        indefinite=indefinite.cpu(),
        iterations=iterations.cpu(),
        num_matvecs=system.num_matvecs,
        wall_time=synchronized_clock(op.device) - clock_start,
        method=method,
        tol=tol,
        damping=damping,
    )


def check_damping(damping: float) -> float:
    if (isinstance(damping, bool) or not isinstance(damping, numbers.Real)
            or not math.isfinite(damping)):
        raise ValueError(f"damping must be a finite real number, got {damping!r}")
    return float(damping)


def _block(op: LinearOperator, v: torch.Tensor, name: str) -> tuple[torch.Tensor, bool]:
    """``v`` as an ``(n, m)`` block in the working dtype, and whether it was one vector."""
    v = check_vector(v, op.n, op.dtype, op.device, f"solve's {name}")
    one = v.ndim == 1
    block = v.unsqueeze(1) if one else v
    _check_finite(block, one)
    return block.to(accumulation_dtype(op.dtype)), one


class DampedSystem:
    """``V -> (A + damping I) V`` in the working dtype, counting the columns multiplied."""

    def __init__(self, op: LinearOperator, damping: float) -> None:
        self.op = op
        self.damping = damping
        self.num_matvecs = 0

    def __call__(self, V: torch.Tensor) -> torch.Tensor:
        self.num_matvecs += V.shape[1]
        AV = self.op.matmat(V.to(self.op.dtype)).to(V.dtype)
        return AV + self.damping * V if self.damping else AV


def as_preconditioner(preconditioner: Any, op: LinearOperator, damping: float) -> Apply | None:
    """``r -> M r`` for the accepted kinds of ``preconditioner`` (see :func:`solve`)."""
    from torchcurv.algorithms.diagonal import DiagonalEstimate

    if preconditioner is None:
        return None
    if isinstance(preconditioner, DiagonalEstimate):
        d = (preconditioner.estimate.to(op.device, torch.float64) + damping).abs()
        if d.shape != (op.n,):
            raise ValueError(f"the diagonal estimate has shape {tuple(d.shape)}, not ({op.n},)")
        # a zero entry would divide by zero: floor it relative to the largest entry
        floor = torch.finfo(torch.float64).eps * float(d.max().clamp_min(1e-300))
        weights = 1.0 / d.clamp_min(floor)
        return lambda R: R * weights.to(R.dtype).unsqueeze(1)
    if isinstance(preconditioner, torch.Tensor) and preconditioner.ndim == 1:
        raise ValueError(
            "a 1-D tensor preconditioner is ambiguous (the diagonal of A, or of its "
            "inverse?); pass torchcurv.diagonal(...)'s DiagonalEstimate for Jacobi, or "
            "torchcurv.MatrixOperator(torch.diag(weights)) for M = diag(weights)"
        )
    M = preconditioner if isinstance(preconditioner, LinearOperator) else (
        from_linear_operator(preconditioner))
    if M.n != op.n:
        raise ValueError(f"the preconditioner is {M.n} x {M.n}, the operator {op.n} x {op.n}")
    return lambda R: M.matmat(R.to(M.device, M.dtype)).to(R.device, R.dtype)


def refine(
    system: DampedSystem,
    B: torch.Tensor,
    X0: torch.Tensor | None,
    method: str,
    tol: float,
    maxiter: int,
    precondition: Apply | None,
    bar: Any,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the recurrences from the true residual until each column's true residual
    meets ``tol``, its iterations run out, CG finds it indefinite, or a round fails to
    halve its residual (rounding then bounds the attainable accuracy).

    Returns ``(X, iterations, indefinite, R)`` with ``R`` the true residual of ``X``.
    """
    m = B.shape[1]
    device = B.device
    goal = tol * B.norm(dim=0)
    # a zero right-hand side has the exact answer 0, whatever x0
    zero = B.norm(dim=0) == 0
    if X0 is None:
        X, R = torch.zeros_like(B), B.clone()
    else:
        X = torch.where(zero, 0.0, X0)
        R = B - system(X) if bool((~zero).any()) else B.clone()
    iterations = torch.zeros(m, dtype=torch.int64, device=device)
    indefinite = torch.zeros(m, dtype=torch.bool, device=device)
    kernel = conjugate_gradients if method == "cg" else minres
    norms = R.norm(dim=0)
    todo = ((norms > goal) & ~zero).nonzero().flatten()
    while todo.numel():
        dX, its, indef = kernel(system, R[:, todo], goal[todo], maxiter - iterations[todo],
                                precondition, bar)
        X[:, todo] += dX
        iterations[todo] += its
        indefinite[todo] |= indef
        R[:, todo] = B[:, todo] - system(X[:, todo])
        new = R[:, todo].norm(dim=0)
        again = (new > goal[todo]) & (iterations[todo] < maxiter) & ~indefinite[todo] & (
            new <= 0.5 * norms[todo])
        norms[todo] = new
        todo = todo[again]
    return X, iterations, indefinite, R


def _not_positive_definite(what: str) -> ValueError:
    return ValueError(
        f"the preconditioner is not positive definite ({what}); CG and MINRES need a "
        "symmetric positive definite M (for a diagonal, take absolute values)"
    )


def conjugate_gradients(
    system: Apply, R0: torch.Tensor, goal: torch.Tensor, budget: torch.Tensor,
    precondition: Apply | None, bar: Any,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Preconditioned) CG on ``A dX = R0`` column by column, one block product per step.

    Args:
        system: ``V -> A V``.
        R0: ``(n, m)`` right-hand sides (residuals of the current iterate).
        goal: ``(m,)`` absolute residual norm at which a column stops.
        budget: ``(m,)`` most iterations per column.
        precondition: ``r -> M r`` or ``None``.
        bar: a progress bar or ``None``.

    Returns ``(dX, iterations, indefinite)``.
    """
    m = R0.shape[1]
    dX = torch.zeros_like(R0)
    iterations = torch.zeros(m, dtype=torch.int64, device=R0.device)
    indefinite = torch.zeros(m, dtype=torch.bool, device=R0.device)
    active = torch.arange(m, device=R0.device)
    R = R0.clone()
    Z = R if precondition is None else precondition(R)
    rz = (R * Z).sum(dim=0)
    if precondition is not None and bool((rz <= 0).any()):
        raise _not_positive_definite("r^T M r <= 0")
    P = Z.clone()
    X = torch.zeros_like(R0)
    step = 0
    while active.numel():
        AP = system(P)
        pAp = (P * AP).sum(dim=0)
        bad = pAp <= 0
        alpha = rz / torch.where(bad, 1.0, pAp)
        alpha = torch.where(bad, 0.0, alpha)
        X += alpha * P
        R -= alpha * AP
        step += 1
        if bar is not None:
            bar.update(1)
        Z = R if precondition is None else precondition(R)
        rz_new = (R * Z).sum(dim=0)
        done = bad | (R.norm(dim=0) <= goal[active]) | (step >= budget[active])
        if precondition is not None and bool((rz_new[~done] <= 0).any()):
            raise _not_positive_definite("r^T M r <= 0")
        indefinite[active] = bad
        iterations[active] = step
        finished = done.nonzero().flatten()
        dX[:, active[finished]] = X[:, finished]
        keep = (~done).nonzero().flatten()
        if keep.numel() < active.numel():
            active, X, R, Z, P = active[keep], X[:, keep], R[:, keep], Z[:, keep], P[:, keep]
            rz, rz_new = rz[keep], rz_new[keep]
        P = Z + (rz_new / rz) * P
        rz = rz_new
    return dX, iterations, indefinite


def minres(
    system: Apply, R0: torch.Tensor, goal: torch.Tensor, budget: torch.Tensor,
    precondition: Apply | None, bar: Any,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Preconditioned) MINRES on ``A dX = R0``, each column its own Lanczos recurrence,
    one block product per step; arguments and returns as :func:`conjugate_gradients`
    (``indefinite`` all ``False``: MINRES needs no definiteness).

    The recurrence is Paige & Saunders' (as in ``scipy.sparse.linalg.minres``), with the
    scalars of all columns as ``(m,)`` tensors. A column stops when its residual
    estimate ``phibar`` (the 2-norm without a preconditioner, else the ``M``-norm,
    scaled by the ratio of the goal to ``||R0||``) meets its goal, or its Lanczos
    recurrence breaks down (``beta = 0``: the Krylov space is invariant, the iterate is
    the best it holds).
    """
    m = R0.shape[1]
    dtype, device = R0.dtype, R0.device
    tiny = torch.finfo(dtype).tiny
    eps = torch.finfo(dtype).eps
    dX = torch.zeros_like(R0)
    iterations = torch.zeros(m, dtype=torch.int64, device=device)
    active = torch.arange(m, device=device)
    r1 = R0.clone()
    y = r1 if precondition is None else precondition(r1)
    beta1 = (r1 * y).sum(dim=0)
    if bool((beta1 <= 0).any()):
        raise _not_positive_definite("r^T M r <= 0")
    beta1 = beta1.sqrt()
    # in the preconditioned norm, stop at the same fraction of the start as asked of R0
    target = goal[active] / R0.norm(dim=0) * beta1
    zeros = torch.zeros(m, dtype=dtype, device=device)
    s = {
        "r1": r1, "r2": r1.clone(), "y": y, "x": torch.zeros_like(R0),
        "w": torch.zeros_like(R0), "w2": torch.zeros_like(R0),
        "beta": beta1.clone(), "oldb": zeros.clone(), "dbar": zeros.clone(),
        "epsln": zeros.clone(), "phibar": beta1.clone(), "cs": -torch.ones_like(zeros),
        "sn": zeros.clone(), "target": target, "budget": budget.clone(),
    }
    step = 0
    while active.numel():
        step += 1
        v = s["y"] / s["beta"]
        y = system(v)
        if step >= 2:
            y = y - (s["beta"] / s["oldb"]) * s["r1"]
        alfa = (v * y).sum(dim=0)
        y = y - (alfa / s["beta"]) * s["r2"]
        s["r1"], s["r2"] = s["r2"], y
        y = y if precondition is None else precondition(y)
        s["y"] = y
        s["oldb"] = s["beta"]
        beta2 = (s["r2"] * y).sum(dim=0)
        if precondition is not None and bool((beta2 < 0).any()):
            raise _not_positive_definite("r^T M r < 0")
        s["beta"] = beta2.clamp_min(0).sqrt()
        # the next plane rotation, which eliminates the subdiagonal beta
        oldeps = s["epsln"]
        delta = s["cs"] * s["dbar"] + s["sn"] * alfa
        gbar = s["sn"] * s["dbar"] - s["cs"] * alfa
        s["epsln"] = s["sn"] * s["beta"]
        s["dbar"] = -s["cs"] * s["beta"]
        gamma = torch.hypot(gbar, s["beta"]).clamp_min(eps)
        s["cs"], s["sn"] = gbar / gamma, s["beta"] / gamma
        phi = s["cs"] * s["phibar"]
        s["phibar"] = s["sn"] * s["phibar"]
        w1, s["w2"] = s["w2"], s["w"]
        s["w"] = (v - oldeps * w1 - delta * s["w2"]) / gamma
        s["x"] = s["x"] + phi * s["w"]
        if bar is not None:
            bar.update(1)
        breakdown = s["beta"] <= tiny ** 0.5 * beta1[active]
        done = (s["phibar"] <= s["target"]) | breakdown | (step >= s["budget"])
        iterations[active] = step
        finished = done.nonzero().flatten()
        dX[:, active[finished]] = s["x"][:, finished]
        keep = (~done).nonzero().flatten()
        if keep.numel() < active.numel():
            active = active[keep]
            s = {k: t[..., keep] for k, t in s.items()}
    return dX, iterations, torch.zeros(m, dtype=torch.bool, device=device)
