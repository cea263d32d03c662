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

from torchcurv.data import check_reiterable, fingerprint, iterate, shapes
from torchcurv.distributed.reduce import (
    all_reduce_scalar,
    all_reduce_sum,
    assert_same_on_all_ranks,
    checkpoint,
    failures_reported,
    is_distributed,
    parameter_agreement,
    rank_counts,
)
from torchcurv.dtypes import accumulation_dtype
from torchcurv.errors import DataChangedError, NondeterminismError, NonFiniteLossError
from torchcurv.objectives import Objective, as_objective
from torchcurv.operators.attention import differentiable_attention
from torchcurv.operators.base import ParameterOperator
from torchcurv.operators.microbatch import (
    check_microbatch_size,
    refuse_batch_coupling,
    split_batch,
)
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
        microbatch_size: split every batch into chunks of at most this many examples
            (dim 0 of every tensor in the batch, dict batches too), each weighted by its
            own loss-term count, to bound the memory of one product. The operator is the
            same matrix (up to rounding; the Monte-Carlo Fisher draws other labels).
            Refused for models that mix the examples of a batch (BatchNorm in train mode)
            and for mean-reduced objectives without a ``weight``; with
            ``check_deterministic``, the first splittable batch's loss is also checked to
            be the weighted mean of its microbatches' losses. Microbatches without loss
            terms (all targets padding) are skipped.

    Vectors are always the full ``(n,)`` / ``(n, m)`` vectors over all selected
    parameters, identical on every rank, also for a model sharded with FSDP2
    (``torch.distributed.fsdp.fully_shard``: ``n`` counts the unsharded parameters);
    only :class:`~torchcurv.HessianOperator` with ``method="finite_difference"``
    supports FSDP2 models (docs/distributed.md).

    Every product runs with SDPA restricted to its math backend
    (:func:`~torchcurv.operators.attention.differentiable_attention`), the only one that
    double backward and forward-mode AD go through. For float16 / bfloat16 models the
    batch products are summed (and all-reduced) in float32 and rounded once at the end.

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
        microbatch_size: int | None = None,
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
        # Distributed, each stage's local work runs under failures_reported and ends in
        # a collective (with its checkpoint), so that a rank failing anywhere in
        # construction makes the others raise at once instead of at the group's timeout.
        with self._stage(None):
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
            check_microbatch_size(microbatch_size)
            self.microbatch_size = microbatch_size
            self._check_model_mode(strict=check_deterministic)
            if microbatch_size is not None:
                self._check_splittable()
        self._rank = dist.get_rank(process_group) if self.distributed else 0
        if self.distributed:
            parameter_agreement(type(self).__name__, self.param_names, self.params,
                                compare_values=not self.fsdp, group=process_group)
        # per batch, the loss-term counts of its pieces (one piece without microbatching)
        self._batch_weights: list[list[float]] | None = None
        self.total_weight = self._total_weight(check_deterministic)
        if microbatch_size is not None and check_deterministic:
            with self._stage(self.device):
                self._check_split_loss_matches()
            if self.distributed:
                checkpoint(self.device, process_group, what="the operator's construction")

    def _stage(self, device: torch.device | None):
        """Report a failure of this rank's local work to the other ranks (distributed)."""
        return failures_reported(device, self.process_group, active=self.distributed)

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

    def _pieces(self, batch: Batch) -> list[Batch]:
        """The microbatches of ``batch`` (``[batch]`` without ``microbatch_size``)."""
        if self.microbatch_size is None:
            return [batch]
        return split_batch(batch, self.microbatch_size)

    def _weights_of(self, batch: Batch) -> list[torch.Tensor | float]:
        """The loss-term counts construction keeps for ``batch``: one per microbatch of a
        'mean' loss; a 'sum' loss's pieces all weigh 1 and are never cached, so its
        batches count whole."""
        pieces = self._pieces(batch) if self.objective.reduction == "mean" else [batch]
        return [self.objective.batch_weight(p) for p in pieces]

    def _total_weight(self, check: bool) -> float:
        counts: list[list[torch.Tensor | float]] = []
        prints: list[Any] = []
        with self._stage(self.device):
            layout = []
            for batch in iterate(self.data, self.device):
                counts.append(self._weights_of(batch))
                layout.append(shapes(batch))
                if check:
                    prints.append(fingerprint(batch))
            self._batch_shapes = layout
            if not counts and not self.distributed:
                raise ValueError("data is empty: it yielded no batch")
            weights = [[float(w) for w in ws] for ws in counts]
        total = float(sum(sum(ws) for ws in weights))
        # this rank's loss-term count, which every later pass over the data must see again
        self._local_weight = total
        self.batch_counts, self.batch_offset = [len(weights)], 0
        if self.distributed:  # the data set is the union of the ranks' shards
            total = all_reduce_scalar(total, self.device, self.process_group)
            self.batch_counts = rank_counts(len(weights), self.device, self.process_group)
            if sum(self.batch_counts) == 0:
                raise ValueError("data is empty on every rank: no batch anywhere")
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
            with self._stage(self.device):
                self._check_repeatable(weights, prints)
            if self.distributed:
                checkpoint(self.device, self.process_group,
                           what="the operator's construction checks")
        return total

    def _check_repeatable(self, weights: list[list[float]], prints: list[tuple]) -> None:
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
        # targets (a few small kernels and, per microbatch, a host sync) per product.
        self._batch_weights = weights

    def _check_loss_repeatable(self) -> None:
        batch = next(iter(iterate(self.data, self.device)), None)
        if batch is None:
            raise DataChangedError(
                "the data yielded no batch on a later pass (an exhausted iterator or a "
                "loader over a consumed stream?); products walk the data once per product"
            )
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

    def _check_splittable(self) -> None:
        if self.fsdp:
            raise ValueError(
                "microbatch_size is not supported for FSDP2-sharded models: every rank must "
                "join the same number of FSDP passes, which microbatches of unequal "
                "batches would break; split the batches in the data loader instead"
            )
        refuse_batch_coupling(self.model)
        if self.objective.reduction == "mean" and self.objective.weight is None:
            raise ValueError(
                "microbatch_size needs the objective's weight (loss terms per batch) to "
                "weigh the microbatches of a mean-reduced loss; pass "
                "Objective(..., weight=lambda batch: <number of loss terms>)"
            )

    def _check_split_loss_matches(self) -> None:
        """Catch batch coupling no module check sees (custom layers, in-batch losses)."""
        mean = self.objective.reduction == "mean"
        for batch, weights in zip(iterate(self.data, self.device), self._batch_weights or []):
            pieces = self._pieces(batch)
            if len(pieces) > 1 and sum(weights) > 0:
                break
        else:
            return  # no batch with loss terms is larger than a microbatch: nothing to check
        with preserved(self.model), torch.no_grad():
            whole = float(self.objective(self.model, batch))
            split = 0.0
            for j, piece in enumerate(pieces):
                share = weights[j] / sum(weights) if mean else 1.0
                if share != 0:
                    split += share * float(self.objective(self.model, piece))
        tol = torch.finfo(self.dtype).eps ** 0.5 * max(abs(whole), 1e-30)
        if not abs(whole - split) <= tol:
            raise ValueError(
                f"splitting a batch into microbatches of {self.microbatch_size} changes its "
                f"loss ({whole!r} whole vs {split!r} from the microbatches): the model or the "
                "loss couples the examples of a batch, so microbatching would change the "
                "curvature. Drop microbatch_size (or pass check_deterministic=False to skip "
                "this check)"
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
        """``(index, batch, scale)`` with ``scale = w_b / sum w`` (1 for 'sum').

        With ``microbatch_size``, one entry per microbatch (``index`` is its batch's, and
        ``w_b`` its own loss-term count); microbatches without loss terms are left out:
        their mean loss is 0/0, and their share of the data set's loss is zero.

        Every pass checks that the data is the data construction counted, otherwise
        :class:`~torchcurv.DataChangedError`: as many batches, each with the shapes it
        had (on the host, no kernel); when the loss-term counts are computed anyway (not
        cached), their sum too (read once at the end of the pass). A pass must therefore
        be walked to its end.
        """
        cached = self._batch_weights
        expected = self.batch_counts[self._rank]
        seen: list[torch.Tensor | float] = []
        count = 0
        for i, batch in enumerate(iterate(self.data, self.device)):
            count = i + 1
            if count > expected:
                raise self._data_changed(f"more than the {expected} batches")
            if shapes(batch) != self._batch_shapes[i]:
                raise self._data_changed(
                    f"batch {i} with shapes {shapes(batch)}, not {self._batch_shapes[i]}")
            pieces = self._pieces(batch)
            if self.objective.reduction == "sum":
                seen.append(self.objective.batch_weight(batch))
                for piece in pieces:
                    yield i, piece, 1.0
            elif cached is not None:
                for piece, w in zip(pieces, cached[i]):
                    if w != 0 or self.microbatch_size is None:
                        yield i, piece, w / self.total_weight
            elif self.microbatch_size is None:
                # a tensor count stays on the device: no host sync per batch
                w = self._as_float64(self.objective.batch_weight(batch))
                seen.append(w)
                yield i, batch, w / self.total_weight
            else:
                # deciding which microbatches to skip needs their counts on the host:
                # one sync per batch
                ws = torch.stack([
                    torch.as_tensor(self.objective.batch_weight(p), dtype=torch.float64,
                                    device=self.device)
                    for p in pieces
                ]).tolist()
                seen.extend(ws)
                for piece, w in zip(pieces, ws):
                    if w != 0:
                        yield i, piece, w / self.total_weight
        if count != expected:
            raise self._data_changed(f"{count} batches, not {expected}")
        if cached is not None and self.objective.reduction == "mean":
            return
        terms = float(sum(w.double() if isinstance(w, torch.Tensor) else float(w)
                          for w in seen))
        if abs(terms - self._local_weight) > 1e-9 * max(1.0, abs(self._local_weight)):
            raise self._data_changed(
                f"{terms!r} loss terms, not the {self._local_weight!r} counted")

    def _data_changed(self, what: str) -> DataChangedError:
        rank = f" on rank {self._rank}" if self.distributed else ""
        return DataChangedError(
            f"the data gave {what}{rank} when the operator was built; products walk the "
            "data once per product and need the same batches each time (an exhausted or "
            "re-sharded loader, drop_last, a data set changed in place?). Build a new "
            "operator for the new data"
        )

    @staticmethod
    def _as_float64(w: torch.Tensor | float) -> torch.Tensor | float:
        # float64 so that int counts divided by the total lose nothing
        return w.to(torch.float64) if isinstance(w, torch.Tensor) else float(w)

    def _local_matmat(self, V: torch.Tensor) -> tuple[torch.Tensor, BatchLosses]:
        """This process's share of ``A @ V`` (in :func:`accumulation_dtype`) and the
        batch losses it saw."""
        blocks = self._split_block(V)
        total = torch.zeros_like(V, dtype=accumulation_dtype(V.dtype))
        losses = BatchLosses()
        with preserved(self.model, self._perturbed_params()):
            for i, batch, scale in self._batches():
                loss, out = self._batch_matmat(batch, scale, blocks)
                losses.add(i, loss)
                total.add_(self._join_block(out))
        return total, losses

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        with differentiable_attention():
            if not self.distributed:
                out, losses = self._local_matmat(V)
                losses.raise_if_not_finite()
                return out.to(self.dtype)
            return self._distributed_matmat(V)

    def _distributed_matmat(self, V: torch.Tensor) -> torch.Tensor:
        group = self.process_group
        if self.debug_distributed:
            assert_same_on_all_ranks(V, group)
        # Whatever this rank raises (BaseException), it joins the product's checkpoint
        # with a failure flag, so the others raise too and the next product pairs up.
        # FSDP's reduce-scatter has already summed the ranks' gradients, so only the
        # checkpoint travels; a rank failing inside FSDP's own collectives cannot flag
        # it: the others then raise when the process group's timeout expires.
        with self._stage(self.device):
            out, losses = self._local_matmat(V)
            bad = losses.nonfinite_batches()
        reached = checkpoint(self.device, group, nonfinite=len(bad),
                             what="this curvature product")
        if reached.nonfinite:
            losses.raise_if_not_finite()
            raise NonFiniteLossError(
                f"the loss is not finite on {reached.nonfinite} batch(es) of other ranks"
            )
        if self.fsdp:
            return out.to(self.dtype)
        return all_reduce_sum(out, group, checkpointed=True).to(self.dtype)


class BatchLosses:
    """The losses one product saw, each with the index of the batch it belongs to (several
    per batch with microbatching), checked for NaN/inf with one host sync per product."""

    def __init__(self) -> None:
        self.values: list[torch.Tensor] = []
        self.batch_index: list[int] = []

    def add(self, index: int, loss: torch.Tensor) -> None:
        self.values.append(loss.detach().reshape(()))
        self.batch_index.append(index)

    def _bad(self) -> list[int]:
        if not self.values:
            return []
        finite = torch.isfinite(torch.stack(self.values).float())
        return [j for j, ok in enumerate(finite.tolist()) if not ok]

    def nonfinite_batches(self) -> list[int]:
        """Sorted indices of the batches with a NaN/inf loss (on any of their pieces)."""
        return sorted({self.batch_index[j] for j in self._bad()})

    def raise_if_not_finite(self) -> None:
        bad = self._bad()
        if bad:
            batches = sorted({self.batch_index[j] for j in bad})
            raise NonFiniteLossError(
                f"the loss is not finite on batch(es) {batches[:10]} "
                f"(value {float(self.values[bad[0]])}); the curvature there is undefined"
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
