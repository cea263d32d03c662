"""What every model-based curvature operator shares: parameters, data, weighting, safety.

Subclasses implement :meth:`CurvatureOperator._batch_matmat`, the product of one batch's
curvature (already scaled to its share of the data set's loss) with per-parameter blocks.
This class walks the data, sums the batch products, checks the loss for NaN/inf, and
gives the model back untouched.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from torchcurv.data import check_reiterable, fingerprint, iterate
from torchcurv.distributed.reduce import (
    all_reduce_product,
    all_reduce_scalar,
    assert_same_on_all_ranks,
    is_distributed,
    rank_counts,
)
from torchcurv.errors import NondeterminismError, NonFiniteLossError
from torchcurv.objectives import Objective, as_objective
from torchcurv.operators.base import ParameterOperator
from torchcurv.operators.model_guard import preserved
from torchcurv.operators.params import select_parameters

Batch = Any

_RANDOM_IN_TRAIN_MODE = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                         nn.AlphaDropout, nn.FeatureAlphaDropout)


class CurvatureOperator(ParameterOperator):
    """Base of the operators built from ``(model, criterion, data)``.

    Args:
        model: the network; it is never modified (weights, buffers, ``.grad``, modes).
        criterion: a torch loss module (``nn.CrossEntropyLoss()``, ...) applied to batches
            ``(X, y)``, or an :class:`~torchcurv.Objective` for other batch layouts.
        data: a re-iterable of batches (list, ``DataLoader``); not empty.
        params: parameters to differentiate (default: all that require grad).
        param_filter: glob(s) on parameter names selecting a subset.
        check_deterministic: at construction, walk the data twice and evaluate the first
            batch's loss twice; raise :class:`~torchcurv.NondeterminismError` if they
            differ (shuffling loader, random augmentation, dropout). Also refuse models
            with active dropout.
        process_group: the ranks whose data shards make up the data set (default: the
            default group when ``torch.distributed`` is initialised with more than one
            rank; a ``DistributedDataParallel`` model brings its own). Each product is the
            sum over ranks, taken with one all-reduce; every rank gets the same result.
        distributed: ``None`` (auto, as above), ``True`` or ``False`` (stay local even
            under torchrun).
        debug_distributed: check on every product that all ranks multiply the same
            vectors (one extra small all-reduce).

    Vectors are always the full ``(n,)`` / ``(n, m)`` vectors over all selected
    parameters, identical on every rank, also for a model sharded with FSDP2
    (``torch.distributed.fsdp.fully_shard``: ``n`` counts the unsharded parameters);
    only :class:`~torchcurv.HessianOperator` with ``method="finite_difference"``
    supports FSDP2 models (docs/distributed.md).

    Attributes:
        batch_counts: number of batches on each rank of the group (``[len(data)]`` when
            local), known after construction.
        batch_offset: number of batches on lower ranks: this rank's batch ``i`` is batch
            ``batch_offset + i`` of the data set (the ranks' shards in rank order).
    """

    def __init__(
        self,
        model: nn.Module,
        criterion: nn.Module | Objective,
        data: Iterable[Batch],
        *,
        params: Iterable[torch.Tensor] | None = None,
        param_filter: str | Sequence[str] | None = None,
        check_deterministic: bool = True,
        process_group: Any = None,
        distributed: bool | None = None,
        debug_distributed: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if isinstance(model, nn.parallel.DistributedDataParallel):
            # Products run on the wrapped module: DDP's forward prepares its reducer and
            # gradient hooks, which must neither fire nor double-count here.
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
        self.fsdp = fsdp_group is not None
        self.process_group = process_group
        self.distributed = (
            is_distributed(process_group) if distributed is None else bool(distributed)
        )
        if self.distributed and not is_distributed(process_group):
            raise RuntimeError(
                "distributed=True needs torch.distributed initialised with more than one rank"
            )
        self.debug_distributed = debug_distributed
        self.model = model
        self.objective = as_objective(criterion)
        self.param_names, self.params = select_parameters(model, params, param_filter)
        if self.fsdp and not self._supports_fsdp():
            raise TypeError(
                f"{type(self).__name__} does not support FSDP2-sharded models (double "
                "backward and forward-mode AD do not pass through fully_shard); use "
                "HessianOperator(..., method='finite_difference'), which needs only "
                "gradients"
            )
        super().__init__(self.params)
        check_reiterable(data)
        self.data = data
        self._check_model_mode(strict=check_deterministic)
        self._batch_weights: list[float] | None = None
        self.total_weight = self._total_weight(check_deterministic)

    # -- construction-time checks --------------------------------------------------
    def _check_model_mode(self, strict: bool) -> None:
        for name, m in self.model.named_modules():
            if not m.training:
                continue
            if isinstance(m, _RANDOM_IN_TRAIN_MODE) and m.p > 0 and strict:
                raise NondeterminismError(
                    f"module '{name}' ({type(m).__name__}, p={m.p}) is in train mode, so the "
                    "operator would be random; call model.eval() first (or pass "
                    "check_deterministic=False to accept a random operator)"
                )
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                warnings.warn(
                    f"module '{name}' (BatchNorm) is in train mode: the operator is the "
                    "curvature of the train-mode loss with per-batch statistics and changes "
                    "with the batching; call model.eval() for the usual curvature",
                    stacklevel=3,
                )

    def _total_weight(self, check: bool) -> float:
        weights, prints = [], []
        for batch in iterate(self.data, self.device):
            weights.append(self.objective.batch_weight(batch))
            if check:
                prints.append(fingerprint(batch))
        if not weights and not self.distributed:
            raise ValueError("data is empty: it yielded no batch")
        weights = [float(w) for w in weights]
        total = float(sum(weights))
        self.batch_counts, self.batch_offset = [len(weights)], 0
        if self.distributed:  # the data set is the union of the ranks' shards
            total = all_reduce_scalar(total, self.device, self.process_group)
            if total == 0 and not weights:
                raise ValueError("data is empty on every rank: no batch anywhere")
            self.batch_counts = rank_counts(len(weights), self.device, self.process_group)
            self.batch_offset = sum(self.batch_counts[:dist.get_rank(self.process_group)])
            if self.fsdp and min(self.batch_counts) == 0:
                raise ValueError(
                    f"batches per rank are {self.batch_counts}: with an FSDP2 model every "
                    "rank needs at least one batch (its forward and backward passes are "
                    "collectives)"
                )
        if total <= 0:
            raise ValueError(
                f"the data set has {total} loss terms (all targets ignored?); nothing to "
                "differentiate"
            )
        if check:
            if not self.distributed:
                self._check_repeatable(weights, prints)
            else:
                # A rank failing its checks tells the others, which would otherwise wait
                # in their first product's all-reduce until the timeout.
                try:
                    self._check_repeatable(weights, prints)
                except Exception:
                    all_reduce_scalar(1.0, self.device, self.process_group)
                    raise
                failed = all_reduce_scalar(0.0, self.device, self.process_group)
                if failed:
                    raise RuntimeError(
                        f"{round(failed)} other rank(s) failed the operator's construction "
                        "checks; see their tracebacks"
                    )
        return total

    def _check_repeatable(self, weights: list[float], prints: list[tuple]) -> None:
        again = [fingerprint(b) for b in iterate(self.data, self.device)]
        if again != prints:
            raise NondeterminismError(
                "the data gives different batches on two passes (shuffle=True, random "
                "augmentation, or a sampler with state?); curvature products walk the data "
                "once per product and need the same batches each time. Use shuffle=False "
                "or pass check_deterministic=False"
            )
        if weights:
            self._check_loss_repeatable()
        # The data proved repeatable: reuse the weights instead of recounting the
        # targets (a few small kernels per batch) in every product.
        self._batch_weights = weights

    def _check_loss_repeatable(self) -> None:
        batch = next(iter(iterate(self.data, self.device)))
        with preserved(self.model), torch.no_grad():
            first = self.objective(self.model, batch).detach().clone()
            second = self.objective(self.model, batch).detach()
        tol = 1e-6 * float(first.abs().clamp_min(1e-30))
        if not torch.isfinite(first):
            raise NonFiniteLossError(f"the loss on batch 0 is {float(first)}")
        if abs(float(first) - float(second)) > tol:
            raise NondeterminismError(
                f"the model's loss on the same batch differs between two evaluations "
                f"({float(first)!r} vs {float(second)!r}): a random layer in the model? "
                "call model.eval() or pass check_deterministic=False"
            )

    # -- products ------------------------------------------------------------------
    def _batch_matmat(
        self, batch: Batch, scale: torch.Tensor | float, blocks: list[torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One batch's scaled curvature times ``blocks`` (per parameter ``(m, *shape)``).

        Returns the batch's (unscaled) loss, for the NaN check, and the products.
        """
        raise NotImplementedError

    def _perturbed_params(self) -> Sequence[torch.Tensor]:
        """Parameters a product perturbs in place (restored afterwards)."""
        return ()

    def _supports_fsdp(self) -> bool:
        """Whether products work on an FSDP2-sharded model (set before ``__init__``)."""
        return False

    def _batches(self):
        """``(index, batch, scale)`` with ``scale = w_b / sum w`` (1 for 'sum')."""
        cached = self._batch_weights
        for i, batch in enumerate(iterate(self.data, self.device)):
            if self.objective.reduction == "sum":
                yield i, batch, 1.0
            elif cached is not None and i < len(cached):
                yield i, batch, cached[i] / self.total_weight
            else:
                w = self.objective.batch_weight(batch)
                # float64 so that int counts divided by the total lose nothing
                w = w.to(torch.float64) if isinstance(w, torch.Tensor) else float(w)
                yield i, batch, w / self.total_weight

    def _local_matmat(self, V: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """This process's share of ``A @ V`` and the batch losses it saw."""
        blocks = self._split_block(V)
        total = torch.zeros_like(V)
        losses = []
        with preserved(self.model, self._perturbed_params()):
            for _, batch, scale in self._batches():
                loss, out = self._batch_matmat(batch, scale, blocks)
                losses.append(loss.detach().reshape(()))
                total.add_(self._join_block(out))
        return total, losses

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        if not self.distributed:
            out, losses = self._local_matmat(V)
            self._raise_if_not_finite(losses)
            return out
        return self._distributed_matmat(V)

    def _distributed_matmat(self, V: torch.Tensor) -> torch.Tensor:
        if self.debug_distributed:
            assert_same_on_all_ranks(V, self.process_group)
        reduce = dict(shape=tuple(V.shape), dtype=self.dtype, device=self.device,
                      group=self.process_group)
        if self.fsdp:
            # FSDP's reduce-scatter has already summed the ranks' gradients, so only the
            # counters travel. A rank failing inside FSDP's own collectives cannot flag
            # it: the others then raise when the process group's timeout expires.
            reduce["shape"] = (0,)
        try:
            out, losses = self._local_matmat(V)
            bad = self._nonfinite_batches(losses)
        except Exception:
            # Join the collective with a failure flag so the other ranks raise too.
            all_reduce_product(None, nonfinite=0, failed=True, **reduce)
            raise
        reduced = all_reduce_product(None if self.fsdp else out, nonfinite=len(bad),
                                     failed=False, **reduce)
        if reduced.failed_ranks:
            raise RuntimeError(
                f"{reduced.failed_ranks} other rank(s) raised during this curvature product; "
                "see their tracebacks"
            )
        self._raise_if_not_finite(losses)
        if reduced.nonfinite:
            raise NonFiniteLossError(
                f"the loss is not finite on {reduced.nonfinite} batch(es) of other ranks"
            )
        return out if self.fsdp else reduced.value

    @staticmethod
    def _nonfinite_batches(losses: list[torch.Tensor]) -> list[int]:
        if not losses:
            return []
        finite = torch.isfinite(torch.stack(losses).float())
        return [i for i, ok in enumerate(finite.tolist()) if not ok]

    @classmethod
    def _raise_if_not_finite(cls, losses: list[torch.Tensor]) -> None:
        # One host sync per product, not one per batch.
        bad = cls._nonfinite_batches(losses)
        if bad:
            raise NonFiniteLossError(
                f"the loss is not finite on batch(es) {bad[:10]} "
                f"(value {float(losses[bad[0]])}); the curvature there is undefined"
            )


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
