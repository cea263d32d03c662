"""The contract of non-square operators (Jacobians): products with ``A`` and ``A^T``.

:class:`~torchcurv.LinearOperator` is square and symmetric, and every torchcurv
eigensolver relies on that; a ``(rows, cols)`` operator is a separate kind, so that it
cannot be handed to them by mistake. It takes and returns torch tensors of its dtype on
its device: ``(cols,)`` / ``(cols, m)`` for :meth:`matvec` / :meth:`matmat`, ``(rows,)``
/ ``(rows, m)`` for :meth:`rmatvec` / :meth:`rmatmat`.
"""

from __future__ import annotations

import contextlib

import torch

from torchcurv.errors import OperatorInputError
from torchcurv.operators.base import _check_finite, check_vector
from torchcurv.operators.counting import ProductCounter


class RectangularOperator(ProductCounter):
    """A real ``(rows, cols)`` operator known through products with it and its transpose.

    Subclasses implement :meth:`_matmat` (``(cols, m) -> (rows, m)``) and
    :meth:`_rmatmat` (``(rows, m) -> (cols, m)``) on validated blocks.

    Attributes:
        num_matvecs: vectors multiplied by the operator or its transpose (a block of
            ``m`` counts ``m``); :attr:`T` counts into the same number.
        num_calls: product calls, either direction.

    Every product refuses vectors with NaN/inf entries (:class:`~torchcurv.OperatorInputError`).
    """

    def __init__(self, rows: int, cols: int, dtype: torch.dtype, device: torch.device | str):
        if rows < 1 or cols < 1:
            raise ValueError(f"an operator needs at least one row and column, got {rows} x {cols}")
        self._rows, self._cols = int(rows), int(cols)
        self._dtype = dtype
        self._device = torch.device(device)

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _rmatmat(self, W: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def shape(self) -> tuple[int, int]:
        return (self._rows, self._cols)

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``A @ v`` for ``v`` of shape ``(cols,)``; returns ``(rows,)``."""
        return self._product(v, transpose=False, block=False)

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """``A @ V`` for ``V`` of shape ``(cols, m)``; returns ``(rows, m)``."""
        return self._product(V, transpose=False, block=True)

    def rmatvec(self, w: torch.Tensor) -> torch.Tensor:
        """``A^T @ w`` for ``w`` of shape ``(rows,)``; returns ``(cols,)``."""
        return self._product(w, transpose=True, block=False)

    def rmatmat(self, W: torch.Tensor) -> torch.Tensor:
        """``A^T @ W`` for ``W`` of shape ``(rows, m)``; returns ``(cols, m)``."""
        return self._product(W, transpose=True, block=True)

    def __matmul__(self, other: torch.Tensor) -> torch.Tensor:
        return self._product(other, transpose=False, block=None)

    @property
    def T(self) -> RectangularOperator:  # noqa: N802 - numpy/scipy spelling
        """The transpose, an operator of shape ``(cols, rows)`` sharing this one's
        products and counts; ``A.T.T`` is ``A``."""
        return TransposedOperator(self)

    def adjoint(self) -> RectangularOperator:
        """The adjoint: the transpose (the operator is real)."""
        return self.T

    H = property(adjoint)

    def to_dense(self, chunk_size: int = 256, max_entries: int = 10**8) -> torch.Tensor:
        """Materialise the ``(rows, cols)`` matrix from blocks of identity columns."""
        rows, cols = self.shape
        if rows * cols > max_entries:
            raise ValueError(
                f"to_dense would build a {rows} x {cols} matrix; raise max_entries to force it"
            )
        blocks = []
        for start in range(0, cols, chunk_size):
            stop = min(start + chunk_size, cols)
            E = torch.zeros(cols, stop - start, dtype=self.dtype, device=self.device)
            E[torch.arange(start, stop), torch.arange(stop - start)] = 1
            blocks.append(self.matmat(E))
        return torch.cat(blocks, dim=1)

    def _product(self, V: torch.Tensor, *, transpose: bool, block: bool | None) -> torch.Tensor:
        rows = self._rows if transpose else self._cols
        V = check_vector(V, rows, self._dtype, self._device, type(self).__name__)
        if block is not None and (V.ndim == 2) != block:
            name = ("r" if transpose else "") + ("matmat" if block else "matvec")
            wanted = f"({rows}, m)" if block else f"({rows},)"
            raise OperatorInputError(f"{name} takes shape {wanted}, got {tuple(V.shape)}")
        one = V.ndim == 1
        X = V.unsqueeze(1) if one else V
        out_rows = self._cols if transpose else self._rows
        if X.shape[1] == 0:
            return X.new_zeros(out_rows, 0)
        _check_finite(X, one)
        Y = self._rmatmat(X) if transpose else self._matmat(X)
        self._count(X.shape[1])
        return Y.squeeze(1) if one else Y

    def __repr__(self) -> str:
        return (f"<{type(self).__name__} shape={self.shape} dtype={self._dtype} "
                f"device={self._device}>")


class TransposedOperator(RectangularOperator):
    """``A^T`` of a :class:`RectangularOperator` ``A``: its products are ``A``'s
    transposed products, counted in ``A``'s counters."""

    def __init__(self, parent: RectangularOperator) -> None:
        rows, cols = parent.shape
        super().__init__(cols, rows, parent.dtype, parent.device)
        self.parent = parent

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.parent._rmatmat(V)

    def _rmatmat(self, W: torch.Tensor) -> torch.Tensor:
        return self.parent._matmat(W)

    def _count(self, columns: int) -> None:
        self.parent._count(columns)

    @property
    def num_matvecs(self) -> int:  # type: ignore[override]
        return self.parent.num_matvecs

    @property
    def num_calls(self) -> int:  # type: ignore[override]
        return self.parent.num_calls

    def uncounted(self) -> contextlib.AbstractContextManager[None]:  # type: ignore[override]
        return self.parent.uncounted()

    @property
    def T(self) -> RectangularOperator:  # noqa: N802
        return self.parent

    def __repr__(self) -> str:
        return f"<transpose of {self.parent!r}>"

