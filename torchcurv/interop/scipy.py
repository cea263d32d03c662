"""torchcurv operators as ``scipy.sparse.linalg.LinearOperator``.

Every scipy solver (``eigsh``, ``lobpcg``, ``cg``, ``minres``, ``gmres``, ``svds``,
``expm_multiply``, operator algebra) then runs on a curvature matrix. Vectors cross
from NumPy to torch once per product: a block of ``m`` columns is one call to the torch
operator's ``matmat``, never a loop over columns.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse.linalg as sla
import torch

from torchcurv.operators.base import LinearOperator
from torchcurv.operators.counting import ProductCounter
from torchcurv.operators.rectangular import RectangularOperator

_SOLVER_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


class ScipyLinearOperator(sla.LinearOperator, ProductCounter):
    """A torchcurv :class:`~torchcurv.LinearOperator` seen by scipy.

    The adapter's ``dtype`` is the precision scipy's solvers work in (ARPACK and LOBPCG
    pick their arithmetic from it). Each product converts the incoming NumPy block to
    the torch operator's dtype and device, multiplies once, and converts back to
    ``numpy.result_type(self.dtype, x.dtype)`` (what a scipy matrix operator returns).
    Complex vectors are split into real and imaginary columns of one block product (the
    operator is real).

    Attributes:
        operator: the wrapped torch operator.
        num_matvecs: vectors multiplied through this adapter (a block of ``m`` counts
            ``m``; a complex vector counts 2). The torch operator keeps its own count.
        num_calls: product calls through this adapter.
    """

    def __init__(
        self,
        operator: LinearOperator | RectangularOperator,
        dtype: np.dtype | type | str | None = None,
    ):
        if not isinstance(operator, (LinearOperator, RectangularOperator)):
            raise TypeError(
                f"as_linear_operator wraps a torchcurv LinearOperator, got "
                f"{type(operator).__name__}; wrap other objects with "
                "torchcurv.from_linear_operator first"
            )
        dtype = np.dtype(np.float64 if dtype is None else dtype)
        if dtype not in _SOLVER_DTYPES:
            raise ValueError(
                f"dtype must be float32 or float64 (what ARPACK/LOBPCG work in), got {dtype}"
            )
        # An explicit dtype: scipy would otherwise probe with one matvec (a data pass).
        super().__init__(dtype=dtype, shape=operator.shape)
        self.operator = operator

    def _matmat(self, X: np.ndarray, transpose: bool = False) -> np.ndarray:
        X = np.asarray(X)
        out_dtype = np.result_type(self.dtype, X.dtype)
        if np.iscomplexobj(X):
            m = X.shape[1]
            Y = self._real_product(np.concatenate([X.real, X.imag], axis=1), transpose)
            return (Y[:, :m] + 1j * Y[:, m:]).astype(out_dtype, copy=False)
        return self._real_product(X, transpose).astype(out_dtype, copy=False)

    def _matvec(self, x: np.ndarray) -> np.ndarray:
        # scipy's matvec reshapes the (n, 1) result back to the shape it was given.
        return self._matmat(np.asarray(x).reshape(-1, 1))

    # The operator is real symmetric: it is its own transpose and adjoint.
    _rmatvec = _matvec
    _rmatmat = _matmat

    def _adjoint(self) -> ScipyLinearOperator:
        return self

    def _transpose(self) -> ScipyLinearOperator:
        return self

    def _real_product(self, X: np.ndarray, transpose: bool = False) -> np.ndarray:
        op = self.operator
        X = np.ascontiguousarray(X)
        if not X.flags.writeable:  # torch.from_numpy warns on read-only memory
            X = X.copy()
        V = torch.from_numpy(X).to(device=op.device, dtype=op.dtype)
        Y = op.rmatmat(V) if transpose else op.matmat(V)
        self._count(X.shape[1])
        return tensor_to_numpy(Y)


class ScipyRectangularOperator(ScipyLinearOperator):
    """A non-square torchcurv operator (:class:`~torchcurv.JacobianOperator`) seen by
    scipy: ``rmatvec``/``rmatmat`` are the transpose's torch products, ``.T``/``.H`` an
    adapter of the transpose, so ``svds`` and ``lsqr`` run on it."""

    def _rmatmat(self, X: np.ndarray, transpose: bool = False) -> np.ndarray:
        return self._matmat(X, transpose=not transpose)

    def _rmatvec(self, x: np.ndarray) -> np.ndarray:
        return self._matmat(np.asarray(x).reshape(-1, 1), transpose=True)

    def _adjoint(self) -> ScipyRectangularOperator:
        return ScipyRectangularOperator(self.operator.T, self.dtype)

    _transpose = _adjoint


def tensor_to_numpy(t: torch.Tensor) -> np.ndarray:
    """A host NumPy array of ``t`` (bfloat16, which NumPy lacks, becomes float32)."""
    t = t.detach()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.cpu().numpy()


def as_linear_operator(
    op: LinearOperator | RectangularOperator, dtype: np.dtype | type | str | None = None
) -> ScipyLinearOperator:
    """Wrap a torchcurv operator as a ``scipy.sparse.linalg.LinearOperator``.

    Args:
        op: a torchcurv operator (``n x n``, symmetric), on any device and dtype; or a
            non-square one (:class:`~torchcurv.JacobianOperator`), then wrapped as a
            :class:`ScipyRectangularOperator`.
        dtype: the scipy-side dtype, float32 or float64. Default float64 for every
            operator: ARPACK and LOBPCG then orthogonalise and restart in double
            precision (in float32 ARPACK's implicit restarts lose orthogonality and
            converge poorly), while each product still runs in the operator's own
            dtype on its own device. Pass ``numpy.float32`` to halve host memory for
            ARPACK's ``(ncv + 3) * n`` workspace.

    Returns:
        A :class:`ScipyLinearOperator` of shape ``(n, n)``. Inputs may be ``(n,)``,
        ``(n, 1)`` or ``(n, m)``, any NumPy real or complex dtype, any memory order;
        outputs follow scipy's shape rules.
    """
    if isinstance(op, RectangularOperator):
        return ScipyRectangularOperator(op, dtype)
    return ScipyLinearOperator(op, dtype)
