"""Per-batch derivative kernels shared by the curvature operators.

Blocks of vectors travel as per-parameter tensors of shape ``(m, *param.shape)``.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from torchcurv.losses.forward_mode import forward_mode_objective
from torchcurv.objectives import Objective

if TYPE_CHECKING:
    from torchcurv.derivatives.base import CompiledKernel

Batch = Any

# torch.func's transforms are not safe to run from several threads at once: forward-mode
# AD's dual levels are process-wide (one thread's exit deletes the level another thread
# is using, giving errors or silently wrong tangents), and functional_call swaps the
# module's parameters in place for the duration of the call. Reentrant because a
# product may run inside another one (an objective or a model that multiplies).
_TRANSFORMS = threading.RLock()


@contextmanager
def serialised_transforms() -> Iterator[None]:
    """Hold the process-wide lock under which every ``torch.func`` transform runs.

    Every use of ``torch.func`` (``jvp``, ``grad``, ``vmap``, ``functional_call``) in the
    products runs inside this block, so products from several threads take turns there
    instead of corrupting each other's forward-mode state. Reentrant: nesting is free.
    """
    with _TRANSFORMS:
        yield


def over_vectors(fn: Callable[..., Any], blocks: Sequence[torch.Tensor], out_dims: Any = 0
                 ) -> Any:
    """``vmap(fn, out_dims=out_dims)(*blocks)``; a one-vector block skips ``vmap`` (its
    batching rules cost time and miss some ops). Outputs at ``out_dims=None`` are shared
    by all vectors. Traceable by ``torch.compile``."""
    if blocks[0].shape[0] == 1:
        return _with_vector_axis(fn(*(b[0] for b in blocks)), out_dims)
    return vmap(fn, out_dims=out_dims)(*blocks)


@contextmanager
def forward_mode_errors(advice: str) -> Iterator[None]:
    """The block in which a product's ``torch.func`` transforms run: under the transforms
    lock, with a missing forward-mode derivative (``RuntimeError``/``NotImplementedError``
    from torch) re-raised naming ``advice``. Out-of-memory passes unchanged so that a
    caller can shrink the block, and so does a failure of ``torch.compile``
    (:func:`compile_errors` names it)."""
    try:
        with serialised_transforms():
            yield
    except (torch.OutOfMemoryError, CompileFailedError):
        raise
    except (RuntimeError, NotImplementedError) as exc:
        raise RuntimeError(
            f"forward-mode AD failed on this model or loss ({exc}); {advice}"
        ) from exc


class CompileFailedError(RuntimeError):
    """``torch.compile`` failed on a product (a graph break, an op dynamo or the backend
    does not handle); the message gives torch's reason."""


@contextmanager
def compile_errors() -> Iterator[None]:
    """The block in which a compiled kernel runs: an error of ``torch.compile`` (tracing,
    graph break, backend) re-raised as :class:`CompileFailedError` pointing at
    ``compile=False``; every other exception passes unchanged."""
    try:
        yield
    except RuntimeError as exc:
        # torch._dynamo is imported by torch.compile: no compile, no compile error
        errors = sys.modules.get("torch._dynamo.exc")
        if errors is None or not isinstance(exc, errors.TorchDynamoException):
            raise
        # dynamo's first line says what failed, its "Explanation:" line why
        lines = [line.strip() for line in str(exc).strip().splitlines()]
        why = " ".join(lines[:1] + [line for line in lines if line.startswith("Explanation:")][:1])
        raise CompileFailedError(
            f"torch.compile failed on this product ({type(exc).__name__}: {why[:600]}); "
            "construct the operator with compile=False"
        ) from exc


def _with_vector_axis(out: Any, out_dims: Any) -> Any:
    if out_dims is None:
        return out
    if isinstance(out_dims, tuple):
        return tuple(_with_vector_axis(o, d) for o, d in zip(out, out_dims))
    if isinstance(out, torch.Tensor):
        return out.unsqueeze(0)
    return type(out)(o.unsqueeze(0) for o in out)


def _zeros_if_none(tensors, like, leading: tuple[int, ...] = ()) -> list[torch.Tensor]:
    return [
        t if t is not None else torch.zeros(*leading, *p.shape, dtype=p.dtype, device=p.device)
        for t, p in zip(tensors, like)
    ]


