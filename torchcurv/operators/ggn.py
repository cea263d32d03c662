"""The generalised Gauss-Newton matrix of the data set's loss."""

from __future__ import annotations

import torch

from torchcurv.losses.hessians import objective_loss_hessian
from torchcurv.operators.output_space import OutputSpaceOperator


class GGNOperator(OutputSpaceOperator):
    """``G = sum_b Jᵀ_b (scale_b ∇²_f loss_b) J_b``: the Hessian with the model linearised.

    ``J_b`` is the Jacobian of batch ``b``'s output, ``∇²_f loss_b`` the criterion's
    Hessian in the output, ``scale_b`` the batch's share of the data set's loss (as for
    :class:`~torchcurv.HessianOperator`), so ``G`` is the GGN of
    ``criterion(model(cat X), cat y)``. Loss Hessians are closed form for
    ``CrossEntropyLoss`` (class weights, ``ignore_index``, label smoothing, probability
    targets, ``(N, C)`` and ``(N, C, d1, ...)`` logits), ``MSELoss`` and
    ``BCEWithLogitsLoss``; double backward through the loss alone for any other
    criterion or :class:`~torchcurv.Objective`. PSD whenever the loss is convex in the
    output.

    Cost per batch for a block of ``m`` vectors, against one gradient (one forward, one
    backward): one forward that records the graph, ``J V`` (``jvp="forward"``: ``m``
    batched tangent passes, about one forward each; ``"double_vjp"``: one backward with
    ``create_graph`` plus its ``m`` batched backwards; ``"finite_difference"``: ``2 m``
    no-grad forwards), an output-space product, and one batched backward for ``Jᵀ``.
    For ``m = 1`` that is about two gradients' worth with ``"forward"`` and
    ``"finite_difference"``, three with ``"double_vjp"``.

    Arguments: as for :class:`~torchcurv.operators.output_space.OutputSpaceOperator`.

    Example:
        For ``f(x) = tanh(w·x)`` under ``MSELoss`` over ``N`` examples, ``J_i = d_i x_iᵀ``
        with ``d_i = 1 - f(x_i)^2`` and the loss Hessian is ``2/N``, so
        ``G = 2/N sum_i d_i^2 x_i x_iᵀ`` (the Hessian also has a term in ``f - y``):

        >>> import torch, torchcurv
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> X, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
        >>> model = nn.Sequential(nn.Linear(3, 1, bias=False), nn.Tanh()).double()
        >>> G = torchcurv.GGNOperator(model, nn.MSELoss(), [(X, y)])
        >>> d = 1 - model(X).detach() ** 2
        >>> torch.allclose(G.to_dense(), 2 / 8 * X.T @ (d**2 * X))
        True
    """

    def _output_curvature(self, output, batch, scale, generator=None):
        with torch.no_grad():
            loss = self.objective.loss(output, batch)
        return loss, objective_loss_hessian(self.objective, output, batch, scale)
