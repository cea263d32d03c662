"""The Hessian of the data set's loss with respect to the selected parameters."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Literal, cast, get_args

import torch
import torch.distributed as dist
from torch import nn

from torchcurv.distributed.reduce import all_reduce_scalar
from torchcurv.objectives import Objective
from torchcurv.operators.curvature import (
    BatchLosses,
    CurvatureOperator,
    accumulation_dtype,
)
from torchcurv.operators.functional import (
    batched_hvp,
    finite_difference_step,
    loss_and_grads,
    norm_of,
    scaled,
    serialised_transforms,
)
from torchcurv.operators.model_guard import preserved

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

Batch = Any

HessianMethod = Literal["autograd", "forward_over_reverse", "finite_difference"]
_METHODS: tuple[HessianMethod, ...] = get_args(HessianMethod)


class HessianOperator(CurvatureOperator):
    """``H = d^2 L / d theta^2`` with ``L`` the loss of the whole data set as one batch.

    ``L = criterion(model(cat X), cat y)``: batches are weighted by their number of loss
    terms for ``reduction="mean"`` and summed for ``"sum"`` (see
    :mod:`torchcurv.objectives`). ``n`` is the number of selected parameter entries.

    ``model``, ``criterion``, ``data``, ``params``, ``param_filter``,
    ``check_deterministic``, ``process_group``, ``distributed``, ``debug_distributed``,
    ``microbatch_size``: as for :class:`~torchcurv.operators.curvature.CurvatureOperator`.

    Args:
        method: how Hessian-vector products are computed.

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
              in float64 and 1e-4 in float32 on well-scaled models. Costs two gradients per
              vector. The only method for models sharded with FSDP2 (``fully_shard``):
              gradients then come from ``loss.backward()`` through FSDP's own
              reduce-scatter, every rank runs as many passes as the rank with the most
              batches (extra passes on the first batch with weight 0), and each rank holds
              full ``(n,)`` vectors (docs/distributed.md).

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

    def __init__(
        self,
        model: nn.Module,
        criterion: nn.Module | Objective,
        data: Iterable[Batch],
        *,
        params: Iterable[torch.Tensor] | None = None,
        param_filter: str | Sequence[str] | None = None,
        method: HessianMethod = "autograd",
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

    def _supports_fsdp(self) -> bool:
        return self.method == "finite_difference"

    def _batch_matmat(self, batch, scale, blocks):
        if self.method == "finite_difference":
            raise AssertionError("finite differences walk the data per vector")  # see _matmat
        return batched_hvp(
            self.model, self.objective, batch, scale, self.param_names, self.params, blocks,
            forward_over_reverse=self.method == "forward_over_reverse",
        )

    def _local_matmat(self, V: torch.Tensor) -> tuple[torch.Tensor, BatchLosses]:
        if self.method == "forward_over_reverse":
            # The whole product, not only its transforms: functional_call swaps the model's
            # parameters in place, which another product of this operator must not see.
            with serialised_transforms():
                return super()._local_matmat(V)
        if self.method != "finite_difference":
            return super()._local_matmat(V)
        if not self.fsdp:
            return self._finite_difference_matmat(V)
        try:
            return self._finite_difference_matmat(V)
        finally:  # no unsharded copy of perturbed values survives an error
            self._reshard()

    # -- finite differences --------------------------------------------------------
    def _full_gradient(self, losses: BatchLosses) -> list[torch.Tensor]:
        if self.fsdp:
            return self._fsdp_gradient(losses)
        acc = accumulation_dtype(self.dtype)
        total = [torch.zeros_like(p, dtype=acc) for p in self.params]
        for i, batch, scale in self._batches():
            loss, grads = loss_and_grads(self.model, self.objective, batch, scale, self.params)
            losses.add(i, loss)
            for t, g in zip(total, grads):
                t.add_(g)
        return total

    def _fsdp_gradient(self, losses: BatchLosses) -> list[torch.Tensor]:
        """The full gradient of the data set's loss on every rank, through FSDP2.

        ``backward()`` (FSDP's hooks run on it, not on ``autograd.grad``) with the loss
        scaled by the world size, since FSDP's reduce-scatter averages over the ranks.
        Ranks with fewer batches run extra passes with weight 0 so that every rank joins
        the same number of FSDP collectives.
        """
        world = dist.get_world_size(self.process_group)
        self._reshard()
        for p in self.params:
            p.grad = None
        first = None
        count = 0
        with torch.enable_grad():
            for i, batch, scale in self._batches():
                first = batch if first is None else first
                loss = self.objective(self.model, batch)
                scaled(loss, scale * world).backward()
                losses.add(i, loss)
                count += 1
            for _ in range(max(self.batch_counts) - count):
                scaled(self.objective(self.model, first), 0.0).backward()
        # FSDP2's parameters, and so their gradients, are DTensors
        grads = [torch.zeros(p.shape, dtype=p.dtype, device=self.device) if p.grad is None
                 else cast("DTensor", p.grad).full_tensor() for p in self.params]
        for p in self.params:
            p.grad = None
        return grads

    def _reshard(self) -> None:
        """Drop FSDP's unsharded copies of the parameters.

        FSDP2 keeps the root module's parameters unsharded after a forward (e.g. the
        no-grad loss check at construction, or the caller's own); the next forward would
        reuse them and miss the in-place perturbation of the sharded parameters.
        """
        from torch.distributed.fsdp import FSDPModule

        for module in self.model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    def _as_param(self, piece: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        """``piece`` (full, parameter-shaped) laid out like ``param`` (a DTensor shard)."""
        if not self.fsdp:
            return piece
        from torch.distributed.tensor import distribute_tensor

        shard = cast("DTensor", param)
        # src_data_rank=None: every rank cuts its shard from its own (identical) copy.
        return distribute_tensor(piece, shard.device_mesh, shard.placements,
                                 src_data_rank=None)

    def _norm(self, tensors: list[torch.Tensor]) -> float:
        if not self.fsdp:
            return norm_of(tensors)
        local = float(sum((cast("DTensor", t).to_local().double() ** 2).sum() for t in tensors))
        return all_reduce_scalar(local, self.device, self.process_group) ** 0.5

    def _finite_difference_matmat(self, V: torch.Tensor) -> tuple[torch.Tensor, BatchLosses]:
        columns, losses = [], BatchLosses()
        with preserved(self.model, self.params):
            origin = [p.detach().clone() for p in self.params]
            theta_norm = self._norm(origin)
            for j in range(V.shape[1]):
                v = V[:, j]
                h = finite_difference_step(self.dtype, theta_norm, float(v.norm()))
                pieces = self.unflatten(v.contiguous())
                sides = []
                for sign in (1.0, -1.0):
                    with torch.no_grad():
                        for p, o, d in zip(self.params, origin, pieces):
                            p.copy_(o + (sign * h) * self._as_param(d, p))
                    sides.append(self.flatten(self._full_gradient(losses)))
                columns.append((sides[0] - sides[1]) / (2 * h))
        return torch.stack(columns, dim=1), losses