def scaled(loss: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """``loss * scale`` in the loss's dtype (``scale`` may be a float64 0-dim tensor)."""
    if isinstance(scale, torch.Tensor):
        scale = scale.to(loss.dtype)
    return loss * scale


def loss_and_grads(
    model: nn.Module,
    objective: Objective,
    batch: Batch,
    scale: torch.Tensor | float,
    params: Sequence[torch.Tensor],
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The batch loss and the gradient of ``scale * loss`` (zeros for unused params)."""
    with torch.enable_grad():
        loss = objective(model, batch)
        grads = torch.autograd.grad(scaled(loss, scale), params, allow_unused=True)
    return loss, _zeros_if_none(grads, params)


def gradient_kernel(
    bound: BoundCall,
    batch: Batch,
    scale: torch.Tensor | float,
    names: Sequence[str],
    params: Sequence[torch.Tensor],
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """:func:`loss_and_grads` as ``torch.func.grad`` of ``bound`` (a
    :class:`BoundCall` of the objective) at ``params`` (named ``names`` in the model):
    the form ``torch.compile`` traces, since dynamo does not trace
    ``torch.autograd.grad``. Zeros for unused params, as there."""
    keys = ["model." + n for n in names]

    def scaled_loss(*ps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loss = functional_call(bound, dict(zip(keys, ps)), (batch,))
        return scaled(loss, scale), loss.detach()

    grads, loss = grad(scaled_loss, argnums=tuple(range(len(params))), has_aux=True)(
        *(p.detach() for p in params))
    return loss, list(grads)


def batched_hvp(
    model: nn.Module,
    objective: Objective,
    batch: Batch,
    scale: torch.Tensor | float,
    names: Sequence[str],
    params: Sequence[torch.Tensor],
    blocks: Sequence[torch.Tensor],
    *,
    forward_over_reverse: bool = False,
    compiled: CompiledKernel | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``(H_b * scale) @ V`` for one batch, ``V`` given per parameter as ``(m, *shape)``.

    Returns the batch's unscaled loss and the products, per parameter ``(m, *shape)``.
    ``forward_over_reverse``: by :func:`forward_over_reverse_kernel` under
    :func:`forward_mode_errors`, or by ``compiled``, that kernel compiled for this
    operator (with its own :class:`BoundCall` of the forward-mode objective).
    """
    if forward_over_reverse:
        bound = (BoundCall(model, forward_mode_objective(objective)) if compiled is None
                 else compiled.bound)
        with forward_mode_errors(
                "construct the operator with method='autograd' (double backward)"):
            return (compiled or forward_over_reverse_kernel)(bound, batch, scale, names,
                                                             params, blocks)
    return hvp_double_backward(model, objective, batch, scale, params, blocks)


def hvp_double_backward(model, objective, batch, scale, params, blocks):
    """:func:`batched_hvp` by double backward (``forward_over_reverse=False``)."""
    if not torch.is_grad_enabled():
        # entered only where needed: a grad-mode block costs a measurable part of a
        # small batch's product
        with torch.enable_grad():
            return hvp_double_backward(model, objective, batch, scale, params, blocks)
    # a ParameterBlock made by _split_block for one vector has its vectors already (and
    # perhaps no rows: see Strategy.one_vector_rows)
    vectors = getattr(blocks, "_vectors", None)
    m = 1 if vectors is not None else blocks[0].shape[0]
    loss = objective(model, batch)
    grads = torch.autograd.grad(
        loss * (scale.to(loss.dtype) if isinstance(scale, torch.Tensor) else scale),
        params, create_graph=True, allow_unused=True
    )
    # A gradient that does not depend on the parameters has a zero Hessian row block.
    # (Plain loops on the one-vector path, which runs once per batch of every matvec: a
    # comprehension is a frame of its own.)
    live = []
    for i, g in enumerate(grads):
        if g is not None and g.requires_grad:
            live.append(i)
    if not live:
        return loss, _zeros_if_none([None] * len(params), params, () if m == 1 else (m,))
    every = len(live) == len(grads)
    outputs = grads if every else [grads[i] for i in live]
    if m == 1:
        if vectors is None:
            vectors = [b[0] for b in blocks]
        hv = torch.autograd.grad(
            outputs, params, grad_outputs=vectors if every else [vectors[i] for i in live],
            allow_unused=True
        )
        # parameter-shaped: the operator's walk takes a one-vector block's products
        # without the vector axis (ParameterBlock)
        for h in hv:
            if h is None:
                return loss, _zeros_if_none(hv, params)
        return loss, list(hv)
    if blocks[0].device.type != "cpu":
        try:
            hv = torch.autograd.grad(
                outputs, params, grad_outputs=[blocks[i] for i in live],
                allow_unused=True, is_grads_batched=True, retain_graph=True,
            )
            return loss, _zeros_if_none(hv, params, (m,))
        except RuntimeError:
            pass  # some backward formulas have no batching rule
    # One second backward per vector through the shared first-order graph. On the CPU
    # this is also faster than the vmapped backward (116 vs 133 ms per vector,
    # benchmarks/cpu_hessian_block.py, one thread, torch 2.13).
    cols = []
    for j in range(m):
        hv = torch.autograd.grad(
            outputs, params, grad_outputs=[blocks[i][j] for i in live],
            allow_unused=True, retain_graph=j < m - 1,
        )
        cols.append(_zeros_if_none(hv, params))
    return loss, [torch.stack(c) for c in zip(*cols)]


class BoundCall(nn.Module):
    """``call(model, batch)`` as a module whose only argument is the batch, so that
    ``functional_call`` can swap the model's weights for tensors that ``torch.func``
    transforms differentiate. Made outside any compiled region (dynamo does not trace
    module construction), and once per operator for a compiled product, whose guards
    then hold from batch to batch."""

    def __init__(self, model: nn.Module, call: Callable[[nn.Module, Batch], torch.Tensor]
                 ) -> None:
        super().__init__()
        self.model = model
        self._call = call

    def forward(self, batch: Batch) -> torch.Tensor:
        return self._call(self.model, batch)


def forward_over_reverse_kernel(
    bound: BoundCall,
    batch: Batch,
    scale: torch.Tensor | float,
    names: Sequence[str],
    params: Sequence[torch.Tensor],
    blocks: Sequence[torch.Tensor],
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``(H_b * scale) @ V`` as ``torch.func.jvp`` of ``torch.func.grad``, vmapped over the
    block (:func:`over_vectors`): the batch's unscaled loss and, per parameter,
    ``(m, *shape)``. Only ``torch.func`` transforms, so ``torch.compile`` traces it."""
    keys = ["model." + n for n in names]
    # Constant tensors of the batch (targets, inputs) enter the jvp as primals with
    # materialised zero tangents: left without one, their tangent is an immutable
    # ZeroTensor, which some loss backwards' forward-AD formulas write into (mse_loss's
    # backward with reduction="mean" raises "ZeroTensors are immutable", torch 2.13).
    # The tangent of a constant is zero either way, so the product is the same.
    leaves, spec = tree_flatten(batch)
    const = [i for i, t in enumerate(leaves)
             if isinstance(t, torch.Tensor) and t.is_floating_point()]
    consts = tuple(leaves[i].detach() for i in const)
    zeros = tuple(torch.zeros_like(c) for c in consts)
    n = len(params)

    def rebuilt(cs):
        filled = list(leaves)
        for i, c in zip(const, cs):
            filled[i] = c
        return tree_unflatten(filled, spec)

    def scaled_loss(*ps_and_cs):
        ps, cs = ps_and_cs[:n], ps_and_cs[n:]
        loss = functional_call(bound, dict(zip(keys, ps)), (rebuilt(cs),))
        return scaled(loss, scale), loss.detach()

    grad_fn = grad(scaled_loss, argnums=tuple(range(n)), has_aux=True)
    primals = tuple(p.detach() for p in params) + consts

    def hvp(*vs):
        _, hv, loss = jvp(grad_fn, primals, vs + zeros, has_aux=True)
        return hv, loss

    hv, loss = over_vectors(hvp, blocks, out_dims=(0, None))
    return loss, list(hv)


def norm_of(tensors: Iterable[torch.Tensor]) -> float:
    """The 2-norm of ``tensors`` as one vector, in float64, with one host sync."""
    return float(torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(t.double()) for t in tensors])))


def finite_difference_step(dtype: torch.dtype, theta_norm: float, v_norm: float) -> float:
    """The central-difference step ``h = eps^(1/3) (1 + ||theta||) / ||v||`` along ``v``.

    ``eps^(1/3)`` balances the ``O(h^2)`` truncation error against the ``eps / h``
    rounding of the difference; ``1 + ||theta||`` makes the perturbation relative to the
    parameters. The zero vector takes ``||v|| = 1``: both sides are then the unperturbed
    point, so its product is zero for any ``h`` (exactly, with deterministic kernels),
    and its passes still check the data and the loss as every product does.
    Shared by every finite-difference product (Hessian and Jacobian), so they agree.
    """
    return torch.finfo(dtype).eps ** (1 / 3) * (1 + theta_norm) / (v_norm if v_norm > 0 else 1.0)
