"""Softmax cross-entropy loss-Hessian times a block of vectors, over logits.

For logits ``z_r`` (one row per token) the Hessian of ``-log softmax(z_r)[y]`` with respect
to ``z_r`` is ``diag(p_r) - p_r p_r^T`` with ``p_r = softmax(z_r)``, whatever the target.
So the product with a direction ``u_r`` is

    out_r = w_r * (p_r * u_r - p_r * <p_r, u_r>)

where ``w_r`` is the row's share of the loss: ``1/n`` for a mean over ``n`` counted rows,
``1`` for a sum, ``0`` for ignored/masked rows. Label smoothing does not change the
matrix: the smoothed loss ``-sum_c q_c log p_c`` has weights ``q`` summing to one and
``log p_c = z_c - logsumexp(z)`` is linear in ``z`` but for the ``logsumexp``, so its
Hessian is again ``diag(p) - p p^T``; only ``w_r`` moves (see
:func:`cross_entropy_row_weights`, which reproduces ``F.cross_entropy`` exactly).

:func:`_ce_hessian_matmat_eager` is the specification; the ``"compile"`` backend is
``torch.compile`` of it and ``"triton"`` is the fused kernel in
:mod:`torchcurv.kernels.ce_hvp_triton`, tested equal to it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Literal, get_args

import torch

from torchcurv.dtypes import accumulation_dtype
from torchcurv.errors import MissingExtraError, OperatorInputError
from torchcurv.kernels.triton_env import triton_installed as _triton_installed
from torchcurv.kernels.triton_env import triton_interpreter_active

CEBackend = Literal["auto", "eager", "compile", "triton"]
Reduction = Literal["mean", "sum"]
REDUCTIONS: tuple[Reduction, ...] = get_args(Reduction)
BACKENDS: tuple[CEBackend, ...] = get_args(CEBackend)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def ce_hessian_matmat(
    logits: torch.Tensor,
    U: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    backend: CEBackend = "auto",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy loss-Hessian (w.r.t. the logits) times ``U``, row by row.

    ``out[..., r, :] = w_r * (p_r * u_r - p_r * <p_r, u_r>)`` with ``p = softmax(logits)``.

    Args:
        logits: ``(N, V)`` logits, float16/bfloat16/float32 (float64 also works; it is
            computed in float64).
        U: directions, ``(N, V)`` or a block ``(M, N, V)`` of ``M`` right-hand sides that
            share the softmax statistics of ``logits``; any supported float dtype.
        weights: ``(N,)`` floating per-row scale, the row's share of the loss
            (``cross_entropy_row_weights`` builds it from targets); ``None`` means 1
            (sum reduction, nothing masked).
        backend: ``"eager"`` (the specification in torch ops), ``"compile"``
            (``torch.compile`` of it, cached), ``"triton"`` (the fused kernel; CUDA, or the
            CPU interpreter under ``TRITON_INTERPRET=1``), or ``"auto"``: triton on CUDA
            when it is installed, else compile on CUDA, else eager.
        out: optional preallocated result, ``U``'s shape and dtype, on its device,
            innermost dimension contiguous; every element is written.

    Returns:
        ``U``'s shape and dtype. The softmax and the sums run in float32 (float64 when
        ``logits`` or ``U`` is float64) and are rounded once at the end. Not differentiable.

    Raises:
        OperatorInputError: wrong shape, dtype or device of an input.
        ValueError: unknown ``backend``.
        MissingExtraError: ``backend="triton"`` without triton installed.
    """
    _check_inputs(logits, U, weights, out)
    name = _resolve_backend(backend, logits.device.type, _triton_installed())
    with torch.no_grad():
        if name == "triton":
            from torchcurv.kernels.ce_hvp_triton import ce_hessian_matmat_triton

            return ce_hessian_matmat_triton(logits, U, weights, out=out)
        if name == "compile":
            result = _run_compiled(logits, U, weights)
        else:
            result = _ce_hessian_matmat_eager(logits, U, weights)
        if out is None:
            return result
        return out.copy_(result)


def _ce_hessian_matmat_eager(
    logits: torch.Tensor, U: torch.Tensor, weights: torch.Tensor | None
) -> torch.Tensor:
    """The specification: softmax in the accumulation dtype, one rounding at the end."""
    acc = accumulation_dtype(logits.dtype, U.dtype)
    p = torch.softmax(logits.to(acc), dim=-1)
    pu = p * U.to(acc)
    result = pu - p * pu.sum(dim=-1, keepdim=True)
    if weights is not None:
        result = result * weights.to(acc).unsqueeze(-1)
    return result.to(U.dtype)


@functools.cache
def _compiled_formula() -> Callable[..., torch.Tensor]:
    # Shape-polymorphic from the start: batch and vocabulary sizes vary between calls and
    # would otherwise spend dynamo's recompile limit (8 per function; sizes 0 and 1 are
    # still specialized). Past the limit dynamo runs the eager formula: slower, still right.
    return torch.compile(_ce_hessian_matmat_eager, dynamic=True)


def _run_compiled(
    logits: torch.Tensor, U: torch.Tensor, weights: torch.Tensor | None
) -> torch.Tensor:
    # One graph per dtype pair: U always (M, N, V) and weights always present (ones are exact).
    U3 = U if U.ndim == 3 else U.unsqueeze(0)
    if weights is None:
        weights = torch.ones(logits.shape[0], dtype=torch.float32, device=logits.device)
    return _compiled_formula()(logits, U3, weights).view(U.shape)


