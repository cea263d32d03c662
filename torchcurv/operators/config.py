"""The construction arguments of the curvature operators, as one frozen value.

Every operator built from ``(model, criterion, data)`` keeps the arguments it was built
with as a :class:`CurvatureConfig` (``op.config``), and ``op.replace(**changes)`` builds
a new operator of the same class from it with some fields changed, as
``dataclasses.replace`` does. The constructors take these fields as keywords (after the
positional ``model, criterion, data``), so the fields below are the one list of them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from typing_extensions import Self, TypedDict

from torchcurv.derivatives.hessian import HessianMethod
from torchcurv.objectives import Objective
from torchcurv.operators.jacobian import JvpMethod
from torchcurv.operators.memory import MaxMemory, check_max_memory

Batch = Any

_POSITIONAL = ("model", "criterion", "data")


class CurvatureOptions(TypedDict, total=False):
    """The keyword arguments every curvature operator takes (:class:`CurvatureConfig`'s
    fields after ``model, criterion, data``), for typing ``**options``."""

    params: Iterable[torch.Tensor] | None
    param_filter: str | Sequence[str] | None
    check_deterministic: bool
    process_group: Any
    distributed: bool | None
    debug_distributed: bool
    microbatch_size: int | None
    compile: bool
    max_memory: MaxMemory
    cuda_graphs: bool


@dataclass(frozen=True, eq=False, repr=False)
class CurvatureConfig:
    """What a curvature operator is built from; the same for every operator class.

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
        compile: run each batch's derivative under ``torch.compile`` (chosen once; the
            first product per batch shape and block width pays the compile). Only the
            ``torch.func`` paths have one: ``method="forward_over_reverse"`` and
            ``"finite_difference"`` (its gradients), ``jvp="forward"``; any other method
            raises a ``ValueError`` at construction (docs/performance.md).
        max_memory: the bytes one product may take at its peak (above what is allocated
            when it starts), for ``matmat`` of a block that would not fit as one product
            (:mod:`torchcurv.operators.memory`). Where the model treats the examples of a
            batch independently (``op.batch_splitting``, decided here: the checks of
            ``microbatch_size``, and with ``check_deterministic`` the first batch's loss
            against its halves'; not for the Monte-Carlo Fisher, whose labels depend on
            the split, nor for one pass over the data per vector or ``cuda_graphs``),
            the block stays one product and every batch is walked in the largest
            microbatches whose predicted peak fits: the shared forward and first
            backward run once per microbatch for all vectors, and the matrix is the same
            to rounding. Otherwise, or where not even one example per microbatch fits,
            the block goes in sub-blocks of columns on whole batches, a single vector
            never split. ``op.block_plan`` says which was chosen. ``"auto"`` (default): a
            share of the CUDA device's free memory at each product, no limit off CUDA;
            ``None``: never split. The first block product that needs a split measures
            its first columns (1, 2, then 4 vectors on whole batches; then 2 and 4 on
            microbatches of half the largest batch) to learn the peak per vector and per
            example, and later ones reuse that; :meth:`memory_estimate` predicts it. On
            CUDA those measurements reset ``torch.cuda``'s peak-memory statistic.
        cuda_graphs: record each batch's product as a CUDA graph at the first product of
            each block width and replay it afterwards (:mod:`torchcurv.operators.graphs`):
            for models whose products are bound by launching kernels, not by the GPU.
            The first product costs about three; the model's code runs only while
            recording. For the per-batch products (``method="autograd"`` or
            ``"forward_over_reverse"``, the GGN and empirical Fisher); other methods
            raise a ``ValueError`` at construction.
    """

    model: nn.Module
    criterion: nn.Module | Objective
    data: Iterable[Batch]
    params: Iterable[torch.Tensor] | None = None
    param_filter: str | Sequence[str] | None = None
    check_deterministic: bool = True
    process_group: Any = None
    distributed: bool | None = None
    debug_distributed: bool = False
    microbatch_size: int | None = None
    compile: bool = False
    max_memory: MaxMemory = "auto"
    cuda_graphs: bool = False

    def __post_init__(self) -> None:
        check_max_memory(self.max_memory)
        if self.params is not None:  # an iterator would be used up by the first build
            object.__setattr__(self, "params", tuple(self.params))

    @classmethod
    def of(cls, owner: str, model: nn.Module, criterion: nn.Module | Objective,
           data: Iterable[Batch], **options: Any) -> Self:
        """The configuration of ``owner``'s constructor call; unknown keywords raise a
        ``TypeError`` listing the valid ones."""
        cls._check_names(owner, options)
        return cls(model, criterion, data, **options)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def _check_names(cls, owner: str, names: Iterable[str]) -> None:
        unknown = sorted(set(names) - set(cls.field_names()))
        if unknown:
            raise TypeError(
                f"{owner} got unknown argument(s) {unknown}; valid: "
                f"{', '.join(cls.field_names())}"
            )

    def replace(self, owner: str = "replace", **changes: Any) -> Self:
        """A copy with ``changes`` (as ``dataclasses.replace``; unknown names raise a
        ``TypeError`` listing the fields)."""
        self._check_names(owner, changes)
        return dataclasses.replace(self, **changes)

    def keywords(self) -> dict[str, Any]:
        """The fields after ``model, criterion, data``: the constructor's keywords."""
        return {name: getattr(self, name) for name in self.field_names()
                if name not in _POSITIONAL}

    def changed(self) -> dict[str, Any]:
        """``model``, ``criterion``, ``data`` and the fields that differ from their
        defaults (compared by identity and ``==`` on plain values)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.default is dataclasses.MISSING or not _same(value, f.default):
                out[f.name] = value
        return out

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={_short(v)}" for k, v in self.changed().items())
        return f"{type(self).__name__}({fields})"


@dataclass(frozen=True, eq=False, repr=False)
class HessianConfig(CurvatureConfig):
    """:class:`CurvatureConfig` and the Hessian's ``method``
    (:class:`~torchcurv.HessianOperator`)."""

    method: HessianMethod = "autograd"


@dataclass(frozen=True, eq=False, repr=False)
class OutputSpaceConfig(CurvatureConfig):
    """:class:`CurvatureConfig` and the ``jvp`` method of the ``Jᵀ C J`` operators."""

    jvp: JvpMethod = "forward"


@dataclass(frozen=True, eq=False, repr=False)
class MCFisherConfig(OutputSpaceConfig):
    """:class:`OutputSpaceConfig` and the Monte-Carlo Fisher's draws
    (:class:`~torchcurv.MCFisherOperator`); ``generator`` is a copy in the state the
    given one had at construction, so a rebuilt operator draws the same labels."""

    mc_samples: int = 1
    seed: int = 0
    generator: torch.Generator | None = None
    per_batch_seeds: bool | None = None


@dataclass(frozen=True, eq=False, repr=False)
class KFACConfig(CurvatureConfig):
    """:class:`CurvatureConfig` and the Kronecker-factored operators' own arguments
    (:class:`~torchcurv.KFACOperator`, :class:`~torchcurv.EKFACOperator`; the values
    are checked there). ``generator`` is a copy in the state the given one had at
    construction, as for :class:`MCFisherConfig`."""

    fisher_type: str = "mc"
    kfac_approx: str = "expand"
    mc_samples: int = 1
    seed: int = 0
    generator: torch.Generator | None = None
    per_batch_seeds: bool | None = None
    separate_weight_and_bias: bool = True


def snapshot(generator: torch.Generator | None) -> torch.Generator | None:
    """A new generator in ``generator``'s current state (``None`` stays ``None``)."""
    if generator is None:
        return None
    copy = torch.Generator(device=generator.device)
    copy.set_state(generator.get_state())
    return copy


def _same(value: Any, default: Any) -> bool:
    if value is default:
        return True
    if isinstance(value, (bool, int, float, str, type(None))) and type(value) is type(default):
        return bool(value == default)
    return False


def _short(value: Any) -> str:
    """A one-line description: a model or a data set by its type (and length), not its
    full repr."""
    if isinstance(value, nn.Module) and not list(value.parameters(recurse=False)) and \
            not list(value.children()):
        return repr(value)  # a loss module: CrossEntropyLoss(), MSELoss()
    if isinstance(value, nn.Module):
        return f"<{type(value).__name__}>"
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], torch.Tensor) \
            and not isinstance(value, torch.Tensor):
        return f"<{len(value)} tensors>"
    if isinstance(value, (list, tuple)):
        return f"<{type(value).__name__} of {len(value)}>"
    if isinstance(value, (bool, int, float, str, type(None))):
        return repr(value)
    return f"<{type(value).__name__}>"
