"""An explicit symmetric matrix as a torchcurv operator (tests, known spectra, small n)."""

from __future__ import annotations

import torch

from torchcurv.operators.base import LinearOperator


class MatrixOperator(LinearOperator):
    """Wrap a dense symmetric ``(n, n)`` torch tensor ``A``: the operator is ``A`` itself,
    ``op @ V = A @ V``.

    Args:
        matrix: ``(n, n)`` tensor; its dtype and device become the operator's.
        check_symmetric: raise if ``matrix`` is not symmetric to 1e3 machine epsilons
            (relative, Frobenius norm).

    Example:
        The tridiagonal ``A = tridiag(1, 2, 1)`` of order 3 has the largest eigenvalue
        ``2 + sqrt(2)``:

        >>> import torch, torchcurv
        >>> A = torch.tensor([[2.0, 1.0, 0.0], [1.0, 2.0, 1.0], [0.0, 1.0, 2.0]],
        ...                  dtype=torch.float64)
        >>> op = torchcurv.MatrixOperator(A)
        >>> v = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
        >>> torch.equal(op @ v, A @ v)
        True
        >>> top = torchcurv.eigsh(op, k=1, backend="lanczos", tol=1e-12).eigenvalues
        >>> torch.allclose(top, torch.tensor([2 + 2**0.5], dtype=torch.float64))
        True
    """

    def __init__(self, matrix: torch.Tensor, *, check_symmetric: bool = True) -> None:
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"need a square matrix, got shape {tuple(matrix.shape)}")
        if check_symmetric:
            scale = matrix.norm().clamp_min(torch.finfo(matrix.dtype).tiny)
            asym = float((matrix - matrix.T).norm() / scale)
            if asym > 1e3 * torch.finfo(matrix.dtype).eps:
                raise ValueError(
                    f"matrix is not symmetric (relative asymmetry {asym:.1e}); torchcurv "
                    "operators are symmetric"
                )
        super().__init__(matrix.shape[0], matrix.dtype, matrix.device)
        self.matrix = matrix

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.matrix @ V
