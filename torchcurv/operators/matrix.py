"""An explicit symmetric matrix as a torchcurv operator (tests, known spectra, small n)."""

from __future__ import annotations

import torch

from torchcurv.operators.base import LinearOperator


class MatrixOperator(LinearOperator):
    """Wrap a dense symmetric ``(n, n)`` torch tensor.

    Args:
        matrix: ``(n, n)`` tensor; its dtype and device become the operator's.
        check_symmetric: raise if ``matrix`` is not symmetric to 1e3 machine epsilons
            (relative, Frobenius norm).
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
