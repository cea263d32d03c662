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

With ``order="jvp"`` (products that need forward-mode AD and first-order backward only,
as the GGN's ``jvp="forward"``, or forward mode over a first-order backward, as the
Hessian's ``method="forward_over_reverse"``), SDPA calls that the Triton kernel of
:mod:`torchcurv.kernels.flash_attention` handles go there instead (CUDA with triton
installed): exact like the math backend, but without the ``(T, T)`` matrix. The default
``order="second"`` keeps the math backend for every call, because that kernel has no
double backward.

Attention that does not go through SDPA (the ``flash-attn`` package behind HuggingFace's
``"flash_attention_2"``, custom Triton kernels) is untouched by this and still fails
second-order products; load such models with ``attn_implementation="eager"`` or ``"sdpa"``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Literal, get_args

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

from torchcurv.kernels.flash_attention import flash_attention, unsupported_reason
from torchcurv.kernels.triton_env import triton_installed, triton_interpreter_active

AttentionOrder = Literal["second", "jvp"]
ORDERS: tuple[AttentionOrder, ...] = get_args(AttentionOrder)

# The flags are process-wide: products in several threads share one restriction, entered
# by the first and lifted by the last, so that interleaved exits cannot restore a stale
# choice (leaving the math backend on for good, or fused kernels back mid-product).
_LOCK = threading.Lock()
_ACTIVE: list[Callable[[], None]] = []  # how to give the backends back, one per outermost block
_DEPTH = 0
# The orders of this thread's open blocks: the kernel serves an SDPA call only when every
# one of them is "jvp" (an enclosing "second" block may differentiate it twice).
_ORDERS = threading.local()
_SDPA = torch.nn.functional.scaled_dot_product_attention
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale",
              "enable_gqa")


def _sdpa_flags() -> list[tuple[Callable[[], bool], Callable[[bool], None], bool]] | None:
    """``(get, set, is_math)`` for each of SDPA's backend flags, read from the table that
    ``sdpa_kernel`` itself uses, or ``None`` where that private table is missing."""
    try:
        from torch.nn.attention import _backend_names

        return [(getattr(torch._C, f"_get_{name}_sdp_enabled"),
                 getattr(torch._C, f"_set_sdp_use_{name}"), name == "math")
                for name in _backend_names]
    except (ImportError, AttributeError):
        return None


# Every product enters the restriction; setting the flags directly costs a few calls, a
# fraction of ``sdpa_kernel``'s (which is the fallback).
_FLAGS = _sdpa_flags()


def _math_only() -> Callable[[], None]:
    """Leave only SDPA's math backend on; returns what puts the previous flags back."""
    if _FLAGS is None:
        block = sdpa_kernel(SDPBackend.MATH)
        block.__enter__()

        def leave() -> None:
            block.__exit__(None, None, None)
        return leave
    before = []
    for get, set_flag, is_math in _FLAGS:
        on = get()
        before.append((set_flag, on))
        if on != is_math:
            set_flag(is_math)

    def restore() -> None:
        for set_flag, on in before:
            set_flag(on)
    return restore


class _FlashSdpa(TorchFunctionMode):
    """Sends supported SDPA calls of this thread to the Triton kernel, others on unchanged
    (to the math backend that the enclosing block leaves on)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _SDPA and all(order == "jvp" for order in _thread_orders()):
            call: dict[str, Any] = dict(zip(_SDPA_ARGS, args), **kwargs)
            if set(call) <= set(_SDPA_ARGS) and unsupported_reason(**call) is None:
                call.pop("dropout_p", None)
                return flash_attention(**call)
        return func(*args, **kwargs)


def _thread_orders() -> list[str]:
    if not hasattr(_ORDERS, "stack"):
        _ORDERS.stack = []
    return _ORDERS.stack


def _kernel_may_apply() -> bool:
    # Without a device the kernel can run on, no mode is entered: the mode's Python hook
    # would see every torch call of the product for nothing.
    return triton_installed() and (torch.cuda.is_available() or triton_interpreter_active())


def differentiable_attention(order: AttentionOrder = "second"
                            ) -> AbstractContextManager[None]:
    """Restrict SDPA to its math backend inside the block; restore the caller's choice after.

    ``order="second"``: products may differentiate attention twice in reverse mode (the
    exact Hessian by ``method="autograd"``, ``jvp="double_vjp"``), so every SDPA call
    takes the math backend. ``order="jvp"``: they need at most forward-mode AD and a
    first-order backward, possibly forward mode through that backward (the GGN with
    ``jvp="forward"``, the Hessian with ``method="forward_over_reverse"``); this thread's
    SDPA calls that
    :func:`~torchcurv.kernels.flash_attention.unsupported_reason` accepts (CUDA tensors,
    triton installed; CPU tensors only under ``TRITON_INTERPRET=1``) run the Triton
    kernel, the rest the math backend. A "jvp" block nested in a "second" one (or the
    reverse) uses the math backend throughout. On a machine without CUDA both orders
    behave alike.

    The backend flags are process-wide (not per thread), as for
    ``torch.nn.attention.sdpa_kernel`` itself, which this wraps: the backends enabled when
    the first of any concurrent (or nested) blocks began come back when the last one
    ends, also on exceptions, and nesting inside a caller's own ``sdpa_kernel`` block
    works.

    The math backend materialises the ``(B, heads, T, T)`` attention matrix, so attention
    memory during a product grows as ``T^2`` where a fused kernel would use ``O(T)``.

    A context manager object rather than a generator's: every product enters it, and a
    generator-based one costs several times as much.
    """
    return _Restriction(order)


class _Restriction:
    """The block of :func:`differentiable_attention` (``order`` is checked on entry)."""

    __slots__ = ("flash", "order")

    def __init__(self, order: AttentionOrder) -> None:
        self.order = order
        self.flash: _FlashSdpa | None = None

    def __enter__(self) -> None:
        global _DEPTH
        order = self.order
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
        with _LOCK:
            if _DEPTH == 0:
                _ACTIVE.append(_math_only())
            _DEPTH += 1
        try:
            _ORDERS.stack.append(order)
        except AttributeError:
            _thread_orders().append(order)
        if order == "jvp" and _kernel_may_apply():
            try:
                flash = _FlashSdpa()
                flash.__enter__()
            except BaseException:
                self._leave()
                raise
            self.flash = flash

    def __exit__(self, *exc: Any) -> None:
        flash, self.flash = self.flash, None
        try:
            if flash is not None:
                flash.__exit__(*exc)
        finally:
            self._leave()

    @staticmethod
    def _leave() -> None:
        global _DEPTH
        _ORDERS.stack.pop()
        with _LOCK:
            _DEPTH -= 1
            if _DEPTH == 0:
                _ACTIVE.pop()()

