"""How a curvature operator's work is spread over processes: one object, picked once.

:func:`sharding_for` looks at the model and the ``process_group`` / ``distributed``
arguments at construction and returns one of

- :class:`Local`: one process; a product is this process's sum over its batches;
- :class:`DataParallel`: each rank holds a shard of the data (plain model or
  ``DistributedDataParallel``); a product is the sum of the ranks' products, taken with
  one all-reduce after the product's checkpoint (:mod:`torchcurv.distributed.reduce`);
- :class:`FullyShardedDataParallel`: the model is sharded with FSDP2 (``fully_shard``);
  gradients come from ``loss.backward()`` through FSDP's own reduce-scatter (already
  summed over the ranks, so only the checkpoint travels), and the perturbations of the
  finite-difference Hessian are laid out as the parameters' DTensor shards.

The operators ask the sharding instead of branching on ``distributed`` / ``fsdp``; the
checkpoint and failure protocol is :mod:`torchcurv.distributed.reduce`'s, unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, cast

import torch
import torch.distributed as dist
from torch import nn

from torchcurv.distributed.reduce import (
    all_reduce_min,
    all_reduce_scalar,
    all_reduce_sum,
    assert_same_on_all_ranks,
    checkpoint,
    failures_reported,
    is_distributed,
    parameter_agreement,
    rank_counts,
)
from torchcurv.errors import NonFiniteLossError
from torchcurv.operators.functional import loss_and_grads, norm_of, scaled

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

    from torchcurv.derivatives.base import Strategy
    from torchcurv.operators.base import FiniteCheck
    from torchcurv.operators.curvature import BatchLosses, CurvatureOperator

LocalProduct = Callable[[torch.Tensor], "tuple[torch.Tensor, BatchLosses]"]


class Sharding:
    """Where the data and the parameters live, and how a product is summed over them.

    Attributes:
        process_group: the ranks whose data shards make up the data set (``None``: the
            default group, or no group when local).
        distributed: whether products are sums over ranks (``False`` for :class:`Local`).
        fsdp: whether the parameters are FSDP2 shards (DTensors).
    """

    name: ClassVar[str]
    distributed: ClassVar[bool] = True
    fsdp: ClassVar[bool] = False

    def __init__(self, process_group: Any = None) -> None:
        self.process_group = process_group

    # -- construction ----------------------------------------------------------------
    def stage(self, device: torch.device | None) -> contextlib.AbstractContextManager[None]:
        """Report a failure of this rank's local work to the other ranks."""
        return failures_reported(device, self.process_group, active=self.distributed)

    def checkpoint(self, device: torch.device, what: str) -> None:
        """Join a checkpoint that ends a construction stage (no-op when local)."""
        checkpoint(device, self.process_group, what=what)

    def rank(self) -> int:
        return dist.get_rank(self.process_group)

    def check_parameters(self, kind: str, names: list[str], params: Sequence[torch.Tensor]
                         ) -> None:
        """Every rank selected the same parameters (and, unsharded, holds the same values)."""
        parameter_agreement(kind, names, params, compare_values=not self.fsdp,
                            group=self.process_group)

    def check_microbatching(self) -> None:
        """Raise if ``microbatch_size`` cannot work with this sharding."""

    def check_derivative(self, owner: str, strategy: Strategy | None) -> None:
        """Raise if ``owner``'s products (by ``strategy``; ``None``: not derivatives of
        the model) cannot run on this sharding."""

    def data_set(self, local_weight: float, batches: int, device: torch.device
                 ) -> tuple[float, list[int], int]:
        """The data set's loss-term count, the batches per rank and this rank's offset,
        from this rank's ``local_weight`` and ``batches`` (one collective each)."""
        total = all_reduce_scalar(local_weight, device, self.process_group)
        counts = rank_counts(batches, device, self.process_group)
        if sum(counts) == 0:
            raise ValueError("data is empty on every rank: no batch anywhere")
        return total, counts, sum(counts[:self.rank()])

    def agree_min(self, value: int, device: torch.device) -> int:
        """The smallest of the ranks' ``value`` (one collective): a choice every rank
        must make alike, as the sub-blocks a budgeted block is split into."""
        return all_reduce_min(value, device, self.process_group)

    # -- products --------------------------------------------------------------------
    def matmat(self, local: LocalProduct, V: torch.Tensor, device: torch.device,
               debug: bool, inputs: FiniteCheck | None = None) -> torch.Tensor:
        """``A @ V`` from ``local(V)`` (this rank's share and the losses it saw), in the
        accumulation dtype, the same on every rank; ``inputs``, the NaN/inf check of
        ``V``, is read back with the losses and raises first.

        Whatever this rank raises (``BaseException``), it joins the product's checkpoint
        with a failure flag, so the others raise too and the next product pairs up.
        """
        if debug:
            assert_same_on_all_ranks(V, self.process_group)
        with self.stage(device):
            out, losses = local(V)
            bad = losses.nonfinite_batches(inputs)
        reached = checkpoint(device, self.process_group, nonfinite=len(bad),
                             what="this curvature product")
        if reached.nonfinite:
            losses.raise_if_not_finite()
            raise NonFiniteLossError(
                f"the loss is not finite on {reached.nonfinite} batch(es) of other ranks"
            )
        return self.combine(out)

    def combine(self, out: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of each rank's checkpointed share ``out``."""
        return all_reduce_sum(out, self.process_group, checkpointed=True)

    # -- what the finite-difference Hessian needs ------------------------------------
    def add_gradient(self, op: CurvatureOperator, into: Sequence[torch.Tensor],
                     alpha: float, losses: BatchLosses,
                     gradient: Callable[[Any, Any], tuple[torch.Tensor, list[torch.Tensor]]]
                     | None = None) -> None:
        """``into += alpha * grad L`` (parameter-shaped ``into``), this rank's batches'
        share; one pass over the data, each batch's loss added to ``losses``.
        ``gradient(batch, scale)``: the batch's loss and gradients, in place of
        :func:`~torchcurv.operators.functional.loss_and_grads` (a compiled kernel)."""
        with torch.no_grad():
            for i, batch, scale in op._batches():
                loss, grads = (loss_and_grads(op.model, op.objective, batch, scale, op.params)
                               if gradient is None else gradient(batch, scale))
                losses.add(i, loss)
                for t, g in zip(into, grads):
                    t.add_(g, alpha=alpha)

    def layout(self, piece: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        """``piece`` (full, parameter-shaped) laid out like ``param``."""
        return piece

    def norm(self, tensors: Sequence[torch.Tensor], device: torch.device) -> float:
        """The 2-norm of parameter-shaped ``tensors`` (laid out as the parameters)."""
        return norm_of(tensors)

    @contextlib.contextmanager
    def perturbing(self, model: nn.Module) -> Iterator[None]:
        """The block in which parameters are perturbed in place."""
        yield

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Local(Sharding):
    """One process: no collective anywhere."""

    name = "local"
    distributed = False

    def stage(self, device: torch.device | None) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def checkpoint(self, device: torch.device, what: str) -> None:
        return None

    def rank(self) -> int:
        return 0

    def check_parameters(self, kind: str, names: list[str], params: Sequence[torch.Tensor]
                         ) -> None:
        return None

    def data_set(self, local_weight: float, batches: int, device: torch.device
                 ) -> tuple[float, list[int], int]:
        return local_weight, [batches], 0

    def agree_min(self, value: int, device: torch.device) -> int:
        return value

    def matmat(self, local: LocalProduct, V: torch.Tensor, device: torch.device,
               debug: bool, inputs: FiniteCheck | None = None) -> torch.Tensor:
        out, losses = local(V)
        losses.raise_if_not_finite(inputs)
        return out


class DataParallel(Sharding):
    """Data shards on the ranks, the whole model on each: one all-reduce per product."""

    name = "ddp"


class FullyShardedDataParallel(Sharding):
    """An FSDP2 model (``fully_shard`` over one 1-D mesh): gradients through FSDP.

    Only derivative strategies that need nothing but gradients work here (the
    finite-difference Hessian): double backward and forward-mode AD do not pass
    through ``fully_shard``.
    """

    name = "fsdp2"
    fsdp = True

    def check_derivative(self, owner: str, strategy: Strategy | None) -> None:
        if strategy is None or not strategy.supports_fsdp:
            raise TypeError(
                f"{owner} does not support FSDP2-sharded models (double backward and "
                "forward-mode AD do not pass through fully_shard); use "
                "HessianOperator(..., method='finite_difference'), which needs only "
                "gradients"
            )
        if strategy.compile:
            raise TypeError(
                f"{owner}(compile=True) does not support FSDP2-sharded models: its "
                "gradients come from loss.backward() through FSDP's hooks, not from a "
                "compiled torch.func.grad; use compile=False"
            )

    def check_microbatching(self) -> None:
        raise ValueError(
            "microbatch_size is not supported for FSDP2-sharded models: every rank must "
            "join the same number of FSDP passes, which microbatches of unequal "
            "batches would break; split the batches in the data loader instead"
        )

    def data_set(self, local_weight: float, batches: int, device: torch.device
                 ) -> tuple[float, list[int], int]:
        total, counts, offset = super().data_set(local_weight, batches, device)
        if min(counts) == 0:
            raise ValueError(
                f"batches per rank are {counts}: with an FSDP2 model every rank needs at "
                "least one batch (its forward and backward passes are collectives)"
            )
        return total, counts, offset

    def combine(self, out: torch.Tensor) -> torch.Tensor:
        return out  # FSDP's reduce-scatter has already summed the ranks' gradients

    def add_gradient(self, op: CurvatureOperator, into: Sequence[torch.Tensor],
                     alpha: float, losses: BatchLosses, gradient: Any = None) -> None:
        """Through FSDP2: ``backward()`` (FSDP's hooks run on it, not on
        ``autograd.grad``) with the loss scaled by the world size, since FSDP's
        reduce-scatter averages over the ranks. Ranks with fewer batches run extra
        passes with weight 0 so that every rank joins the same number of FSDP
        collectives. A rank failing inside FSDP's own collectives cannot flag it: the
        others then raise when the process group's timeout expires. Never compiled
        (``gradient`` is ``None``: :meth:`check_derivative` refuses ``compile=True``)."""
        world = dist.get_world_size(self.process_group)
        _reshard(op.model)
        for p in op.params:
            p.grad = None
        first = None
        count = 0
        with torch.enable_grad():
            for i, batch, scale in op._batches():
                first = batch if first is None else first
                loss = op.objective(op.model, batch)
                scaled(loss, scale * world).backward()
                losses.add(i, loss)
                count += 1
            for _ in range(max(op.batch_counts) - count):
                scaled(op.objective(op.model, first), 0.0).backward()
        with torch.no_grad():
            for t, p in zip(into, op.params):
                if p.grad is not None:  # FSDP2's gradients are DTensors
                    t.add_(cast("DTensor", p.grad).full_tensor(), alpha=alpha)
                p.grad = None

    def layout(self, piece: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        from torch.distributed.tensor import distribute_tensor

        shard = cast("DTensor", param)
        # src_data_rank=None: every rank cuts its shard from its own (identical) copy.
        return distribute_tensor(piece, shard.device_mesh, shard.placements,
                                 src_data_rank=None)

    def norm(self, tensors: Sequence[torch.Tensor], device: torch.device) -> float:
        local = float(sum((cast("DTensor", t).to_local().double() ** 2).sum() for t in tensors))
        return all_reduce_scalar(local, device, self.process_group) ** 0.5

    @contextlib.contextmanager
    def perturbing(self, model: nn.Module) -> Iterator[None]:
        _reshard(model)
        try:
            yield
        finally:  # no unsharded copy of perturbed values survives, also on errors
            _reshard(model)


def _reshard(model: nn.Module) -> None:
    """Drop FSDP's unsharded copies of the parameters.

    FSDP2 keeps the root module's parameters unsharded after a forward (e.g. the no-grad
    loss check at construction, or the caller's own); the next forward would reuse them
    and miss the in-place perturbation of the sharded parameters.
    """
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def sharding_for(model: nn.Module, process_group: Any = None, distributed: bool | None = None
                 ) -> tuple[nn.Module, Sharding]:
    """The module products run on and the sharding of an operator built on ``model``.

    A ``DistributedDataParallel`` model is unwrapped (its forward prepares its reducer and
    gradient hooks, which must neither fire nor double-count here) and brings its
    process group; an FSDP2 model brings its mesh's group and is always distributed.
    ``distributed=None`` means: distributed when the group has more than one rank.
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        process_group = process_group if process_group is not None else model.process_group
        distributed = True if distributed is None else distributed
        model = model.module
    fsdp_group = _fsdp_group(model)
    if fsdp_group is not None:
        process_group = process_group if process_group is not None else fsdp_group
        if distributed is False:
            raise ValueError(
                "the model is sharded with FSDP2 (its parameters are DTensors), so its "
                "products need every rank: distributed=False is not possible"
            )
        distributed = True
    wanted = is_distributed(process_group) if distributed is None else bool(distributed)
    if wanted and not is_distributed(process_group):
        raise RuntimeError(
            "distributed=True needs torch.distributed initialised with more than one rank"
        )
    if fsdp_group is not None:
        return model, FullyShardedDataParallel(process_group)
    if wanted:
        return model, DataParallel(process_group)
    return model, Local(process_group)


def _fsdp_group(model: nn.Module) -> Any:
    """The process group an FSDP2 (``fully_shard``) model is sharded over, else ``None``."""
    if not dist.is_available():
        return None
    from torch.distributed.tensor import DTensor

    meshes = {id(p.device_mesh): p.device_mesh for p in model.parameters()
              if isinstance(p, DTensor)}
    if not meshes:
        return None
    if len(meshes) > 1 or next(iter(meshes.values())).ndim != 1:
        raise ValueError(
            "torchcurv supports FSDP2 models sharded over one 1-D device mesh (not HSDP or "
            "tensor parallelism)"
        )
    return next(iter(meshes.values())).get_group()
