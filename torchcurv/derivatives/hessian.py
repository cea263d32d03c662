"""How :class:`~torchcurv.HessianOperator` computes ``H V``: one strategy per ``method=``.

The per-batch strategies (``"autograd"``, ``"forward_over_reverse"``) multiply one
batch's Hessian with the whole block inside the operator's walk over the data; the
finite-difference strategy walks the data itself, twice per vector, since each side of
the difference is the full gradient at a perturbed point.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal, get_args

import torch

from torchcurv.derivatives.base import Strategy
from torchcurv.dtypes import accumulation_dtype
from torchcurv.losses.forward_mode import forward_mode_objective
from torchcurv.operators.functional import (
    batched_hvp,
    finite_difference_step,
    forward_over_reverse_kernel,
    gradient_kernel,
    hvp_double_backward,
)
from torchcurv.operators.model_guard import preserved

if TYPE_CHECKING:
    from torchcurv.operators.curvature import BatchLosses, CurvatureOperator

Batch = Any

HessianMethod = Literal["autograd", "forward_over_reverse", "finite_difference"]
HESSIAN_METHODS: tuple[HessianMethod, ...] = get_args(HessianMethod)


class HessianStrategy(Strategy):
    """Computes this process's share of ``H V`` for a :class:`~torchcurv.HessianOperator`."""

    argument = "method"

    def local_matmat(self, op: CurvatureOperator, V: torch.Tensor
                     ) -> tuple[torch.Tensor, BatchLosses]:
        """This process's ``(n, m)`` share of ``H V`` in the accumulation dtype, and the
        batch losses it saw."""
        raise NotImplementedError


class _PerBatch(HessianStrategy):
    """One batch's Hessian times the whole block, summed by the operator's walk."""

    forward_over_reverse: ClassVar[bool]

    def local_matmat(self, op, V):
        # The whole product under the transforms lock for torch.func, not only its
        # transforms (see Strategy.serialised).
        if not self.needs_forward_mode:
            return op._walk_batches(V, self.batch_matmat)
        with self.serialised():
            return op._walk_batches(V, self.batch_matmat)

    def batch_matmat(self, op: CurvatureOperator, batch: Batch, scale: torch.Tensor | float,
                     blocks: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        compiled = (self.compiled(op, forward_over_reverse_kernel,
                                  forward_mode_objective(op.objective))
                    if self.compile else None)
        return batched_hvp(op.model, op.objective, batch, scale, op.param_names, op.params,
                           blocks, forward_over_reverse=self.forward_over_reverse,
                           compiled=compiled)


class DoubleBackward(_PerBatch):
    """``method="autograd"``: exact double backward; per batch one forward, one first
    backward with ``create_graph`` and ``m`` second backwards (batched)."""

    name = "autograd"
    needs_second_order = True
    forward_over_reverse = False
    one_vector_rows = False

    def batch_matmat(self, op, batch, scale, blocks):
        return hvp_double_backward(op.model, op.objective, batch, scale, op.params, blocks)


class ForwardOverReverse(_PerBatch):
    """``method="forward_over_reverse"``: ``torch.func.jvp`` of ``torch.func.grad``,
    vmapped over the block; one product at a time process-wide. Compiled, the whole
    per-batch product (forward, backward, its forward-mode derivative) is one graph."""

    name = "forward_over_reverse"
    needs_second_order = True
    needs_forward_mode = True
    forward_over_reverse = True
    can_compile = True


class FiniteDifferenceHessian(HessianStrategy):
    """``method="finite_difference"``: ``(g(θ + h v) - g(θ - h v)) / 2h`` per vector.

    Two full gradients per vector, first-order only (default SDPA backends, FSDP2
    through ``loss.backward()``). Lean: one copy of the parameters (to restore them bit
    for bit after each vector), and one accumulation buffer that the ``+`` side's
    gradients are added into and the ``-`` side's subtracted from, batch by batch; the
    model's gradients are never copied to another dtype (low-precision gradients are
    added into the float32 buffer directly). The parameters go ``θ -> θ + h v`` and
    then ``-> θ - h v`` with one in-place ``add_`` each. Compiled, each gradient is
    ``torch.func.grad`` of the batch loss as one graph (not on FSDP2 models).
    """

    name = "finite_difference"
    supports_fsdp = True
    walks_data_per_vector = True
    perturbs_params = True
    can_compile = True

    def local_matmat(self, op, V):
        from torchcurv.operators.curvature import BatchLosses

        n, m = V.shape
        sharding = op.sharding
        losses = BatchLosses()
        total = torch.empty(n, m, dtype=accumulation_dtype(V.dtype), device=V.device)
        # a one-vector block accumulates straight into its result
        buffer = total[:, 0] if m == 1 else torch.empty_like(total[:, 0])
        into = _parameter_views(buffer, op.params)
        gradient = None
        if self.compile:
            kernel = self.compiled(op, gradient_kernel, op.objective)

            def gradient(batch, scale):
                return kernel(kernel.bound, batch, scale, op.param_names, op.params)
        # preserved gives the model back (grads, buffers, attributes); the parameters are
        # restored from `origin`, the one copy, after every vector and on any exit.
        with sharding.perturbing(op.model), preserved(op.model, guard=op._guard):
            origin = [p.detach().clone() for p in op.params]
            try:
                theta_norm = sharding.norm(origin, op.device)
                for j in range(m):
                    v = V[:, j]
                    v_norm = float(v.norm())
                    h = finite_difference_step(op.dtype, theta_norm, v_norm)
                    pieces = [sharding.layout(d, p) for d, p in
                              zip(_parameter_views(v.contiguous(), op.params), op.params)]
                    buffer.zero_()
                    for alpha, add in ((h, 1.0), (-2 * h, -1.0)):
                        with torch.no_grad():
                            for p, d in zip(op.params, pieces):
                                p.add_(d, alpha=alpha)
                        sharding.add_gradient(op, into, add, losses, gradient)
                    with torch.no_grad():
                        for p, o in zip(op.params, origin):
                            p.copy_(o)
                    if v_norm == 0:
                        # Both sides were the unperturbed point, but a sum of batches
                        # added and then subtracted is zero only up to rounding; the
                        # product is exactly zero (its passes checked the data and loss).
                        buffer.zero_()
                    buffer.div_(2 * h)
                    if m > 1:
                        total[:, j].copy_(buffer)
            finally:
                with torch.no_grad():
                    for p, o in zip(op.params, origin):
                        p.copy_(o)
        return total, losses


def _parameter_views(flat: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Views of a contiguous ``(n,)`` tensor shaped like ``params`` (global shapes for
    DTensors); ``view`` (never a copy), so writes into them land in ``flat``."""
    sizes = [p.numel() for p in params]
    return [c.view(p.shape) for c, p in zip(flat.split(sizes), params)]


HESSIAN_STRATEGIES: dict[str, type[HessianStrategy]] = {
    s.name: s for s in (DoubleBackward, ForwardOverReverse, FiniteDifferenceHessian)}
