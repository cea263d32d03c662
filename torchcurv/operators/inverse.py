"""``(A + damping I)^{-1}`` as an operator, each product an iterative solve."""

from __future__ import annotations

from typing import Any

import torch

from torchcurv.algorithms.arguments import check_maxiter, check_tol
from torchcurv.algorithms.probing import check_choice, check_operator
from torchcurv.algorithms.solve import SOLVE_METHODS, SolveMethod, SolveResult, check_damping, solve
from torchcurv.interop.reverse import from_linear_operator
from torchcurv.operators.base import LinearOperator


class InverseOperator(LinearOperator):
    """The inverse ``(A + damping I)^{-1}`` of a symmetric operator, usable wherever an
    operator is (``@``, :func:`~torchcurv.as_linear_operator`,
    :func:`~torchcurv.as_cupy_linear_operator`, :func:`~torchcurv.eigsh`, trace, ...).

    Each product ``V -> X`` runs :func:`torchcurv.solve` on the block ``V`` (all columns
    in one solve, one product of ``A`` per iteration). A solve that misses ``tol`` in any
    column raises :class:`~torchcurv.NotConvergedError` naming the columns and the
    residual reached: the inverse is never silently approximate beyond ``tol``.

    Args:
        op: the symmetric operator ``A`` (a torchcurv operator, or anything
            :func:`torchcurv.from_linear_operator` accepts).
        damping: ``lambda`` in ``A + lambda I`` (any finite real; negative values shift,
            as shift-invert does with ``-sigma``).
        method: ``"cg"`` (positive definite ``A + damping I``) or ``"minres"`` (any
            symmetric, nonsingular ``A + damping I``).
        tol: relative residual of every inner solve (``0``: machine precision).
        maxiter: most iterations per inner solve (default ``10 n``).
        preconditioner: as for :func:`torchcurv.solve`.

    Attributes:
        operator: ``A``.
        last_result: the :class:`~torchcurv.algorithms.solve.SolveResult` of the latest
            product (``None`` before the first), for its iterations and residuals.
        num_inner_matvecs: products with ``A`` all solves used so far.

    Symmetric to the solves' accuracy (exactly symmetric only in the limit ``tol -> 0``),
    which is what Krylov eigensolvers on it then see.
    """

    def __init__(
        self,
        op: Any,
        damping: float = 0.0,
        *,
        method: SolveMethod = "cg",
        tol: float = 1e-6,
        maxiter: int | None = None,
        preconditioner: Any = None,
    ) -> None:
        if not isinstance(op, LinearOperator):
            op = from_linear_operator(op)
        op = check_operator(op, "InverseOperator")
        check_choice(method, SOLVE_METHODS, "solve method")
        super().__init__(op.n, op.dtype, op.device)
        self.operator = op
        self.damping = check_damping(damping)
        self.method = method
        self.tol = check_tol(tol, op.dtype)
        self.maxiter = check_maxiter(maxiter, 10 * op.n)
        self.preconditioner = preconditioner
        self.last_result: SolveResult | None = None
        self.num_inner_matvecs = 0

    # distributed algorithms on the inverse coordinate their ranks as A's products do
    @property
    def distributed(self) -> bool:
        return bool(getattr(self.operator, "distributed", False))

    @property
    def process_group(self) -> Any:
        return getattr(self.operator, "process_group", None)

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        result = solve(self.operator, V, damping=self.damping, method=self.method,
                       tol=self.tol, maxiter=self.maxiter, preconditioner=self.preconditioner)
        self.last_result = result
        self.num_inner_matvecs += result.num_matvecs
        result.raise_if_not_converged(f"{type(self).__name__}'s product")
        return result.x

    def __repr__(self) -> str:
        return (f"<InverseOperator of {self.operator!r}, damping={self.damping:g}, "
                f"method={self.method!r}, tol={self.tol:g}>")
