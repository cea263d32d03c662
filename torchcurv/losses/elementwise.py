"""Closed-form Hessians of element-wise losses: diagonal in the output entries."""

from __future__ import annotations

import torch
from torch import nn

from torchcurv.dtypes import device_scalar
from torchcurv.losses.base import OutputCurvature


class DiagonalHessian(OutputCurvature):
    """``C = diag(d)`` with ``d`` shaped like the output (or a broadcastable scalar)."""

    def __init__(self, output: torch.Tensor, diagonal: torch.Tensor) -> None:
        super().__init__(output.shape)
        self.diagonal = diagonal
        self._like = output

    def _matmat(self, U: torch.Tensor) -> torch.Tensor:
        return U * self.diagonal.to(U.dtype)

    def _dtype(self) -> torch.dtype:
        return self._like.dtype

    def _device(self) -> torch.device:
        return self._like.device


def _normaliser(criterion: nn.Module, output: torch.Tensor) -> float:
    if criterion.reduction == "mean":
        return float(output.numel())
    if criterion.reduction == "sum":
        return 1.0
    raise ValueError(f"reduction must be 'mean' or 'sum', got {criterion.reduction!r}")


def mse_hessian_diagonal(criterion: nn.MSELoss, output: torch.Tensor) -> torch.Tensor:
    """``∇² sum (f - y)²`` is ``2 I``; ``"mean"`` divides by the number of entries."""
    value = 2.0 / _normaliser(criterion, output)
    return device_scalar(value, output.dtype, output.device)


def bce_with_logits_curvature_weights(
    criterion: nn.BCEWithLogitsLoss, output: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """``a`` with ``∇² criterion = diag(a σ(f)(1 - σ(f)))``, shaped like ``output``.

    Per entry the loss is ``-w [q y log σ(f) + (1 - y) log(1 - σ(f))]`` (``w`` the
    ``weight``, ``q`` the ``pos_weight``); both logs have second derivative
    ``-σ(1 - σ)``, so ``a = w (q y + 1 - y)``, divided by the entry count for ``"mean"``.
    """
    y = target.to(output.dtype)
    a = torch.ones_like(output)
    if criterion.pos_weight is not None:
        a = criterion.pos_weight.to(output) * y + (1 - y)
    if criterion.weight is not None:
        a = a * criterion.weight.to(output)
    return a.expand(output.shape) / _normaliser(criterion, output)


def bce_with_logits_hessian_diagonal(
    criterion: nn.BCEWithLogitsLoss, output: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """The diagonal of ``∇²_f criterion(f, y)``, shaped like ``output``."""
    s = torch.sigmoid(output)
    return bce_with_logits_curvature_weights(criterion, output, target) * s * (1 - s)
