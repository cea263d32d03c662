"""The Hessian of the data set's loss with respect to the selected parameters."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from torchcurv.derivatives import strategy_for
from torchcurv.derivatives.hessian import HessianMethod, HessianStrategy
from torchcurv.objectives import Objective
from torchcurv.operators.config import CurvatureConfig, HessianConfig
from torchcurv.operators.curvature import BatchLosses, CurvatureOperator

Batch = Any


class HessianOperator(CurvatureOperator):
    """``H = d^2 L / d theta^2`` with ``L`` the loss of the whole data set as one batch.

    ``L = criterion(model(cat X), cat y)``: batches are weighted by their number of loss
    terms for ``reduction="mean"`` and summed for ``"sum"`` (see
    :mod:`torchcurv.objectives`). ``n`` is the number of selected parameter entries.

    Takes ``model, criterion, data`` and the keywords of
    :class:`~torchcurv.operators.config.CurvatureConfig`, and:

    Args:
        method: how Hessian-vector products are computed (the strategies of
            :mod:`torchcurv.derivatives.hessian`).

            - ``"autograd"`` (default): exact double backward, for every op autograd
              differentiates twice. A block of ``m`` vectors shares one forward and one
              first backward per batch; the ``m`` second backwards run batched
              (``is_grads_batched``).
            - ``"forward_over_reverse"``: exact ``torch.func.jvp`` of ``torch.func.grad``,
              vmapped over the block. Needs forward-mode AD for the model's ops (missing for
              SiLU's backward in torch 2.13, for example); ``HuberLoss`` and
              ``SoftMarginLoss``, whose fused backwards have none, are evaluated from
              elementary ops with the same derivatives. Products run one at a time
              process-wide (``torch.func`` is not thread-safe).
            - ``"finite_difference"``: central differences of gradients,
              ``(g(theta + h v) - g(theta - h v)) / 2h`` with
              ``h = eps^(1/3) (1 + ||theta||) / ||v||``
              (:func:`~torchcurv.operators.functional.finite_difference_step`); for setups
              where double backward is impossible. Bias is ``O(h^2)``: about 1e-10 relative
              in float64 and 1e-4 in float32 on well-scaled models; on bfloat16/float16
              parameters the rounded perturbation can make it far larger (order 1 on a
              small LLaMA, ``benchmarks/product_accuracy.py``), and construction warns.
              Costs two gradients per vector. The only method for models sharded with
              FSDP2 (``fully_shard``): gradients then come from ``loss.backward()``
              through FSDP's own reduce-scatter, every rank runs as many passes as the
              rank with the most batches (extra passes on the first batch with weight 0),
              and each rank holds full ``(n,)`` vectors (docs/distributed.md).

    Example:
        A linear model ``f(x) = w·x + b`` under ``MSELoss`` over ``N`` examples has
        ``L = 1/N sum_i (w·x_i + b - y_i)^2``, so ``H = 2/N X₁ᵀ X₁`` with ``X₁`` the
        inputs and a column of ones (rows ordered as the parameters: ``w``, then
        ``b``), however the data is batched:

        >>> import torch, torchcurv
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> X, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
        >>> model = nn.Linear(3, 1).double()
        >>> H = torchcurv.HessianOperator(model, nn.MSELoss(), [(X[:5], y[:5]), (X[5:], y[5:])])
        >>> X1 = torch.cat([X, torch.ones(8, 1, dtype=torch.float64)], dim=1)
        >>> torch.allclose(H.to_dense(), 2 / 8 * X1.T @ X1)
        True
    """

    config_type = HessianConfig
    derivative: HessianStrategy

    def __init__(
        self,
        model: nn.Module,
        criterion: nn.Module | Objective,
        data: Iterable[Batch],
        *,
        method: HessianMethod = "autograd",
        # Any rather than Unpack[CurvatureOptions]: mypy 2.4 fails to join the Unpack
        # constructors of HessianOperator and GGNOperator (an inferred dict of the two)
        **options: Any,
    ) -> None:
        self._build(HessianConfig.of(type(self).__name__, model, criterion, data,
                                     method=method, **options))

    def _build(self, config: CurvatureConfig) -> None:
        assert isinstance(config, HessianConfig)
        self.derivative = strategy_for("method", config.method, compile=config.compile)
        self.method = config.method
        super()._build(config)

    def _local_matmat(self, V: torch.Tensor) -> tuple[torch.Tensor, BatchLosses]:
        return self.derivative.local_matmat(self, V)
