"""How a batch becomes a loss, and how batches combine into the data set's loss.

Every curvature operator is defined on the loss of the *whole* data set as if it were one
batch. For ``reduction="sum"`` that is the sum of the batch losses. For ``"mean"`` each
batch's (mean-reduced) loss is weighted by its number of loss terms ``w_b`` and the
total divided by ``sum_b w_b``, which is exact for unequal batch sizes, ``ignore_index``
targets and class weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

Batch = Any

_ELEMENTWISE = (
    nn.MSELoss,
    nn.L1Loss,
    nn.SmoothL1Loss,
    nn.HuberLoss,
    nn.BCEWithLogitsLoss,
    nn.BCELoss,
    nn.SoftMarginLoss,
    nn.PoissonNLLLoss,
)


@dataclass
class Objective:
    """A loss over batches, split so that curvature operators can use its parts.

    Attributes:
        forward: ``forward(model, batch) -> output``: the model's prediction (e.g. logits
            of shape ``(B, C)``), the quantity the GGN linearises.
        loss: ``loss(output, batch) -> scalar``: the batch's loss, reduced over the batch
            as ``reduction`` says.
        reduction: ``"mean"`` or ``"sum"``.
        weight: ``weight(batch) -> number of loss terms`` (a 0-dim tensor or float) used to
            combine mean-reduced batches; ``None`` weighs every batch equally (an average of
            batch losses, exact only when all batches have the same weight).
        criterion: the ``nn.Module`` loss when there is one (closed-form loss Hessians).
        targets: ``targets(batch) -> y`` with ``loss(output, batch) == criterion(output, y)``;
            set together with ``criterion`` so closed-form loss Hessians and label
            sampling (GGN, Fisher) know the targets. ``None`` means autograd fallbacks.
    """

    forward: Callable[[nn.Module, Batch], torch.Tensor]
    loss: Callable[[torch.Tensor, Batch], torch.Tensor]
    reduction: str = "mean"
    weight: Callable[[Batch], torch.Tensor | float] | None = None
    criterion: nn.Module | None = None
    targets: Callable[[Batch], Any] | None = None

    def __post_init__(self) -> None:
        if self.reduction not in ("mean", "sum"):
            raise ValueError(
                f"reduction must be 'mean' or 'sum', got {self.reduction!r}; a curvature "
                "matrix needs a scalar loss"
            )
        # Every operator calls the loss through this field, so checking here catches a
        # non-scalar loss wherever it is first evaluated (at construction when
        # check_deterministic is on) instead of deep inside autograd.
        if not isinstance(self.loss, _ScalarLoss):
            self.loss = _ScalarLoss(self.loss)

    def __call__(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        loss = self.loss
        if type(loss) is _ScalarLoss and loss.fn is _identity:
            # from_loss_fn's objective: its forward is the loss (one frame per batch
            # instead of three)
            value = self.forward(model, batch)
            if isinstance(value, torch.Tensor) and value.ndim != 0:
                _scalar(value)
            return value
        return loss(self.forward(model, batch), batch)

    def batch_weight(self, batch: Batch) -> torch.Tensor | float:
        """The batch's share of the data set's loss before normalisation."""
        if self.reduction == "sum" or self.weight is None:
            return 1.0
        return self.weight(batch)

    @classmethod
    def from_loss_fn(
        cls,
        loss_fn: Callable[[nn.Module, Batch], torch.Tensor],
        *,
        weight: Callable[[Batch], torch.Tensor | float] | None = None,
        reduction: str = "mean",
    ) -> Objective:
        """An objective from ``loss_fn(model, batch) -> scalar`` (e.g. HuggingFace dict
        batches). It has no separate output, so it serves Hessians but not GGNs."""

        return cls(forward=loss_fn, loss=_identity, reduction=reduction, weight=weight)


def _identity(output: torch.Tensor, batch: Batch) -> torch.Tensor:
    return output


class _ScalarLoss:
    """An objective's ``loss``, refusing results that are not 0-dim tensors."""

    def __init__(self, fn: Callable[[torch.Tensor, Batch], torch.Tensor]) -> None:
        self.fn = fn

    def __call__(self, output: torch.Tensor, batch: Batch) -> torch.Tensor:
        return _scalar(self.fn(output, batch))

    # the wrapper is invisible: Objectives compare and print as the function they hold
    def __eq__(self, other: object) -> bool:
        return self.fn == getattr(other, "fn", other)

    def __hash__(self) -> int:
        return hash(self.fn)

    def __repr__(self) -> str:
        return repr(self.fn)


def _scalar(loss: torch.Tensor) -> torch.Tensor:
    if isinstance(loss, torch.Tensor) and loss.ndim != 0:
        raise ValueError(
            f"the loss returned a tensor of shape {tuple(loss.shape)}, not a scalar; a "
            "curvature matrix needs the batch's loss reduced to one number: use a "
            "criterion with reduction='mean' or 'sum', or end the loss function with "
            ".mean() / .sum()"
        )
    return loss


