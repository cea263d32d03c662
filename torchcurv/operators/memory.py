"""How much memory a curvature product takes, measured, and the budget that blocks obey.

A product's peak grows with the number ``m`` of vectors it multiplies at once (a block
shares one forward and one first backward per batch, but every vector adds its own
second-order pass), close to ``peak(m) = fixed + m * per_vector`` above what was
allocated before it. :class:`PeakMeter` measures one product's peak;
:class:`MemoryEstimate` is the line through measured points, used to predict a block's
peak (``op.memory_estimate(m)``) and to split blocks that would not fit a budget
(``max_memory=``, :mod:`torchcurv.operators.config`). Walking the batches in
microbatches of ``b`` examples shrinks both parts, close to linearly in ``b``:
:class:`MicrobatchMemory` is that model, from lines measured on whole and on half
batches, and :class:`BlockPlan` the split a budget chose.

How the peak is measured:

- CUDA: the caching allocator's peak (``torch.cuda.max_memory_allocated``), reset at the
  start of the measured product: every allocation counts, the model's included, exactly
  as ``torch.cuda`` reports it (this resets the process's peak statistic).
- other devices (CPU): the bytes of the tensor storages created by torch operators inside
  the product and still alive, tracked by a dispatch mode (``TorchDispatchMode``), so the
  allocator's own overhead and memory held outside torch (a data loader's buffers) are
  not seen. Tracking costs Python time per operator; only measured products pay it.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

MaxMemory = int | Literal["auto"] | None

#: the share of the device's free memory that ``max_memory="auto"`` lets a block use
AUTO_FRACTION = 0.85


class PeakMeter:
    """``with PeakMeter(device) as meter: ...`` then ``meter.peak``: the peak bytes
    allocated inside the block above what was allocated when it began.

    On CUDA this resets the process's ``torch.cuda.max_memory_allocated`` statistic.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.peak = 0
        self._mode: _LiveStorageBytes | None = None
        self._start = 0

    @property
    def method(self) -> str:
        """How the peak is measured (see the module's docstring)."""
        return ("cuda allocator peak" if self.device.type == "cuda"
                else "live tensor storages (dispatch mode)")

    def __enter__(self) -> PeakMeter:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._mode = _LiveStorageBytes()
            self._mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._start
        else:
            assert self._mode is not None
            self._mode.__exit__(*exc)
            self.peak = self._mode.peak