def cross_entropy_row_weights(
    target: torch.Tensor,
    *,
    num_classes: int,
    reduction: Reduction = "mean",
    ignore_index: int = -100,
    weight: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Per-row weights ``w`` such that ``ce_hessian_matmat(z, U, w)`` is the Hessian of
    ``F.cross_entropy(z, target, ...)`` with respect to ``z`` times ``U``.

    Follows torch's conventions (checked against autograd with torch 2.13): a mean divides
    by the number of counted rows, or with class ``weight`` by the sum of the counted rows'
    target-class weights, and it divides the smoothing term by the same number.

    Args:
        target: ``(N,)`` integer class indices; rows equal to ``ignore_index`` get 0.
        num_classes: ``V``, the number of logits per row (the smoothing term needs it).
        reduction: ``"mean"`` or ``"sum"`` (``"none"`` has no scalar loss to differentiate).
        ignore_index: target value of rows left out of the loss.
        weight: optional ``(V,)`` class weights, as in ``F.cross_entropy``.
        label_smoothing: in ``[0, 1]``, as in ``F.cross_entropy``.
        dtype: floating dtype of the result.

    Returns:
        ``(N,)`` weights on ``target``'s device. If every row is ignored, zeros (torch's
        mean loss is NaN there, 0/0).
    """
    if target.ndim != 1 or target.dtype.is_floating_point or target.dtype == torch.bool:
        raise OperatorInputError(
            "target must be an (N,) tensor of integer class indices, got "
            f"shape {tuple(target.shape)} and dtype {target.dtype}"
        )
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if weight is not None and tuple(weight.shape) != (num_classes,):
        raise OperatorInputError(
            f"class weight must have shape ({num_classes},), got {tuple(weight.shape)}"
        )
    if not dtype.is_floating_point:
        raise OperatorInputError(f"dtype must be floating, got {dtype}")

    work = torch.float64
    kept = target != ignore_index
    if weight is None and label_smoothing == 0:
        # the general formula's value with its no-op terms left out (one weight per
        # row, no smoothing: (1 - 0) t + 0 t is t), a few small kernels fewer per batch;
        # an unweighted total counts rows, so "all ignored" is total < 1. A sum's 0/1
        # weights are exact in any dtype: one conversion
        if reduction == "sum":
            return kept.to(dtype)
        counted = kept.to(work)
        return (counted / counted.sum().clamp_min(1)).to(dtype)
    counted = kept.to(work)
    if weight is None:
        target_term = counted
        smooth_term = counted
    else:
        class_w = weight.to(device=target.device, dtype=work)
        safe_target = torch.where(counted > 0, target, torch.zeros_like(target))
        target_term = counted * class_w[safe_target]
        # -(sum_c w_c log p_c) has Hessian (sum_c w_c)(diag p - p p^T); torch scales it by 1/V.
        smooth_term = counted * class_w.sum() / num_classes
    if reduction == "mean":
        total = target_term.sum()
        total = torch.where(total > 0, total, torch.ones_like(total))  # all ignored: zeros
        target_term, smooth_term = target_term / total, smooth_term / total
    eps = label_smoothing
    return ((1 - eps) * target_term + eps * smooth_term).to(dtype)


# -- dispatch and validation --------------------------------------------------------------


def _resolve_backend(backend: str, device_type: str, triton_installed: bool) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device_type == "cuda":
            return "triton" if triton_installed else "compile"
        return "eager"
    if backend == "triton":
        if not triton_installed:
            raise MissingExtraError("triton", "gpu", "ce_hessian_matmat(backend='triton')")
        if device_type != "cuda" and not triton_interpreter_active():
            raise OperatorInputError(
                f"backend='triton' needs CUDA tensors, got {device_type} "
                "(or set TRITON_INTERPRET=1 before importing triton to run it on the CPU)"
            )
    return backend


def _check_inputs(
    logits: torch.Tensor,
    U: torch.Tensor,
    weights: torch.Tensor | None,
    out: torch.Tensor | None,
) -> None:
    for name, t in (("logits", logits), ("U", U)):
        if not isinstance(t, torch.Tensor):
            raise OperatorInputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise OperatorInputError(
                f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}"
            )
    if logits.ndim != 2 or logits.shape[1] < 1:
        raise OperatorInputError(
            f"logits must have shape (N, V) with V >= 1, got {tuple(logits.shape)}"
        )
    if U.ndim not in (2, 3) or tuple(U.shape[-2:]) != tuple(logits.shape):
        n, v = logits.shape
        raise OperatorInputError(
            f"U must have shape ({n}, {v}) or (M, {n}, {v}) to match logits, got {tuple(U.shape)}"
        )
    if U.device != logits.device:
        raise OperatorInputError(f"U is on {U.device} but logits are on {logits.device}")
    if weights is not None:
        if not isinstance(weights, torch.Tensor) or not weights.dtype.is_floating_point:
            raise OperatorInputError("weights must be a floating-point torch.Tensor of shape (N,)")
        if tuple(weights.shape) != (logits.shape[0],):
            raise OperatorInputError(
                f"weights must have shape ({logits.shape[0]},), got {tuple(weights.shape)}"
            )
        if weights.device != logits.device:
            raise OperatorInputError(
                f"weights are on {weights.device} but logits are on {logits.device}"
            )
    if out is not None:
        if not isinstance(out, torch.Tensor):
            raise OperatorInputError(f"out must be a torch.Tensor, got {type(out).__name__}")
        if out.shape != U.shape or out.dtype != U.dtype or out.device != U.device:
            raise OperatorInputError(
                f"out must match U (shape {tuple(U.shape)}, {U.dtype}, {U.device}), got "
                f"shape {tuple(out.shape)}, {out.dtype}, {out.device}"
            )
        if out.stride(-1) != 1 and out.shape[-1] > 1:
            raise OperatorInputError("out must be contiguous along its last dimension")
