"""Products with the Jacobian ``J = d output / d theta`` of one batch, without forming it.

Blocks of parameter-space vectors travel as per-parameter tensors ``(m, *param.shape)``;
blocks of output-space vectors as ``(m, *output.shape)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch
from torch import nn
from torch.func import functional_call, jvp

from torchcurv.objectives import Objective
from torchcurv.operators.functional import (
    BoundCall,
    finite_difference_step,
    forward_mode_errors,
    norm_of,
    over_vectors,
)

if TYPE_CHECKING:
    from torchcurv.derivatives.base import CompiledKernel

Batch = Any

JvpMethod = Literal["forward", "double_vjp", "finite_difference"]
JVP_METHODS: tuple[JvpMethod, ...] = get_args(JvpMethod)


def forward_with_graph(model: nn.Module, objective: Objective, batch: Batch) -> torch.Tensor:
    """The batch's model output, recording the autograd graph to the parameters."""
    with torch.enable_grad():
        return objective.forward(model, batch)


def jvp_forward_mode(
    model: nn.Module,
    objective: Objective,
    batch: Batch,
    names: Sequence[str],
    params: Sequence[torch.Tensor],
    blocks: Sequence[torch.Tensor],
    *,
    compiled: CompiledKernel | None = None,
) -> torch.Tensor:
    """``J V`` by forward-mode AD (``torch.func.jvp``, vmapped over the block):
    :func:`forward_jvp_kernel`, or ``compiled``, that kernel compiled for this operator
    (with its own :class:`~torchcurv.operators.functional.BoundCall` of
    ``objective.forward``).

    Costs about one extra forward pass with tangents per vector (batched). Runs under
    :func:`~torchcurv.operators.functional.forward_mode_errors`: one thread at a time.
    """
    bound = BoundCall(model, objective.forward) if compiled is None else compiled.bound
    with forward_mode_errors(
            "construct the operator with jvp='double_vjp' (needs double backward) or "
            "jvp='finite_difference'"):
        return (compiled or forward_jvp_kernel)(bound, batch, names, params, blocks)


def forward_jvp_kernel(
    bound: BoundCall,
    batch: Batch,
    names: Sequence[str],
    params: Sequence[torch.Tensor],
    blocks: Sequence[torch.Tensor],
) -> torch.Tensor:
    """``J V`` of shape ``(m, *output.shape)``: ``torch.func.jvp`` over the block
    (:func:`~torchcurv.operators.functional.over_vectors`); only ``torch.func``
    transforms, so ``torch.compile`` traces it."""
    keys = ["model." + n for n in names]
    primals = tuple(p.detach() for p in params)

    def tangent(*vs: torch.Tensor) -> torch.Tensor:
        return jvp(lambda *ps: functional_call(bound, dict(zip(keys, ps)), (batch,)),
                   primals, vs)[1]

    return over_vectors(tangent, blocks)


def jvp_double_vjp(
    output: torch.Tensor, params: Sequence[torch.Tensor], blocks: Sequence[torch.Tensor]
) -> torch.Tensor:
    """``J V`` as the derivative of ``u -> Jᵀu`` (linear in ``u``) along ``V``.

    Needs only reverse mode (double backward through the model's backward); keeps the
    graph of ``output`` for the ``Jᵀ`` product that follows.
    """
    u = torch.zeros_like(output, requires_grad=True)
    with torch.enable_grad():
        jtu = torch.autograd.grad(output, params, u, create_graph=True, allow_unused=True)
    live = [i for i, g in enumerate(jtu) if g is not None and g.requires_grad]
    m = blocks[0].shape[0]
    if not live:
        return torch.zeros(m, *output.shape, dtype=output.dtype, device=output.device)
    outputs = [jtu[i] for i in live]
    if m == 1:
        (jv,) = torch.autograd.grad(outputs, u, [blocks[i][0] for i in live], retain_graph=True)
        return jv.unsqueeze(0)
    (jv,) = torch.autograd.grad(
        outputs, u, [blocks[i] for i in live], retain_graph=True, is_grads_batched=True
    )
    return jv


def jvp_finite_difference(
    model: nn.Module,
    objective: Objective,
    batch: Batch,
    params: Sequence[torch.Tensor],
    origin: Sequence[torch.Tensor],
    blocks: Sequence[torch.Tensor],
) -> torch.Tensor:
    """``J V`` by central differences ``(f(θ + h v) - f(θ - h v)) / 2h``, two no-grad
    forwards per vector, ``h`` from :func:`~torchcurv.operators.functional.finite_difference_step`.

    Perturbs ``params`` in place (``θ + h v``, then ``θ - h v`` with one ``add_``) and
    copies ``origin`` (their values) back after every vector, which is bit-exact. The
    bias is ``O(h²)``: about 1e-10 relative in float64.
    """
    theta_norm = norm_of(origin)
    columns = []
    with torch.no_grad():
        for j in range(blocks[0].shape[0]):
            pieces = [b[j] for b in blocks]
            h = finite_difference_step(params[0].dtype, theta_norm, norm_of(pieces))
            try:
                for p, d in zip(params, pieces):
                    p.add_(d, alpha=h)
                plus = objective.forward(model, batch)
                for p, d in zip(params, pieces):
                    p.add_(d, alpha=-2 * h)
                # not in place: an output may be a view of the batch or of a buffer
                column = plus - objective.forward(model, batch)
            finally:
                for p, o in zip(params, origin):
                    p.copy_(o)
            columns.append(column.div_(2 * h))
    return torch.stack(columns)


def vjp_batched(
    output: torch.Tensor, params: Sequence[torch.Tensor], cotangents: torch.Tensor
) -> list[torch.Tensor]:
    """``Jᵀ W`` for ``W`` of shape ``(m, *output.shape)``; per parameter ``(m, *shape)``.

    One batched backward through the graph of ``output`` (one backward per vector where
    an op has no batching rule). Zeros for parameters the output does not depend on.
    """
    m = cotangents.shape[0]
    if m == 1:
        grads = torch.autograd.grad(output, params, cotangents[0], allow_unused=True)
        return [_zeros_if_none(g, p, (1,)) if g is None else g.unsqueeze(0)
                for g, p in zip(grads, params)]
    try:
        grads = torch.autograd.grad(
            output, params, cotangents, allow_unused=True, is_grads_batched=True,
            retain_graph=True,
        )
        return [_zeros_if_none(g, p, (m,)) for g, p in zip(grads, params)]
    except RuntimeError:
        columns = []
        for j in range(m):
            grads = torch.autograd.grad(
                output, params, cotangents[j], allow_unused=True, retain_graph=j < m - 1
            )
            columns.append([_zeros_if_none(g, p, ()) for g, p in zip(grads, params)])
        return [torch.stack(c) for c in zip(*columns)]


def _zeros_if_none(g: torch.Tensor | None, p: torch.Tensor, leading: tuple[int, ...]):
    if g is not None:
        return g
    return torch.zeros(*leading, *p.shape, dtype=p.dtype, device=p.device)
