"""What every model-based curvature operator shares: parameters, data, weighting, safety.

A product goes ``_matmat`` (here: the SDPA restriction the derivative strategy needs,
then the sharding: checkpoint, all-reduce) -> ``_local_matmat`` (the subclass: its
derivative strategy, :mod:`torchcurv.derivatives`) -> :meth:`CurvatureOperator._walk_batches`
(here: the walk over the data, each batch's product, already scaled to its share of the
data set's loss, summed; the loss checked for NaN/inf; the model given back untouched).
"""

from __future__ import annotations

import cmath
import contextlib
import contextvars
import inspect
import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn
from typing_extensions import Self, Unpack

from torchcurv.data import check_reiterable, fingerprint, iterate, placed, shapes
from torchcurv.distributed.sharding import sharding_for
from torchcurv.dtypes import accumulation_dtype
from torchcurv.errors import DataChangedError, NondeterminismError, NonFiniteLossError
from torchcurv.objectives import Objective, as_objective
from torchcurv.operators.attention import differentiable_attention
from torchcurv.operators.base import FiniteCheck, ParameterOperator
from torchcurv.operators.config import CurvatureConfig, CurvatureOptions, _short
from torchcurv.operators.graphs import CudaGraphs
from torchcurv.operators.memory import (
    BlockPlan,
    MemoryEstimate,
    MicrobatchMemory,
    PeakMeter,
    budget_bytes,
)
from torchcurv.operators.microbatch import (
    check_microbatch_size,
    leading_size,
    refuse_batch_coupling,
    split_batch,
)
from torchcurv.operators.model_guard import ModelGuard, preserved
from torchcurv.operators.params import select_parameters

if TYPE_CHECKING:
    from torchcurv.derivatives.base import Strategy

Batch = Any
BatchMatmat = Callable[["CurvatureOperator", Batch, "torch.Tensor | float", list[torch.Tensor]],
                       tuple[torch.Tensor, list[torch.Tensor]]]

# stateless, so one serves every product without recorded graphs
_UNLOCKED = contextlib.nullcontext()

# (operator id, microbatch size) of the product a memory budget walks in microbatches;
# a context variable, so that concurrent products of one operator do not see it
_PLANNED_WALK: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar(
    "planned_walk", default=None)

_RANDOM_IN_TRAIN_MODE = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                         nn.AlphaDropout, nn.FeatureAlphaDropout)


