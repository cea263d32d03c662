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

from torchcurv.losses.base import OutputCurvature
from torchcurv.losses.layout import sample_layout

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def ce_hessian_matmat(
    logits: torch.Tensor, U: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """``weights[n] * (diag(p_n) - p_n p_nᵀ) @ U[..., n, :]`` for every row ``n``.

    Args:
        logits: ``(N, V)`` logits, one sample per row; ``p = softmax(logits, -1)``.
        U: ``(m, N, V)`` block or one ``(N, V)`` vector in the logits' space.
        weights: ``(N,)`` per-row factors (class weights, 0 for ignored targets, the
            reduction's normaliser and any batch share), in any float dtype.

    Returns:
        A tensor of ``U``'s shape and dtype. Half-precision inputs are computed in float32.
    """
    work = torch.float32 if logits.dtype in _LOW_PRECISION else logits.dtype
    p = torch.softmax(logits.to(work), dim=-1)
    u = U.to(work)
    pu = (p * u).sum(-1, keepdim=True)
    return (p * (u - pu) * weights.to(work).unsqueeze(-1)).to(U.dtype)


def cross_entropy_row_weights(
    criterion: nn.CrossEntropyLoss, output: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """Per-sample factors ``w_r`` with ``∇² criterion = blockdiag_r w_r (diag p_r - p_r p_rᵀ)``.

    Args:
        criterion: the loss module (its ``weight``, ``ignore_index``, ``label_smoothing``
            and ``reduction`` are honoured).
        output: logits ``(N, C, d1, ...)``, ``(N, C)`` or ``(C,)``.
        target: class indices ``(N, d1, ...)`` / ``(N,)`` / ``()``, or class
            probabilities shaped like ``output``.

    Returns:
        ``(R,)`` factors in the output's dtype, rows ordered as ``sample_layout`` orders
        them (row-major over ``(N, d1, ...)``).
    """
    layout = sample_layout(criterion, output)
    num_classes = layout.width
    eps = float(criterion.label_smoothing)
    class_weight = criterion.weight
    if class_weight is not None:
        class_weight = class_weight.to(device=output.device, dtype=output.dtype)
    if target.is_floating_point():
        if target.shape != output.shape:
            raise ValueError(
                f"probability targets must have the logits' shape {tuple(output.shape)}, "
                f"got {tuple(target.shape)}"
            )
        probs = layout.to_rows(target.to(output.dtype).unsqueeze(0))[0]
        probs = probs * (1 - eps) + eps / num_classes
        coef = probs @ class_weight if class_weight is not None else probs.sum(-1)
        denominator = torch.tensor(float(layout.rows), dtype=output.dtype,
                                   device=output.device)
    else:
        t = target.reshape(-1)
        if t.numel() != layout.rows:
            raise ValueError(
                f"{t.numel()} class-index targets for {layout.rows} rows of logits "
                f"(logits shape {tuple(output.shape)})"
            )
        keep = t != criterion.ignore_index
        safe = torch.where(keep, t, torch.zeros_like(t))
        if class_weight is None:
            target_weight = keep.to(output.dtype)
            smooth = keep.to(output.dtype)
        else:
            target_weight = class_weight[safe] * keep
            # smoothing spreads eps over all classes: (eps / C) * sum_c weight_c
            smooth = class_weight.mean() * keep
        coef = (1 - eps) * target_weight + eps * smooth
        denominator = target_weight.sum()
    if criterion.reduction == "mean":
        return coef / denominator
    if criterion.reduction == "sum":
        return coef
    raise ValueError(f"reduction must be 'mean' or 'sum', got {criterion.reduction!r}")


class CrossEntropyHessian(OutputCurvature):
    """``∇²_z criterion(z, y)`` for ``nn.CrossEntropyLoss``, times ``scale``.

    Products go through :func:`ce_hessian_matmat` on the ``(R, C)`` row view.
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
        self.weights = cross_entropy_row_weights(criterion, output.detach(), target) * scale

    def _matmat(self, U: torch.Tensor) -> torch.Tensor:
        rows = ce_hessian_matmat(self.logits, self.layout.to_rows(U), self.weights)
        return self.layout.from_rows(rows)

    def _dtype(self) -> torch.dtype:
        return self.logits.dtype

    def _device(self) -> torch.device:
        return self.logits.device
