"""Flash-style attention with the derivatives an exact GGN product needs, as SDPA computes it.

``flash_attention(q, k, v, attn_mask, is_causal, scale, enable_gqa)`` equals
``torch.nn.functional.scaled_dot_product_attention`` (math backend, no dropout) and is
differentiable once in reverse mode and once in forward mode, through ``torch.func``
transforms included, without a ``(T, T)`` matrix in memory:

* forward: the online softmax keeps only the rows' log-sum-exp;
* backward: recomputes each tile of ``P`` from it (two kernels: ``dK, dV`` over key tiles,
  ``dQ`` over query tiles);
* JVP (the :class:`torch.autograd.Function` ``jvp`` rule): ``Ȯ = Ṗ V + P V̇`` with
  ``Ṗ = P ∘ (Ṡ - rowsum(P ∘ Ṡ))`` and ``Ṡ = scale (Q̇ Kᵀ + Q K̇ᵀ)``, tile by tile from the
  saved log-sum-exp;
* ``vmap``: a vmapped block of tangents or cotangents is folded into the batch axis and
  runs as one launch that reads one copy of the primals (``torch.func.jvp`` under
  ``vmap``, as the GGN's ``jvp="forward"`` products run it).

* JVP of the backward (forward over reverse: ``torch.func.jvp`` of ``torch.func.grad``,
  the exact Hessian's ``method="forward_over_reverse"``): the tangents of ``dQ, dK, dV``
  by the product rule through ``dS = P ∘ (dP - delta)``, with ``Ṗ = P ∘ (Ṡ - l̇se)``,
  ``dṖ = dȮ Vᵀ + dO V̇ᵀ``, ``deltȧ = rowsum(dȮ ∘ O + dO ∘ Ȯ)``; same tiles as the
  backward, ``P`` and ``Ṗ`` recomputed per tile.

Reverse-over-reverse (double backward, ``method="autograd"``) and derivatives of the JVP
are not implemented: they raise. That is why
:func:`torchcurv.operators.attention.differentiable_attention` routes SDPA here only
under ``order="jvp"`` (forward mode, first-order backward, forward over reverse).

Memory: the output, ``lse`` (``B * H * T`` floats) and, in the backward, float32 ``dQ, dK,
dV`` per query head (GQA groups are summed after). Masks are read tile by tile through
broadcast (stride 0) views over heads; a boolean mask is first turned into the additive
mask it equals, one ``(B, 1 or H, Tq, Tk)`` tensor of the query's dtype per launch. The
kernels are in :mod:`torchcurv.kernels.flash_attention_triton` (CUDA; on CPU tensors only under
triton's interpreter, ``TRITON_INTERPRET=1``, which the tests use).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from torchcurv.errors import OperatorInputError
from torchcurv.kernels.triton_env import triton_installed, triton_interpreter_active

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_HEAD_DIM = 128


def _kernels() -> Any:
    # Imported on first use: importing triton costs seconds and needs it installed.
    from torchcurv.kernels import flash_attention_triton

    return flash_attention_triton


def unsupported_reason(query: Any, key: Any, value: Any, attn_mask: Any = None,
                       dropout_p: float = 0.0, is_causal: bool = False,
                       scale: float | None = None, enable_gqa: bool = False) -> str | None:
    """Why :func:`flash_attention` cannot compute this SDPA call (``None``: it can).

    Takes SDPA's arguments. Needs triton; 4-D CUDA tensors ``(B, H, T, D)`` (CPU ones only
    under the interpreter) of one dtype among float16/bfloat16/float32/float64; head
    dims at most 128; ``K, V`` with ``H`` heads or, with ``enable_gqa``, a divisor of it;
    no dropout; no mask together with ``is_causal`` (SDPA rejects that too); a boolean or
    query-dtype mask that broadcasts to ``(B, H, Tq, Tk)`` and carries no gradient or
    tangent (an additive mask computed from a torch.func transform's inputs is refused).
    """
    if not triton_installed():
        return "triton is not installed"
    tensors = (query, key, value)
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        return "query, key and value must be tensors"
    if any(t.ndim != 4 for t in tensors):
        return "query, key and value must be 4-D (batch, heads, tokens, head_dim)"
    device = query.device
    if any(t.device != device for t in tensors):
        return "query, key and value must be on one device"
    if not (device.type == "cuda" or (device.type == "cpu" and triton_interpreter_active())):
        return "the kernel runs on CUDA tensors (CPU ones only under TRITON_INTERPRET=1)"
    if query.dtype not in SUPPORTED_DTYPES or any(t.dtype != query.dtype for t in tensors):
        return f"query, key and value need one dtype among {SUPPORTED_DTYPES}"
    (b, h, tq, d), (bk, hk, tk, dk), (bv, hv, tv, dv) = query.shape, key.shape, value.shape
    if not (b == bk == bv and hk == hv and tk == tv and dk == d):
        return "key and value must match query's batch and head_dim and each other's shape"
    if max(d, dv) > MAX_HEAD_DIM or min(d, dv) == 0:
        return f"head dims must be between 1 and {MAX_HEAD_DIM}"
    if hk != h and not (enable_gqa and hk > 0 and h % hk == 0):
        return "key/value heads differ from query heads (GQA needs enable_gqa=True)"
    if dropout_p != 0.0:
        return "dropout is not supported"
    if scale is not None and not isinstance(scale, (int, float)):
        return "scale must be a number"
    if attn_mask is not None:
        if is_causal:
            return "attn_mask and is_causal together"
        if not isinstance(attn_mask, torch.Tensor) or attn_mask.device != device:
            return "attn_mask must be a tensor on the inputs' device"
        if attn_mask.dtype not in (torch.bool, query.dtype):
            return "attn_mask must be boolean or of the query's dtype"
        if attn_mask.requires_grad:
            return "attn_mask requires grad (its gradient is not computed)"
        if attn_mask.is_floating_point() and _traced(attn_mask):
            # Inside torch.func.jvp (the GGN's jvp="forward") a parameter's requires_grad
            # reads False, yet it may carry a tangent, which the kernels do not push.
            return "attn_mask is traced by a torch.func transform (it may carry a tangent)"
        try:
            shape = torch.broadcast_shapes(attn_mask.shape, (b, h, tq, tk))
        except RuntimeError:
            shape = None
        if attn_mask.ndim > 4 or shape != (b, h, tq, tk):
            return (f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to "
                    f"{(b, h, tq, tk)}")
    return None


def _traced(t: torch.Tensor) -> bool:
    """Whether ``t`` is a torch.func wrapper (a dual or batched tensor, or one that a
    ``grad`` level tracks), i.e. derived from a transform's inputs."""
    return torch._C._functorch.is_functorch_wrapped_tensor(t)


def flash_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                    scale: float | None = None, enable_gqa: bool = False) -> torch.Tensor:
    """``scaled_dot_product_attention`` without dropout, by the Triton kernels.

    Args:
        query: ``(B, H, Tq, D)``. key: ``(B, Hkv, Tk, D)``. value: ``(B, Hkv, Tk, Dv)``,
            ``Hkv = H`` or, with ``enable_gqa``, a divisor of ``H`` (query head ``h``
            attends with key/value head ``h // (H / Hkv)``, as SDPA's GQA does).
        attn_mask: ``None``, boolean (``True`` = attend) or additive (query's dtype),
            broadcastable to ``(B, H, Tq, Tk)``.
        is_causal: key ``j`` visible from query ``i`` iff ``j <= i`` (SDPA's top-left
            alignment).
        scale: ``None`` for ``1 / sqrt(D)``.

    Returns:
        ``(B, H, Tq, Dv)`` in the inputs' dtype. Rows whose keys are all masked are zero,
        as in math SDPA. Cost: ``~4 B H Tq Tk D`` flops forward (half that with
        ``is_causal``), about twice that backward and as much again for a JVP.

    Raises:
        OperatorInputError: the call is outside what the kernels handle
            (:func:`unsupported_reason` says what).
    """
    reason = unsupported_reason(query, key, value, attn_mask, 0.0, is_causal, scale,
                                enable_gqa)
    if reason is not None:
        raise OperatorInputError(f"flash_attention: {reason}")
    if attn_mask is not None:
        attn_mask = attn_mask.reshape((1,) * (4 - attn_mask.ndim) + tuple(attn_mask.shape))
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    return _Attention.apply(query, key, value, attn_mask, bool(is_causal), scale)[0]


