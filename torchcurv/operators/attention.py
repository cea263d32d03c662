"""An attention path that autograd can differentiate twice and forward-mode AD can push.

``torch.nn.functional.scaled_dot_product_attention`` dispatches to fused kernels (flash,
memory-efficient, cuDNN on CUDA; a flash kernel on CPU) whose backward has no derivative
of its own and which have no forward-mode rule. Hessian-vector products (double backward)
and exact GGN products (a JVP) through them raise, e.g. ``derivative for
aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented`` on CPU or
``..._efficient_attention_backward`` on CUDA. HuggingFace models load with
``attn_implementation="sdpa"`` by default, so every curvature product runs inside
:func:`differentiable_attention`, which leaves only the math backend: plain matmuls and a
softmax, differentiable to any order.

Attention that does not go through SDPA (the ``flash-attn`` package behind HuggingFace's
``"flash_attention_2"``, custom Triton kernels) is untouched by this and still fails
second-order products; load such models with ``attn_implementation="eager"`` or ``"sdpa"``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

from torch.nn.attention import SDPBackend, sdpa_kernel

# The flags are process-wide: products in several threads share one restriction, entered
# by the first and lifted by the last, so that interleaved exits cannot restore a stale
# choice (leaving the math backend on for good, or fused kernels back mid-product).
_LOCK = threading.Lock()
_ACTIVE: list[ExitStack] = []
_DEPTH = 0


@contextmanager
def differentiable_attention() -> Iterator[None]:
    """Restrict SDPA to its math backend inside the block; restore the caller's choice after.

    The backend flags are process-wide (not per thread), as for
    ``torch.nn.attention.sdpa_kernel`` itself, which this wraps: the backends enabled when
    the first of any concurrent (or nested) blocks began come back when the last one
    ends, also on exceptions, and nesting inside a caller's own ``sdpa_kernel`` block
    works.

    The math backend materialises the ``(B, heads, T, T)`` attention matrix, so attention
    memory during a product grows as ``T^2`` where a fused kernel would use ``O(T)``.
    """
    global _DEPTH
    with _LOCK:
        if _DEPTH == 0:
            stack = ExitStack()
            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
            _ACTIVE.append(stack)
        _DEPTH += 1
    try:
        yield
    finally:
        with _LOCK:
            _DEPTH -= 1
            if _DEPTH == 0:
                _ACTIVE.pop().close()