class _LiveStorageBytes(TorchDispatchMode):
    """The peak of the bytes held by storages that torch operators create inside it.

    A storage counts from the operator that returns it until Python frees it (a weak
    reference's callback); views share their base's storage and count once. Outputs of
    ``torch.func`` transforms that wrap other tensors have no storage of their own and
    are skipped (the tensors they wrap were counted when they were made).
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._held: dict[int, Any] = {}

    def _release(self, key: int, nbytes: int) -> None:
        if self._held.pop(key, None) is not None:
            self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            try:
                storage = t.untyped_storage()
                key = storage.data_ptr()
            except RuntimeError:  # a functorch wrapper: no storage of its own
                continue
            nbytes = storage.nbytes()
            if nbytes == 0 or key in self._held:
                continue
            self._held[key] = weakref.ref(
                storage, lambda _, key=key, nbytes=nbytes: self._release(key, nbytes))
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        return out


@dataclass(frozen=True)
class MemoryEstimate:
    """The peak memory of one product with ``m`` vectors, from measured products.

    Attributes:
        m: the block size asked about.
        bytes: the predicted peak of a product of ``m`` vectors, above the memory
            allocated before it (the model, the data already on the device).
        fixed_bytes: the part that does not grow with the block (intercept of the line).
        per_vector_bytes: what every further vector adds (slope of the line).
        measured: the ``(block size, peak bytes)`` points the line comes from.
        method: how the peaks were measured (:class:`PeakMeter`).
    """

    m: int
    bytes: int
    fixed_bytes: int
    per_vector_bytes: int
    measured: tuple[tuple[int, int], ...]
    method: str

    @classmethod
    def fit(cls, measured: Sequence[tuple[int, int]], m: int, method: str) -> MemoryEstimate:
        """The estimate for ``m`` vectors from measured ``(size, peak)`` points.

        A one-vector product often takes its own (unbatched) path, so the line goes
        through the two largest measured blocks, and ``m = 1`` is answered by its
        measurement when there is one. With a single point the line goes through the
        origin (every byte counted as per-vector), an upper bound for larger blocks.
        """
        points = sorted(dict(measured).items())
        if not points:
            raise ValueError("no measured product to estimate from")
        if len(points) == 1 or points[-1][0] == 1:
            size, peak = points[-1]
            fixed, slope = 0, math.ceil(peak / size)
        else:
            (m1, p1), (m2, p2) = points[-2], points[-1]
            slope = max(0, math.ceil((p2 - p1) / (m2 - m1)))
            fixed = max(0, p2 - slope * m2)
        exact = dict(points).get(m)
        predicted = exact if exact is not None else fixed + slope * m
        return cls(m=m, bytes=int(predicted), fixed_bytes=int(fixed),
                   per_vector_bytes=int(slope), measured=tuple(points), method=method)

    def at(self, m: int) -> MemoryEstimate:
        """The same line, asked about ``m`` vectors."""
        return MemoryEstimate.fit(self.measured, m, self.method)

    def max_vectors(self, budget: int) -> int:
        """The largest block whose predicted peak fits ``budget`` bytes (at least 1: a
        single vector is never split further)."""
        if self.per_vector_bytes <= 0:
            return 1 << 30
        return max(1, int((budget - self.fixed_bytes) // self.per_vector_bytes))

    def __str__(self) -> str:
        return (f"{format_bytes(self.bytes)} for {self.m} vector(s) "
                f"({format_bytes(self.fixed_bytes)} + {format_bytes(self.per_vector_bytes)} "
                f"per vector; {self.method})")


@dataclass(frozen=True)
class MicrobatchMemory:
    """The peak of one product of ``m`` vectors whose batches are walked in microbatches
    of at most ``b`` examples: ``F(b) + m * S(b)``, with the fixed part ``F`` and the
    per-vector part ``S`` each linear in ``b``.

    The examples a microbatch holds are what its forward and each vector's tangent
    pass keep alive, so both parts grow with ``b``; what does not (the result and the
    tangents of parameter size, per vector) is their value at ``b = 0``. ``whole`` is
    the line in ``m`` measured on whole batches of ``examples`` (the largest), ``split``
    the one measured on microbatches of ``split_examples``; between and below them the
    two lines are interpolated (and extrapolated, never below zero).

    Attributes:
        whole, examples: the line measured on whole batches and their largest size.
        split, split_examples: the line measured on microbatches and their size.
    """

    whole: MemoryEstimate
    examples: int
    split: MemoryEstimate
    split_examples: int

    def bytes(self, m: int, b: int) -> int:
        """The predicted peak of ``m`` vectors on microbatches of ``b`` examples."""
        t = (b - self.split_examples) / (self.examples - self.split_examples)
        fixed = self.split.fixed_bytes + t * (self.whole.fixed_bytes - self.split.fixed_bytes)
        slope = (self.split.per_vector_bytes
                 + t * (self.whole.per_vector_bytes - self.split.per_vector_bytes))
        return int(max(0.0, fixed) + m * max(0.0, slope))

    @property
    def per_example_vector_bytes(self) -> int:
        """What one more example of a microbatch adds per vector (``dS/db``)."""
        return max(0, int((self.whole.per_vector_bytes - self.split.per_vector_bytes)
                          / (self.examples - self.split_examples)))

    def max_examples(self, m: int, budget: int) -> int:
        """The largest microbatch (below ``examples``) on which ``m`` vectors are
        predicted to fit ``budget`` bytes, made as even as the same number of pieces
        allows; 0 where not even one example fits."""
        fits = [b for b in range(1, self.examples) if self.bytes(m, b) <= budget]
        if not fits:
            return 0
        pieces = math.ceil(self.examples / max(fits))
        return math.ceil(self.examples / pieces)


@dataclass(frozen=True)
class BlockPlan:
    """How a budgeted block product was split (``op.block_plan``).

    Attributes:
        split: ``"none"`` (the block fit as one product), ``"microbatches"`` (the block
            in one product, every batch walked in microbatches) or ``"columns"``
            (sub-blocks of columns, whole batches).
        vectors: the columns per product.
        microbatch_size: the examples per microbatch for ``"microbatches"``, else
            ``None``.
        predicted_bytes: the predicted peak of one such product.
    """

    split: Literal["none", "microbatches", "columns"]
    vectors: int
    microbatch_size: int | None
    predicted_bytes: int


def format_bytes(n: float) -> str:
    """``n`` bytes in the binary unit that keeps 1 to 1023 of them: ``"3.20 GiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def check_max_memory(value: Any) -> None:
    """Raise a ``ValueError`` unless ``value`` is a positive number of bytes, ``"auto"`` or
    ``None``."""
    if value is None or value == "auto":
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0 \
            or not math.isfinite(value):
        raise ValueError(
            f"max_memory must be a positive number of bytes, 'auto' or None, got {value!r}")


def budget_bytes(max_memory: MaxMemory, device: torch.device) -> int | None:
    """The bytes a block product may use now: ``max_memory`` itself, or for ``"auto"``
    :data:`AUTO_FRACTION` of the CUDA device's free memory (the allocator's cached but
    unused memory included); ``None`` (no limit) for ``None`` and for ``"auto"`` off CUDA,
    where nothing cheap tells the memory a product may take."""
    if max_memory is None:
        return None
    if max_memory != "auto":
        return int(max_memory)
    if device.type != "cuda":
        return None
    return int(AUTO_FRACTION * _available(device))


def _available(device: torch.device) -> int:
    """The CUDA device's free memory, the allocator's cached but unused memory included."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def basis_bytes(n: int, vectors: int, dtype: torch.dtype) -> int:
    """Bytes of a Krylov basis of ``vectors`` vectors of length ``n`` in ``dtype``."""
    return n * vectors * torch.empty((), dtype=dtype).element_size()


def basis_device(op: Any, vectors: int, dtype: torch.dtype, block_size: int = 1
                 ) -> torch.device:
    """Where a Krylov basis of ``vectors`` rows should live for ``basis_device="auto"``:
    the operator's device when the basis and one product of ``block_size`` vectors fit
    in :data:`AUTO_FRACTION` of its free memory together, else host memory.

    Off CUDA, always the operator's device. The product's peak comes from
    ``op.memory_estimate(block_size)`` where the operator has one (which measures
    products once if none were measured yet); other operators count as taking nothing.
    """
    device = torch.device(op.device)
    if device.type != "cuda":
        return device
    product = op.memory_estimate(block_size).bytes if hasattr(op, "memory_estimate") else 0
    fits = basis_bytes(op.n, vectors, dtype) + product <= AUTO_FRACTION * _available(device)
    return device if fits else torch.device("cpu")
