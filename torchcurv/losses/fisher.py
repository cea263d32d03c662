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
) -> SampleOuterProducts:
    """``scale`` times a ``mc_samples``-draw estimate of ``∇²_f criterion(f, target)``.

    Labels are drawn per sample from the predictive distribution the criterion is the
    negative log-likelihood of: categorical ``softmax(f)`` (CE), Bernoulli ``σ(f)`` per
    entry (BCE), Gaussian ``N(f, I/2)`` (MSE, whose loss is ``|f - y|²``). Draws use
    ``generator`` in the same order and calls as curvlinops' ``FisherMCLinearOperator``.
    Each gradient is multiplied by the square root of the loss Hessian's per-sample
    factor (class weights, ``ignore_index``, ``pos_weight``, the reduction's normaliser),
    so the estimate's expectation is exactly the loss Hessian.
    """
    output = output.detach()
    layout = sample_layout(criterion, output)
    f = layout.to_rows(output[None])[0]  # (R, K)
    scale_t = _as_scale(scale, f)
    if isinstance(criterion, nn.CrossEntropyLoss):
        prob = torch.softmax(f, dim=1)
        labels = _drawable(prob, 1 / layout.width).multinomial(
            mc_samples, replacement=True, generator=generator).T
        row = criterion_row_weights(criterion, output, target)
        row = (row if row.dtype == f.dtype else row.to(f.dtype)) * scale_t
        # one draw needs no copy: `prob` has no other use once drawn from
        g = prob.unsqueeze(0) if mc_samples == 1 else prob.unsqueeze(0).repeat(
            mc_samples, 1, 1)
        # p - e_label with the 1 subtracted by a scatter (the same floats): one_hot
        # would check the labels' range on the host, a sync per batch, and build an
        # int64 (S, R, K) tensor
        g.scatter_add_(2, labels.unsqueeze(2), g.new_full((*labels.shape, 1), -1.0))
        g.mul_(row.clamp_min(0).sqrt()[None, :, None])
    elif isinstance(criterion, nn.BCEWithLogitsLoss):
        prob = f.sigmoid()
        draws = _drawable(prob, 0.5).unsqueeze(0).expand(mc_samples, -1, -1).bernoulli(
            generator=generator)
        weights = bce_with_logits_curvature_weights(criterion, output, target) * scale_t
        g = (prob.unsqueeze(0) - draws) * layout.to_rows(weights[None]).clamp_min(0).sqrt()
    elif isinstance(criterion, nn.MSELoss):
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
