"""``∇²_f loss`` for a criterion or an objective: closed forms where known, else autograd."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from torchcurv.losses.autograd import AutogradHessian
from torchcurv.losses.base import OutputCurvature
from torchcurv.losses.cross_entropy import CrossEntropyHessian
from torchcurv.losses.elementwise import (
    DiagonalHessian,
    bce_with_logits_hessian_diagonal,
    mse_hessian_diagonal,
)
from torchcurv.objectives import Objective

Batch = Any

CLOSED_FORM = (nn.CrossEntropyLoss, nn.MSELoss, nn.BCEWithLogitsLoss)


def loss_hessian(
    criterion: nn.Module,
    output: torch.Tensor,
    target: Any,
    *,
    scale: torch.Tensor | float = 1.0,
) -> OutputCurvature:
    """``scale * ∇²_f criterion(f, target)`` at ``f = output``, as an output-space operator.

    Closed forms for ``CrossEntropyLoss`` (class-index or probability targets, class
    weights, ``ignore_index``, ``label_smoothing``, logits ``(N, C)``, ``(N, C, d1, ...)``
    or ``(C,)``), ``MSELoss`` and ``BCEWithLogitsLoss`` (``weight``, ``pos_weight``) when
    the target has the output's shape; double backward for every other criterion.

    Args:
        criterion: a torch loss module with ``reduction`` ``"mean"`` or ``"sum"``.
        output: the model output ``f`` (any shape the criterion takes).
        target: what the criterion compares ``f`` with.
        scale: a factor folded into the matrix (a float or a 0-dim tensor).

    Returns:
        An :class:`OutputCurvature` whose ``matmat`` takes ``(m, *output.shape)``.
    """
    output = output.detach()
    if getattr(criterion, "reduction", None) not in ("mean", "sum"):
        raise ValueError(
            f"{type(criterion).__name__} has reduction={getattr(criterion, 'reduction', None)!r};"
            " a loss Hessian needs a scalar loss ('mean' or 'sum')"
        )
    if isinstance(criterion, nn.CrossEntropyLoss):
        return CrossEntropyHessian(criterion, output, target, scale)
    same_shape = isinstance(target, torch.Tensor) and target.shape == output.shape
    if isinstance(criterion, nn.MSELoss) and same_shape:
        return DiagonalHessian(output, mse_hessian_diagonal(criterion, output) * scale)
    if isinstance(criterion, nn.BCEWithLogitsLoss) and same_shape:
        diag = bce_with_logits_hessian_diagonal(criterion, output, target)
        return DiagonalHessian(output, diag * scale)
    return AutogradHessian(lambda f: criterion(f, target), output, scale)


def objective_loss_hessian(
    objective: Objective, output: torch.Tensor, batch: Batch, scale: torch.Tensor | float
) -> OutputCurvature:
    """``scale * ∇²_f objective.loss(f, batch)``: closed form when the objective names
    its criterion and targets (``supervised``), autograd otherwise."""
    if objective.criterion is not None and objective.targets is not None:
        return loss_hessian(objective.criterion, output, objective.targets(batch), scale=scale)
    return AutogradHessian(lambda f: objective.loss(f, batch), output, scale)
