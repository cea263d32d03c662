"""Built-in losses written so that forward-mode AD can differentiate their gradient.

Forward-over-reverse Hessian products (``torch.func.jvp`` of ``torch.func.grad``) need a
forward-mode rule for the backward of every op in the loss. Some fused loss kernels have
none (``huber_loss_backward``, ``soft_margin_loss_backward`` in torch 2.13), so for those
criteria the loss is evaluated here from elementary ops with the same value at every
point and the same first and second derivatives as the fused kernel's autograd formulas
(also at the kinks), hence the same Hessian as ``method="autograd"``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from torchcurv.objectives import Objective

Batch = Any


def _reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return values.mean()
    if reduction == "sum":
        return values.sum()
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def _huber(criterion: nn.HuberLoss, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # Strict '<' as in torch's kernel: at |d| == delta the value, the gradient (± delta)
    # and the second derivative (0, torch's double backward) all agree with the fused op.
    d = output - target
    z = d.abs()
    delta = criterion.delta
    values = torch.where(z < delta, 0.5 * d * d, delta * (z - 0.5 * delta))
    return _reduce(values, criterion.reduction)


def _soft_margin(
    criterion: nn.SoftMarginLoss, output: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    # torch's own formula (not softplus, whose linear tail beyond its threshold has a zero
    # second derivative where the fused op's is tiny but not zero).
    return _reduce(torch.log1p(torch.exp(-target * output)), criterion.reduction)


# Only criteria whose fused backward lacks a forward-mode rule: every other built-in loss
# goes through its own kernel (fastest, and bit-identical to a plain loss evaluation).
_REWRITTEN: dict[type, Callable[[Any, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    nn.HuberLoss: _huber,
    nn.SoftMarginLoss: _soft_margin,
}


def forward_mode_objective(objective: Objective) -> Objective:
    """``objective`` with its criterion evaluated by ops forward-mode AD can push twice.

    Returns ``objective`` itself unless it names a criterion listed in ``_REWRITTEN`` and
    its targets, in which case the copy's ``loss(output, batch)`` is the elementary
    formulation of ``criterion(output, targets(batch))`` (the equality
    :class:`~torchcurv.Objective` documents for ``targets``).
    """
    crit, targets = objective.criterion, objective.targets
    rule = _REWRITTEN.get(type(crit))
    if rule is None or targets is None:
        return objective

    def loss(output: torch.Tensor, batch: Batch) -> torch.Tensor:
        return rule(crit, output, targets(batch))

    return replace(objective, loss=loss)
