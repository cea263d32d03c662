"""Output-space factors of the empirical and Monte-Carlo Fisher.

Both are sums over samples ``r`` of outer products ``g gᵀ`` (see
:class:`~torchcurv.losses.base.SampleOuterProducts`). With the data set's loss written
``L = c sum_r s_r`` (``s_r`` the loss terms of sample ``r``; ``c = 1 / (number of loss
terms)`` for ``"mean"``, ``1`` for ``"sum"``):

- empirical Fisher: ``c sum_r ∇s_r ∇s_rᵀ`` (curvlinops' ``EFLinearOperator``);
- Monte-Carlo Fisher: ``c sum_r Jᵀ E[g gᵀ] J`` with ``g`` the gradient of the negative
  log-likelihood for a label drawn from the model's predictive distribution, scaled so
  that ``E[g gᵀ]`` equals the sample's loss Hessian. Its expectation is the GGN.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from torchcurv.dtypes import device_scalar
from torchcurv.losses.base import SampleOuterProducts
from torchcurv.losses.cross_entropy import criterion_row_weights
from torchcurv.losses.elementwise import bce_with_logits_curvature_weights
from torchcurv.losses.layout import sample_layout
from torchcurv.objectives import Objective

Batch = Any

SAMPLEABLE = (nn.CrossEntropyLoss, nn.MSELoss, nn.BCEWithLogitsLoss)


def _as_scale(scale: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    return device_scalar(scale, like.dtype, like.device)


def _drawable(prob: torch.Tensor, fill: float) -> torch.Tensor:
    """``prob`` with NaN (from a NaN/inf model output) replaced by ``fill``, so that torch's
    samplers do not fail on it (a device-side assert on CUDA). The batch's loss is then NaN
    too, and the operator raises :class:`~torchcurv.NonFiniteLossError` naming the batch;
    finite probabilities are untouched, so the draws are the same as without this."""
    return prob.nan_to_num(nan=fill)


def empirical_fisher_factors(
    objective: Objective,
    output: torch.Tensor,
    batch: Batch,
    factor: torch.Tensor | float,
) -> tuple[torch.Tensor, SampleOuterProducts]:
    """The batch loss and ``factor * sum_r g_r g_rᵀ`` with ``g = ∇_f loss_b``.

    For ``"mean"``, ``loss_b = (sum_r s_r) / w_b`` (``w_b`` the batch's number of loss
    terms), so ``w_b g_r = ∇s_r``; with the batch's share ``scale = w_b / W``, the factor
    ``scale * w_b`` gives the batch's part of ``(1/W) sum_r ∇s_r ∇s_rᵀ``. For ``"sum"``
    the factor is ``scale = 1``.
    """
    point = output.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = objective.loss(point, batch)
        (grad,) = torch.autograd.grad(loss, point, allow_unused=True)
    if grad is None:
        grad = torch.zeros_like(point)
    layout = sample_layout(objective.criterion, output)
    root = torch.sqrt(_as_scale(factor, grad))
    return loss.detach(), SampleOuterProducts(layout, layout.to_rows(grad[None]) * root)


def monte_carlo_fisher_factors(
    criterion: nn.Module,
    output: torch.Tensor,
    target: Any,
    scale: torch.Tensor | float,
    mc_samples: int,
    generator: torch.Generator,
    normaliser: float | None = None,
) -> SampleOuterProducts:
    """``scale`` times a ``mc_samples``-draw estimate of ``∇²_f criterion(f, target)``.

    Labels are drawn per sample from the predictive distribution the criterion is the
    negative log-likelihood of: categorical ``softmax(f)`` (CE), Bernoulli ``σ(f)`` per
    entry (BCE), Gaussian ``N(f, I/2)`` (MSE, whose loss is ``|f - y|²``). Draws use
    ``generator`` in the same order and calls as curvlinops' ``FisherMCLinearOperator``.
    Each gradient is multiplied by the square root of the loss Hessian's per-sample
    factor (class weights, ``ignore_index``, ``pos_weight``, the reduction's normaliser),
    so the estimate's expectation is exactly the loss Hessian.

    For the cross-entropy, ``normaliser`` (see
    :func:`~torchcurv.losses.cross_entropy.criterion_row_weights`) gives the rows' weights
    in the data set's loss directly, for a caller whose ``scale`` is the batch's share
    ``w_b / normaliser`` with ``w_b`` the criterion's own count of the batch's loss
    terms (1 for a sum); ``scale`` is then not used.
    """
    if output.requires_grad:
        output = output.detach()
    layout = sample_layout(criterion, output)
    f = layout.rows_of(output)  # (R, K)
    if isinstance(criterion, nn.CrossEntropyLoss):
        prob = torch.softmax(f, dim=1)
        drawn = _drawable(prob, 1 / layout.width).multinomial(
            mc_samples, replacement=True, generator=generator)  # (R, S)
        if normaliser is None:
            row = criterion_row_weights(criterion, output, target)
            row = (row if row.dtype == f.dtype else row.to(f.dtype)) * _as_scale(scale, f)
        else:
            row = criterion_row_weights(criterion, output, target, normaliser)
            row = row if row.dtype == f.dtype else row.to(f.dtype)
        # one draw needs no copy: `prob` has no other use once drawn from
        g = prob.unsqueeze(0) if mc_samples == 1 else prob.unsqueeze(0).repeat(
            mc_samples, 1, 1)
        labels = drawn.unsqueeze(0) if mc_samples == 1 else drawn.T.unsqueeze(2)  # (S, R, 1)
        # p - e_label with the 1 subtracted by a scatter (the same floats): one_hot
        # would check the labels' range on the host, a sync per batch, and build an
        # int64 (S, R, K) tensor
        g.scatter_add_(2, labels, g.new_full(labels.shape, -1.0))
        # only class weights or probability targets can make a row's weight negative
        if criterion.weight is not None or target.is_floating_point():
            row = row.clamp_min(0)
        g.mul_(row.sqrt().view(1, -1, 1))
    elif isinstance(criterion, nn.BCEWithLogitsLoss):
        scale_t = _as_scale(scale, f)
        prob = f.sigmoid()
        draws = _drawable(prob, 0.5).unsqueeze(0).expand(mc_samples, -1, -1).bernoulli(
            generator=generator)
        weights = bce_with_logits_curvature_weights(criterion, output, target) * scale_t
        g = (prob.unsqueeze(0) - draws) * layout.to_rows(weights[None]).clamp_min(0).sqrt()
    elif isinstance(criterion, nn.MSELoss):
        scale_t = _as_scale(scale, f)
        # in the output's dtype: a float32 std would round every float64 draw
        std = device_scalar(math.sqrt(0.5), f.dtype, f.device)
        mean = torch.zeros(mc_samples, *f.shape, device=f.device, dtype=f.dtype)
        normaliser = output.numel() if criterion.reduction == "mean" else 1
        g = 2 * torch.normal(mean, std, generator=generator) * (scale_t / normaliser).sqrt()
    else:
        raise TypeError(
            f"no predictive distribution is known for {type(criterion).__name__}; the "
            f"Monte-Carlo Fisher supports {[c.__name__ for c in SAMPLEABLE]}"
        )
    return SampleOuterProducts(layout, g)
