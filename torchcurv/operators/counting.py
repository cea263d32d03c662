"""The one count of products, kept alike by operators and their SciPy/CuPy adapters, and
the count of host read-backs that tests and benchmarks hold products to."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

# Per thread, the counters paused in it (id -> nesting depth): a check's products in one
# thread leave another thread's products counted.
_PAUSED = threading.local()


def _paused() -> dict[int, int]:
    if not hasattr(_PAUSED, "depth"):
        _PAUSED.depth = {}
    return _PAUSED.depth


class ProductCounter:
    """Counts the products made through an object.

    Attributes:
        num_matvecs: vectors multiplied so far (a block of ``m`` counts ``m``; a complex
            vector through an adapter counts 2, its real and imaginary parts).
        num_calls: product calls so far (a block counts once; an empty ``(n, 0)`` block,
            answered without a product, not at all).

    Updated without a lock: under concurrent products of one object they are not
    guaranteed exact (docs/guarantees.md).
    """

    num_matvecs: int = 0
    num_calls: int = 0

    def _count(self, columns: int) -> None:
        """Record one product of ``columns`` vectors (nothing for an empty block, or
        inside :meth:`uncounted` in this thread)."""
        if columns > 0 and not _paused().get(id(self)):
            self.num_matvecs += columns
            self.num_calls += 1

    @contextlib.contextmanager
    def uncounted(self) -> Iterator[None]:
        """Products made in this block, in this thread, are not counted.

        For work that checks an answer rather than computes it (the residuals of an
        eigensolver's result); products of other threads meanwhile are counted as usual.
        Reentrant.
        """
        paused = _paused()
        key = id(self)
        paused[key] = paused.get(key, 0) + 1
        try:
            yield
        finally:
            paused[key] -= 1
            if not paused[key]:
                del paused[key]


class HostReads(TorchDispatchMode):
    """Counts the reads of tensor values on the host in its block, in this thread
    (:attr:`count`): ``.item()``, ``float()``, ``bool()``, ``torch.equal`` and
    ``.tolist()``. On a GPU each one stalls the host until the device has caught up, so
    the launches after it start on an idle device. ``.tolist()`` dispatches no operator
    on the CPU (it reads the memory directly), so it is counted where Python calls it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self._lists = _ListReads(self)

    def __enter__(self) -> HostReads:
        self._lists.__enter__()
        try:
            super().__enter__()
        except BaseException:
            self._lists.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            super().__exit__(*exc)
        finally:
            self._lists.__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _READS:
            self.count += 1
        return func(*args, **(kwargs or {}))


_READS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.equal.default)


class _ListReads(TorchFunctionMode):
    """The ``.tolist()`` calls for :class:`HostReads`."""

    def __init__(self, reads: HostReads) -> None:
        super().__init__()
        self.reads = reads

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.tolist:
            self.reads.count += 1
        return func(*args, **(kwargs or {}))