class CurvatureOperator(ParameterOperator):
    """Base of the operators built from ``(model, criterion, data)``.

    The constructor takes ``model, criterion, data`` and the keywords of
    :class:`~torchcurv.operators.config.CurvatureConfig` (``params``, ``param_filter``,
    ``check_deterministic``, ``process_group``, ``distributed``, ``debug_distributed``,
    ``microbatch_size``), whose docstring says what each means; subclasses
    add their own (``method``, ``jvp``, ...). :attr:`config` gives them back and
    :meth:`replace` builds the same operator with some of them changed.

    Vectors are always the full ``(n,)`` / ``(n, m)`` vectors over all selected
    parameters, identical on every rank, also for a model sharded with FSDP2
    (``torch.distributed.fsdp.fully_shard``: ``n`` counts the unsharded parameters);
    only :class:`~torchcurv.HessianOperator` with ``method="finite_difference"``
    supports FSDP2 models (docs/distributed.md).

    Products whose derivative strategy goes through the model's backward or pushes
    tangents through it run with SDPA restricted to its math backend
    (:func:`~torchcurv.operators.attention.differentiable_attention`), the only one that
    double backward and forward-mode AD go through; first-order strategies (finite
    differences) keep the default backends. For float16 / bfloat16 models the batch
    products are summed (and all-reduced) in float32 and rounded once at the end.

    Attributes:
        config: the construction arguments (frozen).
        sharding: how products are spread over ranks
            (:mod:`torchcurv.distributed.sharding`); ``distributed``, ``fsdp`` and
            ``process_group`` read from it.
        derivative: the derivative strategy (:mod:`torchcurv.derivatives`), picked at
            construction from ``method`` / ``jvp``; ``None`` where products are not
            derivatives of the model (KFAC).
        batch_counts: number of batches on each rank of the group (``[len(data)]`` when
            local), known after construction.
        batch_offset: number of batches on lower ranks: this rank's batch ``i`` is batch
            ``batch_offset + i`` of the data set (the ranks' shards in rank order).
        batch_splitting: whether a block over ``max_memory`` may walk the batches in
            microbatches (chosen at construction); ``block_plan``: how the last one was
            split.
    """

    config_type: ClassVar[type[CurvatureConfig]] = CurvatureConfig
    derivative: Strategy | None = None

    def __init__(
        self,
        model: nn.Module,
        criterion: nn.Module | Objective,
        data: Iterable[Batch],
        **options: Unpack[CurvatureOptions],
    ) -> None:
        self._build(CurvatureConfig.of(type(self).__name__, model, criterion, data, **options))

    def _build(self, config: CurvatureConfig) -> None:
        """Construct from ``config``; subclasses extend this, not ``__init__``, so that
        :meth:`replace` reaches every class's checks."""
        self._config = config
        model, self.sharding = sharding_for(config.model, config.process_group,
                                            config.distributed)
        self.debug_distributed = config.debug_distributed
        microbatch_size = config.microbatch_size
        check_deterministic = config.check_deterministic
        # Distributed, each stage's local work runs under failures_reported and ends in
        # a collective (with its checkpoint), so that a rank failing anywhere in
        # construction makes the others raise at once instead of at the group's timeout.
        with self._stage(None):
            self.model = model
            self._guard = ModelGuard(model)
            self.objective = as_objective(config.criterion)
            self.param_names, self.params = select_parameters(
                model, config.params, config.param_filter)
            self.sharding.check_derivative(type(self).__name__, self.derivative)
            super().__init__(self.params)
            check_reiterable(config.data)
            self.data = config.data
            check_microbatch_size(microbatch_size)
            self.microbatch_size = microbatch_size
            self._check_model_mode(strict=check_deterministic)
            self._check_precision()
            if microbatch_size is not None:
                self._check_splittable()
        self._graphs = self._recorder(config.cuda_graphs)
        # Products that end in the loss check's read-back finish the vectors' NaN/inf
        # check in it. Not those that perturb the parameters along the vectors (finite
        # differences), which read the vectors' norms back first and must not step
        # along a NaN; not KFAC, whose products are no walk over the data.
        d = self.derivative
        self._folds_finite_check = d is not None and not d.perturbs_params
        self._one_vector_rows = d is None or d.one_vector_rows
        # On the CPU a foreach add is one add per tensor: a one-vector product adds each
        # batch in as one flattened tensor instead (two kernels, whatever the model)
        self._flat_adds = self.device.type == "cpu"
        self._rank = self.sharding.rank()
        self.sharding.check_parameters(type(self).__name__, self.param_names, self.params)
        # per batch, the loss-term counts of its pieces (one piece without microbatching)
        self._batch_weights: list[list[float]] | None = None
        self.total_weight = self._total_weight(check_deterministic)
        if microbatch_size is not None and check_deterministic:
            with self._stage(self.device):
                self._check_split_loss_matches()
            self.sharding.checkpoint(self.device, what="the operator's construction")
        # per planned microbatch size, the loss-term counts of each batch's pieces,
        # learned by the first product walked at that size (data proven repeatable)
        self._planned_weights: dict[int, list[list[float]]] = {}
        with self._stage(self.device):
            self._splits_batches = self._may_split_batches(check_deterministic)

    # graphs need each batch's product to be one fixed sequence of kernels: per-batch
    # strategies without random draws
    _graphable = True

    def _recorder(self, enabled: bool) -> CudaGraphs | None:
        if not enabled:
            return None
        d = self.derivative
        if d is None or d.walks_data_per_vector or d.perturbs_params or not self._graphable:
            what = (f"{type(self).__name__} with method={d.name!r}" if d is not None
                    else type(self).__name__)
            raise ValueError(
                f"cuda_graphs=True records the per-batch products of the exact Hessian "
                f"(method='autograd' or 'forward_over_reverse'), the GGN and the empirical "
                f"Fisher; {what} has none to record")
        if self._config.compile:
            raise ValueError(
                "cuda_graphs=True records eager products; with compile=True the compiled "
                "graphs would be recorded inside it, which torchcurv does not support. "
                "Choose one of them")
        return CudaGraphs(self)

    # -- the configuration ---------------------------------------------------------
    @property
    def config(self) -> CurvatureConfig:
        """The arguments this operator was built with (a frozen dataclass)."""
        return self._config

    def replace(self, **changes: Any) -> Self:
        """A new operator of this class built from :attr:`config` with ``changes``, as
        ``dataclasses.replace``: ``H.replace(method="finite_difference")`` is the same
        matrix computed another way. Unknown names raise a ``TypeError`` listing the
        fields. Construction runs again (its checks and passes over the data)."""
        cls = type(self)
        missing = _keywords_outside(cls, type(self._config))
        if missing:
            raise TypeError(
                f"{cls.__name__}.replace cannot rebuild it: its configuration "
                f"({type(self._config).__name__}) does not hold {missing}; build it anew"
            )
        config = self._config.replace(f"{cls.__name__}.replace", **changes)
        return cls(config.model, config.criterion, config.data, **config.keywords())

    @property
    def process_group(self) -> Any:
        return self.sharding.process_group

    @property
    def distributed(self) -> bool:
        return self.sharding.distributed

    @property
    def fsdp(self) -> bool:
        return self.sharding.fsdp

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={_short(v)}" for k, v in self._config.changed().items())
        return f"{type(self).__name__}({fields})"

    def _stage(self, device: torch.device | None):
        """Report a failure of this rank's local work to the other ranks (distributed)."""
        return self.sharding.stage(device)

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

    def _check_precision(self) -> None:
        d = self.derivative
        half = {p.dtype for p in self.params} & {torch.bfloat16, torch.float16}
        if d is None or not d.perturbs_params or not half:
            return
        from torchcurv.derivatives.base import strategy_registries

        argument = d.argument
        dtype = str(sorted(half, key=str)[0]).removeprefix("torch.")
        exact = " or ".join(repr(k) for k, c in strategy_registries()[argument].items()
                            if not c.perturbs_params)
        warnings.warn(
            f"{type(self).__name__} with {argument}={d.name!r} on {dtype} "
            f"parameters: the perturbed parameters are rounded to {dtype} and the product "
            "is a difference of two rounded results, so its error can far exceed the "
            "dtype's rounding (order 1 on a small random LLaMA) "
            "(benchmarks/product_accuracy.py measures it); use "
            f"{argument}={exact} for products accurate to the dtype's rounding",
            RuntimeWarning, stacklevel=5,
        )

    def _pieces(self, batch: Batch, size: int | None = None) -> list[Batch]:
        """The microbatches of ``batch`` of at most ``size`` examples (default
        ``microbatch_size``; ``[batch]`` when both are ``None``)."""
        size = self.microbatch_size if size is None else size
        if size is None:
            return [batch]
        return split_batch(batch, size)

    def _weights_of(self, batch: Batch) -> list[torch.Tensor | float]:
        """The loss-term counts construction keeps for ``batch``: one per microbatch of a
        'mean' loss; a 'sum' loss's pieces all weigh 1 and are never cached, so its
        batches count whole."""
        pieces = self._pieces(batch) if self.objective.reduction == "mean" else [batch]
        return [self.objective.batch_weight(p) for p in pieces]

    def _total_weight(self, check: bool) -> float:
        counts: list[list[torch.Tensor | float]] = []
        prints: list[Any] = []
        examples: list[int] | None = []
        with self._stage(self.device):
            layout = []
            for batch in iterate(self.data, self.device):
                counts.append(self._weights_of(batch))
                layout.append(shapes(batch))
                if examples is not None:
                    try:
                        examples.append(leading_size(batch))
                    except ValueError:  # no common example dimension: never split
                        examples = None
                if check:
                    prints.append(fingerprint(batch))
            self._batch_shapes = layout
            # the most examples one piece of a batch holds (None: batches not splittable)
            self._examples = (None if not examples else
                              min(max(examples), self.microbatch_size or max(examples)))
            if not counts and not self.distributed:
                raise ValueError("data is empty: it yielded no batch")
            weights = _as_floats(counts, self.device)
        # this rank's loss-term count, which every later pass over the data must see again
        self._local_weight = float(sum(sum(ws) for ws in weights))
        # distributed, the data set is the union of the ranks' shards
        total, self.batch_counts, self.batch_offset = self.sharding.data_set(
            self._local_weight, len(weights), self.device)
        if total <= 0:
            raise ValueError(
                f"the data set has {total} loss terms (all targets ignored?); nothing to "
                "differentiate"
            )
        if check:
            with self._stage(self.device):
                self._check_repeatable(weights, prints)
            self.sharding.checkpoint(self.device, what="the operator's construction checks")
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
        self.sharding.check_microbatching()
        refuse_batch_coupling(self.model)
        if self.objective.reduction == "mean" and self.objective.weight is None:
            raise ValueError(
                "microbatch_size needs the objective's weight (loss terms per batch) to "
                "weigh the microbatches of a mean-reduced loss; pass "
                "Objective(..., weight=lambda batch: <number of loss terms>)"
            )

    def _check_split_loss_matches(self) -> None:
        """Catch batch coupling no module check sees (custom layers, in-batch losses)."""
        losses = self._split_losses(self.microbatch_size)
        if losses is not None:
            whole, split = losses
            raise ValueError(
                f"splitting a batch into microbatches of {self.microbatch_size} changes its "
                f"loss ({whole!r} whole vs {split!r} from the microbatches): the model or the "
                "loss couples the examples of a batch, so microbatching would change the "
                "curvature. Drop microbatch_size (or pass check_deterministic=False to skip "
                "this check)"
            )

    def _split_losses(self, size: int | None) -> tuple[float, float] | None:
        """``(whole, from the microbatches)``: the loss of the first batch that splits
        into microbatches of ``size`` with loss terms, where the two differ by more
        than rounding; ``None`` where they agree or no batch splits."""
        mean = self.objective.reduction == "mean"
        for batch in iterate(self.data, self.device):
            pieces = self._pieces(batch, size)
            weights = [float(self.objective.batch_weight(p)) for p in pieces] \
                if mean else [1.0] * len(pieces)
            if len(pieces) > 1 and sum(weights) > 0:
                break
        else:
            return None
        with preserved(self.model), torch.no_grad():
            whole = float(self.objective(self.model, batch))
            split = 0.0
            for j, piece in enumerate(pieces):
                share = weights[j] / sum(weights) if mean else 1.0
                if share != 0:
                    split += share * float(self.objective(self.model, piece))
        tol = torch.finfo(self.dtype).eps ** 0.5 * max(abs(whole), 1e-30)
        return None if abs(whole - split) <= tol else (whole, split)

    # the operators whose matrix does not depend on how batches are split (the
    # Monte-Carlo Fisher's labels do)
    _exact_when_split = True

    def _may_split_batches(self, check: bool) -> bool:
        """Whether a memory budget may walk the batches in microbatches: a budget can
        apply (``max_memory`` a number, or ``"auto"`` on CUDA), the block shares work per
        batch (not one pass over the data per vector), no recorded graphs, the batches
        share an example dimension of 2 or more, the checks of ``microbatch_size`` pass
        (no train-mode BatchNorm, a loss-term count for a 'mean' loss, not FSDP2) and,
        with ``check``, the first batch's loss is the weighted sum of its halves'."""
        limit, d = self._config.max_memory, self.derivative
        if limit is None or (limit == "auto" and self.device.type != "cuda"):
            return False
        if d is None or d.walks_data_per_vector or self._graphs is not None \
                or not self._exact_when_split or self._examples is None or self._examples < 2:
            return False
        try:
            self._check_splittable()
        except ValueError:
            return False
        return not check or self._split_losses(math.ceil(self._examples / 2)) is None

    @property
    def batch_splitting(self) -> bool:
        """Whether a block product that does not fit ``max_memory`` may walk each batch
        in microbatches with the whole block; otherwise it goes in sub-blocks of
        columns. Chosen at construction (``max_memory`` in
        :class:`~torchcurv.operators.config.CurvatureConfig` says when it holds)."""
        return self._splits_batches

    # -- products ------------------------------------------------------------------
    def _batch_matmat(
        self, batch: Batch, scale: torch.Tensor | float, blocks: list[torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One batch's scaled curvature times ``blocks`` (per parameter ``(m, *shape)``).

        Returns the batch's (unscaled) loss, for the NaN check, and the products.
        """
        raise NotImplementedError

    def _batches(
        self, checks: BatchLosses | None = None
    ) -> Iterator[tuple[int, Batch, torch.Tensor | float]]:
        """``(index, batch, scale)`` with ``scale = w_b / sum w`` (1 for 'sum').

        With ``microbatch_size``, one entry per microbatch (``index`` is its batch's, and
        ``w_b`` its own loss-term count); microbatches without loss terms are left out:
        their mean loss is 0/0, and their share of the data set's loss is zero. Inside a
        product that a memory budget walks in microbatches (:meth:`_walked_in`), the
        microbatches are the planned ones.

        Every pass checks that the data is the data construction counted, otherwise
        :class:`~torchcurv.DataChangedError`: as many batches, each with the shapes it
        had (on the host, no kernel); when the loss-term counts are computed anyway (not
        cached), their sum too: read once at the end of the pass, or, given ``checks``
        (the losses of the product walking it), in their read-back
        (:meth:`BatchLosses.defer`). A pass must therefore be walked to its end.
        """
        planned = _PLANNED_WALK.get()
        size = planned[1] if planned is not None and planned[0] == id(self) \
            else self.microbatch_size
        cached = (self._batch_weights if size == self.microbatch_size or size is None
                  else self._planned_weights.get(size))
        mean = self.objective.reduction == "mean"
        # a planned size's counts, kept once a pass proves them (data proven repeatable)
        learned: list[list[float]] | None = (
            [] if cached is None and mean and self._batch_weights is not None else None)
        expected = self.batch_counts[self._rank]
        layouts, device, total = self._batch_shapes, self._device, self.total_weight
        # the usual walk, decided once: whole batches of a 'mean' loss, counts cached
        counted = cached is not None and size is None and mean
        seen: list[torch.Tensor | float] = []
        count = 0
        for i, raw in enumerate(self.data):
            count = i + 1
            if count > expected:
                raise self._data_changed(f"more than the {expected} batches")
            batch, layout = placed(raw, device)
            if layout != layouts[i]:
                raise self._data_changed(
                    f"batch {i} with shapes {layout}, not {layouts[i]}")
            if counted:
                assert cached is not None
                yield i, batch, cached[i][0] / total
                continue
            pieces = self._pieces(batch, size)
            if not mean:
                seen.append(self.objective.batch_weight(batch))
                for piece in pieces:
                    yield i, piece, 1.0
            elif cached is not None:
                for piece, w in zip(pieces, cached[i]):
                    if w != 0 or size is None:
                        yield i, piece, w / self.total_weight
            elif size is None:
                # a tensor count stays on the device: no host sync per batch
                weight = self._as_float64(self.objective.batch_weight(batch))
                seen.append(weight)
                yield i, batch, weight / self.total_weight
            else:
                # deciding which microbatches to skip needs their counts on the host:
                # one sync per batch
                ws = torch.stack([
                    torch.as_tensor(self.objective.batch_weight(p), dtype=torch.float64,
                                    device=self.device)
                    for p in pieces
                ]).tolist()
                seen.extend(ws)
                if learned is not None:
                    learned.append(ws)
                for piece, w in zip(pieces, ws):
                    if w != 0:
                        yield i, piece, w / self.total_weight
        if count != expected:
            raise self._data_changed(f"{count} batches, not {expected}")
        if cached is not None and mean:
            return
        terms = sum(w.double() if isinstance(w, torch.Tensor) else float(w) for w in seen)

        def check(terms: float) -> None:
            self._check_terms(terms)
            # the pass proved the data repeatable: a planned size's counts are kept
            if learned is not None and size is not None:
                self._planned_weights[size] = learned

        if (checks is not None and isinstance(terms, torch.Tensor) and terms.numel() == 1
                and terms.device == device):
            checks.defer(terms, check)
        else:
            check(float(terms))

    def _check_terms(self, terms: float) -> None:
        """The loss-term count of a pass over the data is the one construction counted."""
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

    def _walk_batches(self, V: torch.Tensor, batch_matmat: BatchMatmat,
                      enter: Callable[[int], None] | None = None
                      ) -> tuple[torch.Tensor, BatchLosses]:
        """``sum_b batch_matmat(self, batch_b, scale_b, blocks)`` over this process's
        batches (in :func:`accumulation_dtype`) and the batch losses it saw, with the
        model given back bit-identical; ``enter(i)`` runs before each batch (each
        microbatch) of index ``i``. The losses must be checked (as ``Sharding.matmat``
        does): the pass's loss-term check is deferred to their read-back."""
        m = V.shape[1]
        dtype = accumulation_dtype(V.dtype)
        # Accumulators shaped like the batch products, contiguous, so that each batch adds
        # in with one foreach call (fused on CUDA: same shapes and strides). One vector:
        # one flat result that starts as the first batch's products, flattened (no zero
        # fill, no first add), and later batches add into parameter-shaped views of it,
        # with or without the vector axis as their kernels answer; a block: one
        # (m, *shape) tensor per parameter, joined at the end.
        flat: torch.Tensor | None = None
        views: dict[bool, list[torch.Tensor]] = {}
        acc: list[torch.Tensor] | None = None
        if m > 1:
            acc = [torch.zeros((m, *s), dtype=dtype, device=V.device) for s in self._shapes]
        losses = BatchLosses()
        graphs = self._graphs
        with preserved(self.model, guard=self._guard), graphs.lock if graphs else _UNLOCKED:
            # a recorded graph reads the vectors from its own buffer
            blocks = (self._split_block(V, self._one_vector_rows) if graphs is None
                      else graphs.start(V))
            for position, (i, batch, scale) in enumerate(self._batches(losses)):
                if enter is not None:
                    enter(i)
                if graphs is None:
                    loss, out = batch_matmat(self, batch, scale, blocks)
                else:
                    loss, out = graphs.run(
                        position, batch, scale, blocks,
                        lambda batch, scale, blocks: batch_matmat(self, batch, scale, blocks))
                # BatchLosses.add, inline: this loop runs once per batch of every product
                value = loss.detach()
                losses.values.append(value if value.dim() == 0 else value.reshape(()))
                losses.batch_index.append(i)
                if acc is not None:
                    torch._foreach_add_(acc, out)
                elif flat is None:
                    flat = torch._C._nn.flatten_dense_tensors(out)
                    if flat.dtype != dtype:  # a dispatched no-op when they agree
                        flat = flat.to(dtype)
                elif self._flat_adds:
                    flat.add_(torch._C._nn.flatten_dense_tensors(out))
                else:
                    row = out[0].dim() != len(self._shapes[0])
                    into = views.get(row)
                    if into is None:
                        into = views[row] = self._param_views(flat, row=row)
                    torch._foreach_add_(into, out)
        if m == 1:
            if flat is None:  # no batch on this rank
                flat = torch.zeros(self.n, dtype=dtype, device=V.device)
            return flat.unsqueeze(1), losses
        assert acc is not None
        return self._join_block(acc), losses

    def _local_matmat(self, V: torch.Tensor) -> tuple[torch.Tensor, BatchLosses]:
        """This process's share of ``A @ V`` (in :func:`accumulation_dtype`) and the
        batch losses it saw."""
        raise NotImplementedError

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        budget = self._budget(V)
        if budget is None:
            return self._product(V)
        return self._budgeted_matmat(V, budget)

    def _finite_matmat(self, block: torch.Tensor, one: bool) -> torch.Tensor:
        # In one product the vectors' check is read back with the losses; budgeted
        # sub-blocks would each see only part of the block, so it is checked first.
        if self._folds_finite_check and self._budget(block) is None:
            return self._product(block, FiniteCheck(block, one))
        return super()._finite_matmat(block, one)

    def _budget(self, V: torch.Tensor) -> int | None:
        """The bytes a product of the block ``V`` may use, ``None`` for no limit (one
        vector always goes in one product)."""
        return (budget_bytes(self._config.max_memory, self.device) if V.shape[1] > 1
                else None)

    def _product(self, V: torch.Tensor, inputs: FiniteCheck | None = None) -> torch.Tensor:
        """``A @ V`` in one product: the attention restriction, then the sharding;
        ``inputs``, the vectors' NaN/inf check, is finished with the loss check."""
        attention = (differentiable_attention() if self.derivative is None
                     else self.derivative.attention())
        with attention:
            out = self.sharding.matmat(self._local_matmat, V, self._device,
                                       self.debug_distributed, inputs)
        return out if out.dtype == self._dtype else out.to(self._dtype)

    # -- memory --------------------------------------------------------------------
    _memory_points: tuple[tuple[int, int], ...] = ()
    # (vectors, peak) of products walked in microbatches of half the largest batch
    _split_points: tuple[tuple[int, int], ...] = ()
    _memory_method = ""
    _largest_block = 1 << 30  # lowered by a sub-block that ran out of memory
    # lowered by a microbatched product that ran out of memory (0: no more microbatches)
    _largest_microbatch = 1 << 30
    _block_plan: BlockPlan | None = None
    # the block sizes whose peaks the first budgeted product (or memory_estimate)
    # measures: 1 (often its own unbatched path), then two batched sizes for the slope
    _CALIBRATION = (1, 2, 4)
    # the block sizes measured on microbatches of half the examples, for the slope in b
    _SPLIT_CALIBRATION = (2, 4)

    @contextlib.contextmanager
    def _walked_in(self, microbatch: int | None):
        """Products inside walk every batch in microbatches of at most ``microbatch``
        examples (``None``: as the operator was built)."""
        token = _PLANNED_WALK.set(None if microbatch is None else (id(self), microbatch))
        try:
            yield
        finally:
            _PLANNED_WALK.reset(token)

    def _measured_product(self, V: torch.Tensor, microbatch: int | None = None
                          ) -> torch.Tensor:
        """:meth:`_product` (in ``microbatch``es) with its peak memory recorded for
        :meth:`memory_estimate` and the planner."""
        with self._walked_in(microbatch), PeakMeter(self.device) as meter:
            out = self._product(V)
        point = (V.shape[1], meter.peak)
        if microbatch is None:
            self._memory_points = (*self._memory_points, point)
        else:
            self._split_points = (*self._split_points, point)
        self._memory_method = meter.method
        return out

    def _budgeted_matmat(self, V: torch.Tensor, budget: int) -> torch.Tensor:
        """``A @ V`` in products whose predicted peak fits ``budget`` bytes.

        A block that does not fit as one product goes, where :attr:`batch_splitting`
        allows it, as one product whose batches are walked in microbatches (the shared
        forward and first backward done once per microbatch for all its vectors, the
        microbatches weighted by their own loss-term counts as with
        ``microbatch_size``), with the largest microbatch whose predicted peak fits;
        otherwise, or where not even one example per microbatch fits, in sub-blocks of
        columns on whole batches (repeating the shared work per sub-block).
        :attr:`block_plan` says which.

        The predictions come from measured products, their columns those of ``V`` (no
        extra product): until the peak per vector is known, the first columns go in
        sub-blocks of the calibration sizes (1, 2, 4 vectors), unless the rest fits even
        if each of its vectors took a whole measured one-vector product: then the rest
        goes at once. Before the first microbatched plan, two more sub-blocks (2 and 4
        vectors) are measured on microbatches of half the largest batch, which gives
        the peak's growth per example and vector (:class:`MicrobatchMemory`).

        A product that runs out of device memory anyway (a vmapped pass can hold more
        per vector than a single product) is tried again: a microbatched one at half
        its microbatch (below one example, or a measured one: no more microbatches), a
        sub-block at half its width, and no later one is larger (one process;
        distributed, the error is raised, as the other ranks are inside the same
        product); a single vector on whole batches raises. The ranks agree on every
        product's width (the smallest), so their collectives pair; each walks its own
        batches in its own microbatches.
        """
        # The sub-blocks are written into one result: a list joined at the end held the
        # result twice (at n ~ 1e9 and ten vectors, tens of gigabytes more).
        out = torch.empty(V.shape[0], V.shape[1], dtype=self.dtype, device=self.device)
        if self._config.max_memory == "auto":  # the free memory, now the result is held
            budget = budget_bytes("auto", self.device) or budget
        # distributed, a failure between sub-blocks (anything, KeyboardInterrupt too) is
        # posted to the others' next checkpoint (agree_min's or a product's)
        with self._stage(self.device):
            self._budgeted_columns(V, budget, out)
        return out

    def _budgeted_columns(self, V: torch.Tensor, budget: int, out: torch.Tensor) -> None:
        m, j, decided = V.shape[1], 0, False
        while j < m:
            width, microbatch, plan = self._next_product(m - j, budget, whole=j == 0)
            measured = plan is None
            width = self.sharding.agree_min(min(width, self._largest_block), self.device)
            block = V[:, j:j + width]
            try:
                if measured:
                    out[:, j:j + width] = self._measured_product(block, microbatch)
                else:
                    with self._walked_in(microbatch):
                        out[:, j:j + width] = self._product(block)
            except torch.OutOfMemoryError:
                if self.distributed or (microbatch is None and width == 1):
                    raise
                if microbatch is not None:
                    self._largest_microbatch = 0 if measured else microbatch // 2
                else:
                    self._largest_block = width // 2
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            if not decided and plan is not None:  # the call's first planned product
                self._block_plan, decided = plan, True
            j += width

    def _next_product(self, rest: int, budget: int, whole: bool
                      ) -> tuple[int, int | None, BlockPlan | None]:
        """``(width, microbatch, plan)`` of the next product of a budgeted block with
        ``rest`` columns left (``whole``: all of them); ``plan`` is ``None`` for a
        product measured to learn the peaks."""
        points = self._memory_points
        if len(points) < len(self._CALIBRATION):
            if points and rest * max(peak / k for k, peak in points) <= budget:
                return rest, None, None  # fits even at a whole one-vector product per vector
            return min(rest, self._CALIBRATION[len(points)]), None, None
        line = MemoryEstimate.fit(points, 1, self._memory_method)
        columns = min(rest, line.max_vectors(budget))
        if columns >= rest:
            return rest, None, BlockPlan("none" if whole else "columns", rest, None,
                                         line.at(rest).bytes)
        examples = self._examples
        # below what the block takes on one example at the least (the per-vector part
        # can shrink no faster than the examples), no microbatch fits
        if (self._splits_batches and self._largest_microbatch >= 1 and rest >= 2
                and examples is not None
                and rest * line.per_vector_bytes / examples <= budget):
            half = math.ceil(examples / 2)
            measured = dict(self._split_points)
            if len(measured) < 2:
                k = self._SPLIT_CALIBRATION[min(len(measured), 1)]
                return min(rest, k), half, None
            fit = MicrobatchMemory(
                whole=line, examples=examples,
                split=MemoryEstimate.fit(self._split_points, 1, self._memory_method),
                split_examples=half)
            b = min(fit.max_examples(rest, budget), self._largest_microbatch)
            if b >= 1:
                return rest, b, BlockPlan("microbatches", rest, b, fit.bytes(rest, b))
        return columns, None, BlockPlan("columns", columns, None, line.at(columns).bytes)

    @property
    def block_plan(self) -> BlockPlan | None:
        """How the last block product under ``max_memory`` was split once its peaks were
        measured (:class:`~torchcurv.operators.memory.BlockPlan`: ``.split`` is
        ``"none"``, ``"microbatches"`` or ``"columns"``, ``.vectors``,
        ``.microbatch_size``, ``.predicted_bytes``); ``None`` before one."""
        return self._block_plan

    def memory_estimate(self, m: int = 1) -> MemoryEstimate:
        """The predicted peak memory of one product with ``m`` vectors, above what is
        allocated when it starts (:class:`~torchcurv.operators.memory.MemoryEstimate`:
        ``.bytes``, ``.fixed_bytes``, ``.per_vector_bytes``, the measured points).

        From products measured on this operator: the first block products under a
        memory budget, or, when none ran yet, uncounted products of 1, 2 and 4 random
        vectors run here (the cost of seven vectors, once per operator). On CUDA the
        allocator's peak; on the CPU the tensors torch creates (see
        :mod:`torchcurv.operators.memory`). A size that runs out of memory while
        measuring ends the measurement; the line then comes from the sizes that fit (in
        one process; distributed, the error is raised). Distributed, every rank calls
        it, as a product.
        """
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ValueError(f"m must be a positive number of vectors, got {m!r}")
        if not self._memory_points:
            generator = torch.Generator(device=self.device).manual_seed(0)
            with self.uncounted():
                for size in self._CALIBRATION:
                    V = torch.randn(self.n, size, generator=generator, dtype=self.dtype,
                                    device=self.device)
                    try:
                        self._measured_product(V)
                    except torch.OutOfMemoryError:
                        # distributed, the other ranks are in the same product: raise
                        if not self._memory_points or self.distributed:
                            raise
                        break
                    finally:
                        del V
        return MemoryEstimate.fit(self._memory_points, m, self._memory_method)


def _as_floats(counts: list[list[torch.Tensor | float]],
               device: torch.device) -> list[list[float]]:
    """``float(w)`` of every count, with one transfer from the device for all the
    one-entry real tensors there rather than a host sync per batch (float64 holds each
    of them, and the Python float it gives, exactly); anything else as ``float`` has it,
    its errors included."""
    flat = [w for ws in counts for w in ws]
    on_device = [w for w in flat if isinstance(w, torch.Tensor) and w.device == device
                 and w.numel() == 1 and not w.is_complex()]
    if len(on_device) > 1:
        # stacked in one dtype, lest promotion round an int64 count to float32
        same = len({w.dtype for w in on_device}) == 1
        scalars = [w if w.dim() == 0 else w.reshape(()) for w in on_device]
        stacked = torch.stack(scalars if same else [w.to(torch.float64) for w in scalars])
        values = stacked.to(torch.float64).tolist()
        fetched = {id(w): v for w, v in zip(on_device, values)}
        return [[fetched[id(w)] if id(w) in fetched else float(w) for w in ws]
                for ws in counts]
    return [[float(w) for w in ws] for ws in counts]


class BatchLosses:
    """The losses one product saw, each with the index of the batch it belongs to (several
    per batch with microbatching), checked for NaN/inf with one host read-back per
    product. The same read-back finishes the check of the product's vectors when given
    it (:class:`~torchcurv.operators.base.FiniteCheck`) and the checks the walk over the
    data deferred to it (:meth:`defer`)."""

    def __init__(self) -> None:
        self.values: list[torch.Tensor] = []
        self.batch_index: list[int] = []
        self.deferred: list[tuple[torch.Tensor, Callable[[float], None]]] = []

    def add(self, index: int, loss: torch.Tensor) -> None:
        # a loss computed without grad is outside any graph already: no detach
        value = loss.detach() if loss.requires_grad else loss
        self.values.append(value if value.dim() == 0 else value.reshape(()))
        self.batch_index.append(index)

    def defer(self, value: torch.Tensor, check: Callable[[float], None]) -> None:
        """Read the one-entry tensor ``value`` back with the losses and call ``check`` on
        it (which raises if it is wrong), after the vectors' check and before the
        losses'."""
        self.deferred.append((value.reshape(()), check))

    def _bad(self, inputs: FiniteCheck | None = None) -> list[int]:
        """Positions in :attr:`values` of the non-finite losses; first the
        :class:`~torchcurv.OperatorInputError` of non-finite vectors in ``inputs``, then
        the errors of the deferred checks."""
        values = self.values
        scalars = values if inputs is None else [*values, inputs.total]
        # the one host read-back: the sum of the losses and of the vectors' entries,
        # finite only if every term is (a sum that overflows goes on to the
        # term-by-term checks, which clear it), and the deferred checks' values
        head = ([scalars[0] if len(scalars) == 1 else torch.stack(scalars).sum()]
                if scalars else [])
        read = head + [v for v, _ in self.deferred]
        if not read:
            return []
        got = [read[0].item()] if len(read) == 1 else torch.stack(read).tolist()
        finite = not head or cmath.isfinite(got[0])
        if not finite and inputs is not None:
            inputs.refuse()
        for (_, check), value in zip(self.deferred, got[len(head):]):
            check(value)
        if finite or not values:
            return []
        ok = torch.isfinite(torch.stack(values)).tolist()
        return [j for j, good in enumerate(ok) if not good]

    def nonfinite_batches(self, inputs: FiniteCheck | None = None) -> list[int]:
        """Sorted indices of the batches with a NaN/inf loss (on any of their pieces);
        first the :class:`~torchcurv.OperatorInputError` of non-finite vectors in
        ``inputs``."""
        return sorted({self.batch_index[j] for j in self._bad(inputs)})

    def raise_if_not_finite(self, inputs: FiniteCheck | None = None) -> None:
        """:class:`~torchcurv.NonFiniteLossError` naming the batches with a NaN/inf loss;
        first the :class:`~torchcurv.OperatorInputError` of non-finite vectors in
        ``inputs``."""
        bad = self._bad(inputs)
        if bad:
            batches = sorted({self.batch_index[j] for j in bad})
            raise NonFiniteLossError(
                f"the loss is not finite on batch(es) {batches[:10]} "
                f"(value {float(self.values[bad[0]])}); the curvature there is undefined"
            )


def _keywords_outside(cls: type, config_type: type[CurvatureConfig]) -> list[str]:
    """The keywords of ``cls``'s constructors (down to :class:`CurvatureOperator`) that
    ``config_type`` has no field for: a subclass that keeps its own arguments outside the
    configuration, which :meth:`CurvatureOperator.replace` cannot rebuild."""
    fields = set(config_type.field_names())
    missing: list[str] = []
    for klass in cls.__mro__:
        if klass is CurvatureOperator:
            break
        if not issubclass(klass, CurvatureOperator) or "__init__" not in vars(klass):
            continue
        for name, p in inspect.signature(vars(klass)["__init__"]).parameters.items():
            if p.kind is p.KEYWORD_ONLY and name not in fields and name not in missing:
                missing.append(name)
    return missing
