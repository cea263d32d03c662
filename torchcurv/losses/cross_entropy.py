"""Closed-form Hessian of ``nn.CrossEntropyLoss`` with respect to the logits.

Per sample (one row of ``C`` logits ``z``, ``p = softmax(z)``) the loss is
``sum_c a_c (-log p_c)`` with non-negative coefficients ``a`` (the one-hot target, class
weights, label smoothing, probability targets), and ``d²/dz² (-log p_c) = diag(p) - p pᵀ``
for every ``c``. So the Hessian is ``(sum_c a_c) (diag(p) - p pᵀ)``: label smoothing
leaves it unchanged (its coefficients sum to one), class weights and ``ignore_index``
scale rows, and ``reduction="mean"`` divides by the criterion's own normaliser.
"""

from __future__ import annotations

import torch
from torch import nn

from torchcurv.dtypes import accumulation_dtype
from torchcurv.kernels.ce_hvp import (
    REDUCTIONS,
    Reduction,
    ce_hessian_matmat,
    cross_entropy_row_weights,
)
from torchcurv.losses.base import OutputCurvature
from torchcurv.losses.layout import sample_layout


def criterion_row_weights(
    criterion: nn.CrossEntropyLoss, output: torch.Tensor, target: torch.Tensor,
    normaliser: float | None = None,
) -> torch.Tensor:
    """Per-sample factors ``w_r`` with ``∇² criterion = blockdiag_r w_r (diag p_r - p_r p_rᵀ)``.

    Class-index targets go through :func:`torchcurv.kernels.cross_entropy_row_weights`
    (the one definition of torch's normalisation); probability targets, which that
    function does not take, are handled here.

    Args:
        criterion: the loss module (its ``weight``, ``ignore_index``, ``label_smoothing``
            and ``reduction`` are honoured).
        output: logits ``(N, C, d1, ...)``, ``(N, C)`` or ``(C,)``.
        target: class indices ``(N, d1, ...)`` / ``(N,)`` / ``()``, or class
            probabilities shaped like ``output``.
        normaliser: the weights in a data set's loss instead of the batch's: the
            summed loss's weights divided by ``normaliser``, the data set's loss-term
            count for a mean (as the criterion counts them), 1 for a sum. That is the
            batch's weights times its share ``w_b / normaliser``, without the batch's own
            count ``w_b``: a few kernels fewer per batch.

    Returns:
        ``(R,)`` factors, rows ordered as ``sample_layout`` orders them (row-major over
        ``(N, d1, ...)``), in float32 for 16-bit outputs (a ``1/N`` share of a long
        sequence has no bf16 representation to spare), else in the output's dtype. All
        zero for a mean over no counted row (torch's loss is NaN there).
    """
    if criterion.reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be 'mean' or 'sum', got {criterion.reduction!r}")
    reduction: Reduction = ("mean" if criterion.reduction == "mean" and normaliser is None
                            else "sum")
    layout = sample_layout(criterion, output)
    dtype = accumulation_dtype(output.dtype)
    eps = float(criterion.label_smoothing)
    class_weight = criterion.weight
    if not target.is_floating_point():
        t = target if target.ndim == 1 else target.reshape(-1)
        if t.numel() != layout.rows:
            raise ValueError(
                f"{t.numel()} class-index targets for {layout.rows} rows of logits "
                f"(logits shape {tuple(output.shape)})"
            )
        rows = cross_entropy_row_weights(
            t, num_classes=layout.width, reduction=reduction,
            ignore_index=criterion.ignore_index, weight=class_weight, label_smoothing=eps,
            dtype=dtype,
        )
        return rows if normaliser is None or normaliser == 1 else rows / normaliser
    if target.shape != output.shape:
        raise ValueError(
            f"probability targets must have the logits' shape {tuple(output.shape)}, "
            f"got {tuple(target.shape)}"
        )
    probs = layout.to_rows(target.to(dtype).unsqueeze(0))[0]
    probs = probs * (1 - eps) + eps / layout.width
    if class_weight is not None:
        coef = probs @ class_weight.to(device=output.device, dtype=dtype)
    else:
        coef = probs.sum(-1)
    # torch divides a mean over probability targets by the row count, class weights or not
    if reduction == "mean":
        return coef / layout.rows
    return coef if normaliser is None or normaliser == 1 else coef / normaliser


class CrossEntropyHessian(OutputCurvature):
    """``∇²_z criterion(z, y)`` for ``nn.CrossEntropyLoss``, times ``scale``.

    Products go through :func:`torchcurv.kernels.ce_hessian_matmat` (backend
    ``"auto"``: the fused Triton kernel on CUDA, eager torch ops elsewhere) on the
    ``(R, C)`` row view.
    """

    def __init__(
        self,
        criterion: nn.CrossEntropyLoss,
        output: torch.Tensor,
        target: torch.Tensor,
        scale: torch.Tensor | float = 1.0,
    ) -> None:
        super().__init__(output.shape)
        self.layout = sample_layout(criterion, output)
        self.logits = self.layout.to_rows(output.detach().unsqueeze(0))[0]
        weights = criterion_row_weights(criterion, output.detach(), target)
        self.weights = weights * (scale.to(weights.dtype) if isinstance(scale, torch.Tensor)
                                  else scale)

    def _matmat(self, U: torch.Tensor) -> torch.Tensor:
        rows = ce_hessian_matmat(self.logits, self.layout.to_rows(U), self.weights)
        return self.layout.from_rows(rows)

    def _dtype(self) -> torch.dtype:
        return self.logits.dtype

    def _device(self) -> torch.device:
        return self.logits.device
