"""How the ``Jᵀ C J`` operators (GGN, Fishers, :class:`~torchcurv.JacobianOperator`)
compute ``J V`` for one batch: one strategy per ``jvp=``.

Every strategy returns the batch's output with its autograd graph (for the ``Jᵀ``
backward that follows) and ``J V`` of shape ``(m, *output.shape)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from torchcurv.derivatives.base import Strategy
from torchcurv.operators.jacobian import (
    forward_jvp_kernel,
    forward_with_graph,
    jvp_double_vjp,
    jvp_finite_difference,
    jvp_forward_mode,
)

if TYPE_CHECKING:
    from torchcurv.operators.curvature import CurvatureOperator

Batch = Any


@dataclass
class ProductState:
    """What one product carries besides the operator's fixed attributes.

    Built afresh by every product and passed down to the batch kernels instead of being
    kept on the operator, so that products running concurrently (threads sharing the
    operator) or nested never see each other's.

    Attributes:
        origin: the selected parameters' values before the product (finite differences
            restore them after every perturbation).
        generator: the Monte-Carlo Fisher's random stream for the current batch.
        batch: index of the batch the product is at.
    """

    origin: list[torch.Tensor] | None = None
    generator: torch.Generator | None = None
    batch: int | None = None


class JvpStrategy(Strategy):
    """``J V`` of one batch, for the operators built on ``Jᵀ C J``."""

    argument = "jvp"

    def new_product(self, op: CurvatureOperator) -> ProductState:
        """The state a product starts from."""
        return ProductState()

    def jacobian_block(self, op: CurvatureOperator, batch: Batch, blocks: list[torch.Tensor],
                       product: ProductState) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's output (with graph) and ``J V`` of shape ``(m, *output.shape)``."""
        raise NotImplementedError


class ForwardJvp(JvpStrategy):
    """``jvp="forward"``: ``torch.func.jvp`` vmapped over the block; about one forward
    with tangents per vector; one product at a time process-wide. Compiled, ``J V`` is
    one graph; the forward that records the graph for ``Jᵀ`` and the batched backward
    through it (``is_grads_batched``) stay eager, as for every ``jvp=``."""

    name = "forward"
    needs_forward_mode = True
    can_compile = True

    def jacobian_block(self, op, batch, blocks, product):
        output = forward_with_graph(op.model, op.objective, batch)
        compiled = (self.compiled(op, forward_jvp_kernel, op.objective.forward)
                    if self.compile else None)
        return output, jvp_forward_mode(op.model, op.objective, batch, op.param_names,
                                        op.params, blocks, compiled=compiled)


class DoubleVjp(JvpStrategy):
    """``jvp="double_vjp"``: the derivative of ``u -> Jᵀu`` along ``V``; reverse mode
    only, through the model's backward."""

    name = "double_vjp"
    needs_second_order = True

    def jacobian_block(self, op, batch, blocks, product):
        output = forward_with_graph(op.model, op.objective, batch)
        return output, jvp_double_vjp(output, op.params, blocks)


class FiniteDifferenceJvp(JvpStrategy):
    """``jvp="finite_difference"``: ``(f(θ + h v) - f(θ - h v)) / 2h``, two no-grad
    forwards per vector; first-order only (default SDPA backends). The product keeps one
    copy of the parameters to restore them bit for bit after every vector."""

    name = "finite_difference"
    perturbs_params = True

    def new_product(self, op):
        return ProductState(origin=[p.detach().clone() for p in op.params])

    def jacobian_block(self, op, batch, blocks, product):
        # before the graph is recorded: in-place perturbations would invalidate it
        assert product.origin is not None  # new_product saves it for this strategy
        jv = jvp_finite_difference(op.model, op.objective, batch, op.params, product.origin,
                                   blocks)
        return forward_with_graph(op.model, op.objective, batch), jv


JVP_STRATEGIES: dict[str, type[JvpStrategy]] = {
    s.name: s for s in (ForwardJvp, DoubleVjp, FiniteDifferenceJvp)}