def _fold(t: torch.Tensor | None, dim: int | None, n: int) -> torch.Tensor | None:
    """Merge the vmapped axis (at ``dim``; ``None``: not batched, so repeat) into the
    leading batch axis, vector-major: row ``v * B + b``."""
    if t is None:
        return None
    t = t.expand(n, *t.shape) if dim is None else t.movedim(dim, 0)
    return t.reshape(n * t.shape[1], *t.shape[2:])


def _fold_mask(mask: torch.Tensor | None, dim: int | None, n: int, batch: int):
    """An unbatched mask stays as is (kernels read batch ``z`` at ``z % mask batch``); a
    batched one is expanded to ``n * batch`` rows."""
    if mask is None or dim is None:
        return mask
    mask = mask.movedim(dim, 0)
    return _fold(mask.expand(n, batch, *mask.shape[2:]), 0, n)


def _unfold(t: torch.Tensor | None, n: int) -> torch.Tensor | None:
    return None if t is None else t.reshape(n, t.shape[0] // n, *t.shape[1:])


def _fold_all(info: Any, in_dims: tuple, primals: tuple, others: tuple):
    """Fold a vmapped call's tensors. ``primals`` are ``(q, k, v, mask, o?, lse?)``:
    when none of them is batched they stay as they are (one copy for every vector);
    ``others`` (tangents, cotangents) are always folded."""
    n = info.batch_size
    primal_dims, other_dims = in_dims[:len(primals)], in_dims[len(primals):]
    if any(d is not None for d in primal_dims):
        q, dim = primals[0], primal_dims[0]
        batch = q.shape[0] if dim is None else q.movedim(dim, 0).shape[1]
        folded = [_fold(t, d, n) if i != 3 else _fold_mask(t, d, n, batch)
                  for i, (t, d) in enumerate(zip(primals, primal_dims))]
    else:
        folded = list(primals)
    return folded, [_fold(t, d, n) for t, d in zip(others, other_dims)]


def _accumulation(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``rowsum(a ∘ b)`` over the last axis in the accumulation dtype. One batch may be a
    multiple of the other's (a folded block against one copy of the primals, never
    expanded); the result has the larger, vector-major."""
    if a.shape[0] < b.shape[0]:
        a, b = b, a
    out = (a.to(_accumulation(b)).reshape(a.shape[0] // b.shape[0], *b.shape)
           * b.to(_accumulation(b))).sum(-1)
    return out.reshape(a.shape[0], *out.shape[2:])


def _delta(grad_o: torch.Tensor, o: torch.Tensor, grad_lse: torch.Tensor | None):
    """The backward's ``delta_i = <dO_i, O_i> - g_lse_i``."""
    delta = _rowdot(grad_o, o)
    return delta if grad_lse is None else delta - grad_lse.to(delta.dtype)


def _at(t: torch.Tensor, z: int) -> torch.Tensor:
    """``t`` repeated to batch ``z`` (a multiple of its own), vector-major."""
    return t if t.shape[0] == z else t.repeat(z // t.shape[0], *(1,) * (t.ndim - 1))


def _per_kv_head(dq, dk, dv, q, k, v):
    """The kernels' per-query-head ``dK, dV`` summed over each GQA group, all three in the
    inputs' dtypes."""
    z, hk = dq.shape[0], k.shape[1]
    if hk != q.shape[1]:
        dk = dk.reshape(z, hk, -1, *dk.shape[2:]).sum(2)
        dv = dv.reshape(z, hk, -1, *dv.shape[2:]).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _Attention(torch.autograd.Function):
    """``(O, lse)``; ``lse`` is differentiable too (its tangent comes for free in the
    JVP and its cotangent folds into the backward's ``delta``)."""

    @staticmethod
    def forward(q, k, v, mask, is_causal, scale):
        return _kernels().attention_forward(q, k, v, mask, is_causal, scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, mask, is_causal, scale = inputs
        o, lse = output
        ctx.save_for_backward(q, k, v, mask, o, lse)
        ctx.save_for_forward(q, k, v, mask, o, lse)
        ctx.is_causal, ctx.scale = is_causal, scale
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad_o, grad_lse):
        q, k, v, mask, o, lse = ctx.saved_tensors
        if grad_o is None:
            grad_o = torch.zeros_like(o)
        dq, dk, dv = _AttentionBackward.apply(q, k, v, mask, o, lse, grad_o, grad_lse,
                                              ctx.is_causal, ctx.scale)
        return dq, dk, dv, None, None, None

    @staticmethod
    def jvp(ctx, tq, tk, tv, tmask, _is_causal, _scale):
        q, k, v, mask, o, lse = ctx.saved_tensors
        if tmask is not None:
            raise NotImplementedError(
                "flash_attention: forward-mode derivative along attn_mask is not implemented")
        if tq is None and tk is None and tv is None:
            return torch.zeros_like(o), torch.zeros_like(lse)
        return _AttentionJvp.apply(q, k, v, mask, o, lse, tq, tk, tv, ctx.is_causal,
                                   ctx.scale)

    @staticmethod
    def vmap(info, in_dims, q, k, v, mask, is_causal, scale):
        (q, k, v, mask), _ = _fold_all(info, in_dims[:4], (q, k, v, mask), ())
        o, lse = _Attention.apply(q, k, v, mask, is_causal, scale)
        return (_unfold(o, info.batch_size), _unfold(lse, info.batch_size)), (0, 0)


_NO_SECOND_ORDER = (
    "this derivative through torchcurv's Triton attention is not implemented (it has a "
    "backward, a JVP and the JVP of its backward, i.e. forward over reverse, but no "
    "backward of the backward or of a JVP, and no JVP of a JVP); run products that need "
    "it under differentiable_attention(order='second'), which keeps SDPA's math backend")


class _NotDifferentiable(torch.autograd.Function):
    """The derivative kernels: a derivative they do not define raises instead of
    returning a wrong (zero) one."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(_NO_SECOND_ORDER)

    @staticmethod
    def jvp(ctx, *tangents):
        raise RuntimeError(_NO_SECOND_ORDER)


class _AttentionBackward(_NotDifferentiable):
    """``(dQ, dK, dV)`` from the output's and lse's cotangents; forward-mode
    differentiable (:class:`_AttentionBackwardJvp`), not reverse-mode."""

    @staticmethod
    def forward(q, k, v, mask, o, lse, grad_o, grad_lse, is_causal, scale):
        dq, dk, dv = _kernels().attention_backward(q, k, v, mask, lse, grad_o,
                                                   _delta(grad_o, o, grad_lse), is_causal,
                                                   scale)
        return _per_kv_head(dq, dk, dv, q, k, v)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, mask, o, lse, grad_o, grad_lse, is_causal, scale = inputs
        ctx.save_for_forward(q, k, v, mask, o, lse, grad_o, grad_lse)
        ctx.is_causal, ctx.scale = is_causal, scale

    @staticmethod
    def jvp(ctx, tq, tk, tv, tmask, to, tlse, tgrad_o, tgrad_lse, _is_causal, _scale):
        q, k, v, mask, o, lse, grad_o, grad_lse = ctx.saved_tensors
        # tmask is ignored: the mask is the forward's, whose JVP rule refuses a mask with a
        # tangent, so this one is zero (functorch hands an additive mask a zero tensor).
        tangents = (tq, tk, tv, to, tlse, tgrad_o, tgrad_lse)
        if all(t is None for t in tangents):
            z = grad_o.shape[0]
            return tuple(torch.zeros(z, *t.shape[1:], dtype=t.dtype, device=t.device)
                         for t in (q, k, v))
        return _AttentionBackwardJvp.apply(q, k, v, mask, o, lse, grad_o, grad_lse,
                                           *tangents, ctx.is_causal, ctx.scale)

    @staticmethod
    def vmap(info, in_dims, q, k, v, mask, o, lse, grad_o, grad_lse, is_causal, scale):
        (q, k, v, mask, o, lse), (grad_o, grad_lse) = _fold_all(
            info, in_dims[:8], (q, k, v, mask, o, lse), (grad_o, grad_lse))
        out = _AttentionBackward.apply(q, k, v, mask, o, lse, grad_o, grad_lse, is_causal,
                                       scale)
        return tuple(_unfold(t, info.batch_size) for t in out), (0, 0, 0)


class _AttentionJvp(_NotDifferentiable):
    """``(Ȯ, l̇se)`` from the tangents of ``q, k, v`` (``None`` for zero); not
    differentiable."""

    @staticmethod
    def forward(q, k, v, mask, o, lse, tq, tk, tv, is_causal, scale):
        return _kernels().attention_jvp(q, k, v, mask, o, lse, tq, tk, tv, is_causal, scale)

    @staticmethod
    def vmap(info, in_dims, q, k, v, mask, o, lse, tq, tk, tv, is_causal, scale):
        (q, k, v, mask, o, lse), tangents = _fold_all(
            info, in_dims[:9], (q, k, v, mask, o, lse), (tq, tk, tv))
        out = _AttentionJvp.apply(q, k, v, mask, o, lse, *tangents, is_causal, scale)
        return tuple(_unfold(t, info.batch_size) for t in out), (0, 0)


class _AttentionBackwardJvp(_NotDifferentiable):
    """The tangents of :class:`_AttentionBackward`'s ``(dQ, dK, dV)`` (forward over
    reverse, the exact Hessian's ``torch.func.jvp`` of ``torch.func.grad``); not
    differentiable.

    Inputs: the backward's primals ``q, k, v, mask, o, lse, grad_o, grad_lse``, then the
    tangents of ``q, k, v, o, lse, grad_o, grad_lse`` (``None`` for zero). ``P`` is read
    back from ``lse``, so ``Ṗ = P ∘ (Ṡ - l̇se)`` takes the lse tangent as given, and
    ``deltȧ = rowsum(dȮ ∘ O + dO ∘ Ȯ) - ġ_lse``. Memory: the outputs and row vectors;
    a missing tangent of ``q, k, v`` or ``grad_o`` is filled with zeros (each kernel tile
    then has one code path; forward-over-reverse gives them all).
    """

    @staticmethod
    def forward(q, k, v, mask, o, lse, grad_o, grad_lse, tq, tk, tv, to, tlse, tgrad_o,
                tgrad_lse, is_causal, scale):
        tangents = (tq, tk, tv, to, tlse, tgrad_o, tgrad_lse)
        z = max(t.shape[0] for t in (q, grad_o, *tangents) if t is not None)
        if grad_o.shape[0] < o.shape[0]:  # batched primals, one cotangent for all
            grad_o = _at(grad_o, o.shape[0])
            grad_lse = None if grad_lse is None else _at(grad_lse, o.shape[0])
        rows = [_rowdot(tgrad_o, o) if tgrad_o is not None else None,
                _rowdot(grad_o, to) if to is not None else None,
                None if tgrad_lse is None else -tgrad_lse.to(_accumulation(q))]
        tdelta = sum((_at(r, z) for r in rows if r is not None),
                     torch.zeros(z, *lse.shape[1:], dtype=_accumulation(q), device=q.device))

        def filled(t, like):
            if t is None:
                return torch.zeros(z, *like.shape[1:], dtype=like.dtype, device=like.device)
            return _at(t.to(like.dtype), z)

        dq, dk, dv = _kernels().attention_backward_jvp(
            q, k, v, mask, lse, grad_o, _delta(grad_o, o, grad_lse), filled(tq, q),
            filled(tk, k), filled(tv, v), filled(tlse, lse), filled(tgrad_o, grad_o),
            tdelta, is_causal, scale)
        return _per_kv_head(dq, dk, dv, q, k, v)

    @staticmethod
    def vmap(info, in_dims, q, k, v, mask, o, lse, grad_o, grad_lse, tq, tk, tv, to, tlse,
             tgrad_o, tgrad_lse, is_causal, scale):
        n = info.batch_size
        (q, k, v, mask, o, lse), _ = _fold_all(info, in_dims[:6], (q, k, v, mask, o, lse), ())
        # Unbatched cotangents stay one copy (the kernels read them at z mod their batch);
        # forward repeats an unbatched tangent (forward over reverse batches them all).
        rest = [t if d is None else _fold(t, d, n) for t, d in zip(
            (grad_o, grad_lse, tq, tk, tv, to, tlse, tgrad_o, tgrad_lse), in_dims[6:15])]
        out = _AttentionBackwardJvp.apply(q, k, v, mask, o, lse, *rest, is_causal, scale)
        return tuple(_unfold(t, n) for t in out), (0, 0, 0)
