"""The Hessian of the data set's loss with respect to the selected parameters."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from torchcurv.objectives import Objective
from torchcurv.operators.curvature import (
    BatchLosses,
    CurvatureOperator,
    accumulation_dtype,
)
from torchcurv.operators.functional import batched_hvp, loss_and_grads
from torchcurv.operators.model_guard import preserved

Batch = Any

_METHODS = ("autograd", "forward_over_reverse", "finite_difference")


class HessianOperator(CurvatureOperator):
    """``H = d^2 L / d theta^2`` with ``L`` the loss of the whole data set as one batch.

    ``L = criterion(model(cat X), cat y)``: batches are weighted by their number of loss
    terms for ``reduction="mean"`` and summed for ``"sum"`` (see
    :mod:`torchcurv.objectives`). ``n`` is the number of selected parameter entries.

    Args:
        model, criterion, data, params, param_filter, check_deterministic,
            process_group, distributed, debug_distributed, microbatch_size: see
            :class:`~torchcurv.operators.curvature.CurvatureOperator`.
        method: how Hessian-vector products are computed.

            - ``"autograd"`` (default): exact double backward, for every op autograd
              differentiates twice. A block of ``m`` vectors shares one forward and one
              first backward per batch; the ``m`` second backwards run batched
              (``is_grads_batched``).
            - ``"forward_over_reverse"``: exact ``torch.func.jvp`` of ``torch.func.grad``,
              vmapped over the block. Needs forward-mode AD for the model's ops (missing for
              SiLU's backward in torch 2.13, for example).
            - ``"finite_difference"``: central differences of gradients,
              ``(g(theta + h v) - g(theta - h v)) / 2h`` with
              ``h = eps^(1/3) (1 + ||theta||) / ||v||``; for setups where double backward is
              impossible. Bias is ``O(h^2)``: about 1e-10 relative in float64 and 1e-4 in
              float32 on well-scaled models. Costs two gradients per vector.
    """

    def __init__(
        self,
        model: nn.Module,
        criterion: nn.Module | Objective,
        data: Iterable[Batch],
        *,
        params: Iterable[torch.Tensor] | None = None,
        param_filter: str | Sequence[str] | None = None,
        method: str = "autograd",
        check_deterministic: bool = True,
        process_group: Any = None,
        distributed: bool | None = None,
        debug_distributed: bool = False,
        microbatch_size: int | None = None,
    ) -> None:
        if method not in _METHODS:
            raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
        self.method = method
        super().__init__(
            model, criterion, data, params=params, param_filter=param_filter,
            check_deterministic=check_deterministic, process_group=process_group,
            distributed=distributed, debug_distributed=debug_distributed,
            microbatch_size=microbatch_size,
        )

    def _perturbed_params(self) -> Sequence[torch.Tensor]:
        return self.params if self.method == "finite_difference" else ()

    def _batch_matmat(self, batch, scale, blocks):
        if self.method == "finite_difference":
            raise AssertionError("finite differences walk the data per vector")  # see _matmat
        return batched_hvp(
            self.model, self.objective, batch, scale, self.param_names, self.params, blocks,
            forward_over_reverse=self.method == "forward_over_reverse",
        )

    def _local_matmat(self, V: torch.Tensor) -> tuple[torch.Tensor, BatchLosses]:
        if self.method != "finite_difference":
            return super()._local_matmat(V)
        return self._finite_difference_matmat(V)

    # -- finite differences --------------------------------------------------------
    def _full_gradient(self, losses: BatchLosses) -> list[torch.Tensor]:
        acc = accumulation_dtype(self.dtype)
        total = [torch.zeros_like(p, dtype=acc) for p in self.params]
        for i, batch, scale in self._batches():
            loss, grads = loss_and_grads(self.model, self.objective, batch, scale, self.params)
            losses.add(i, loss)
            for t, g in zip(total, grads):
                t.add_(g)
        return total

    def _finite_difference_matmat(self, V: torch.Tensor) -> tuple[torch.Tensor, BatchLosses]:
        eps = torch.finfo(self.dtype).eps
        columns, losses = [], BatchLosses()
        with preserved(self.model, self.params):
            origin = [p.detach().clone() for p in self.params]
            theta_norm = float(torch.sqrt(sum((o.double() ** 2).sum() for o in origin)))
            for j in range(V.shape[1]):
                v = V[:, j]
                v_norm = float(v.norm())
                if v_norm == 0:
                    columns.append(torch.zeros_like(v, dtype=accumulation_dtype(v.dtype)))
                    continue
                h = eps ** (1 / 3) * (1 + theta_norm) / v_norm
                pieces = self.unflatten(v.contiguous())
                sides = []
                for sign in (1.0, -1.0):
                    with torch.no_grad():
                        for p, o, d in zip(self.params, origin, pieces):
                            p.copy_(o + (sign * h) * d)
                    sides.append(self.flatten(self._full_gradient(losses)))
                columns.append((sides[0] - sides[1]) / (2 * h))
        return torch.stack(columns, dim=1), losses