class _Supervised(Objective):
    """:func:`supervised`'s objective, whose call is ``forward`` then ``loss`` in one frame
    while both are still its own (every product calls it once per batch); a copy made
    by ``dataclasses.replace``, or one whose ``forward`` or ``loss`` was set anew, calls
    them as any objective does."""

    _own: tuple[Any, nn.Module] | None = None  # (its loss, the criterion that loss calls)
    # (its weight, the criterion whose loss terms that weight counts)
    _counts: tuple[Any, nn.Module] | None = None

    def __call__(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        own = self._own
        if own is None or self.loss is not own[0] or self.forward is not _forward_x:
            return super().__call__(model, batch)
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            _check_pair(batch)
        loss = own[1](model(batch[0]), batch[1])
        if isinstance(loss, torch.Tensor) and loss.ndim != 0:
            _scalar(loss)
        return loss


def counts_criterion_terms(objective: Objective) -> bool:
    """Whether ``objective.weight`` is the count of its criterion's loss terms that
    :func:`supervised` gives it (so a mean-reduced batch's share of the data set's loss
    is the criterion's normaliser over the data set's), checked as the objective is now:
    a copy, or one whose ``weight`` or ``criterion`` was set anew, is not known to."""
    counts = getattr(objective, "_counts", None)
    return (counts is not None and objective.weight is counts[0]
            and objective.criterion is counts[1])


def has_separate_output(objective: Objective) -> bool:
    """Whether ``objective.forward`` gives a model output rather than the loss itself."""
    return getattr(objective.loss, "fn", objective.loss) is not _identity


def supervised(criterion: nn.Module) -> Objective:
    """The objective ``criterion(model(X), y)`` for batches ``(X, y)``.

    Loss terms per batch (for ``reduction="mean"``): ``CrossEntropyLoss``/``NLLLoss``
    count targets other than ``ignore_index`` (weighted by ``weight[y]`` when class
    weights are set; rows for probability targets), element-wise losses (MSE, BCE, ...)
    count target elements, ``KLDivLoss(reduction="batchmean")`` counts rows.
    """
    reduction = getattr(criterion, "reduction", None)
    if reduction == "batchmean" and isinstance(criterion, nn.KLDivLoss):
        reduction = "mean"
    if reduction not in ("mean", "sum"):
        raise ValueError(
            f"{type(criterion).__name__} has reduction={reduction!r}; use 'mean' or 'sum' "
            "(a curvature matrix needs a scalar loss), or pass an Objective"
        )
    weight = None
    if reduction == "mean":
        weight = _loss_term_counter(criterion)

    objective = _Supervised(
        forward=_forward_x,
        loss=lambda output, batch: criterion(output, _targets(batch)),
        reduction=reduction,
        weight=weight,
        criterion=criterion,
        targets=_targets,
    )
    objective._own = (objective.loss, criterion)
    if weight is not None:
        objective._counts = (weight, criterion)
    return objective


def _forward_x(model: nn.Module, batch: Batch) -> torch.Tensor:
    return model(_inputs(batch))


def _inputs(batch: Batch) -> Any:
    _check_pair(batch)
    return batch[0]


def _targets(batch: Batch) -> Any:
    _check_pair(batch)
    return batch[1]


def _check_pair(batch: Batch) -> None:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError(
            f"a criterion takes batches (X, y); got {type(batch).__name__}"
            + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
            + ". For other batches pass Objective.from_loss_fn(loss_fn, weight=...)"
        )


def _loss_term_counter(criterion: nn.Module) -> Callable[[Batch], torch.Tensor | float]:
    if isinstance(criterion, (nn.CrossEntropyLoss, nn.NLLLoss)):
        ignore_index = criterion.ignore_index
        class_weight = criterion.weight

        def count_classification(batch: Batch) -> torch.Tensor | float:
            y = _targets(batch)
            if y.is_floating_point():  # class probabilities, (N, C, d1, ...) or (C,)
                return float(y.numel() // y.shape[1]) if y.ndim > 1 else 1.0
            keep = y != ignore_index
            if class_weight is None:
                # summed in float64: the share w_b / W that divides it needs no conversion
                return keep.sum(dtype=torch.float64)
            return class_weight.to(y.device)[y[keep]].sum()

        return count_classification
    if isinstance(criterion, nn.KLDivLoss) and criterion.reduction == "batchmean":
        return lambda batch: float(_targets(batch).shape[0])
    if isinstance(criterion, (*_ELEMENTWISE, nn.KLDivLoss)):
        return lambda batch: float(_targets(batch).numel())
    raise TypeError(
        f"torchcurv does not know how {type(criterion).__name__} with reduction='mean' "
        "counts loss terms; use reduction='sum' or pass "
        "Objective(forward, loss, weight=...) that says it"
    )


def as_objective(criterion: nn.Module | Objective) -> Objective:
    """Accept a torch loss module or an :class:`Objective`."""
    if isinstance(criterion, Objective):
        return criterion
    if isinstance(criterion, nn.Module):
        return supervised(criterion)
    if callable(criterion):
        raise TypeError(
            "a plain callable is ambiguous; wrap it: Objective.from_loss_fn(loss_fn, "
            "weight=lambda batch: <number of loss terms>)"
        )
    raise TypeError(f"criterion must be a torch loss module or an Objective, got {criterion!r}")
