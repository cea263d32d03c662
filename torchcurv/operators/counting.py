"""The one count of products, kept alike by operators and their SciPy/CuPy adapters."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

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
