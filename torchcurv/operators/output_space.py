"""Curvature of the form ``sum_b Jᵀ_b C_b J_b``: GGN, empirical and Monte-Carlo Fisher.

``J_b`` is the Jacobian of batch ``b``'s model output with respect to the selected
parameters and ``C_b`` a symmetric output-space matrix (already scaled to the batch's
share of the data set's loss). A product never forms ``J``: ``J V`` by forward-mode AD,
double backward or finite differences, then ``C_b`` in output space, then one batched
backward for ``Jᵀ``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from torchcurv.derivatives import strategy_for
from torchcurv.derivatives.jvp import JvpStrategy, ProductState
from torchcurv.losses.base import OutputCurvature
from torchcurv.objectives import Objective, has_separate_output
from torchcurv.operators.config import CurvatureConfig, OutputSpaceConfig
from torchcurv.operators.curvature import BatchLosses, CurvatureOperator
from torchcurv.operators.jacobian import JvpMethod, vjp_batched

Batch = Any

__all__ = ["OutputSpaceOperator", "ProductState"]


class OutputSpaceOperator(CurvatureOperator):
    """Base of the ``Jᵀ C J`` operators; subclasses supply the output-space ``C_b``.

    Takes ``model, criterion, data`` and the keywords of
    :class:`~torchcurv.operators.config.CurvatureConfig`, and:

    Args:
        jvp: how ``J V`` is computed (the strategies of :mod:`torchcurv.derivatives.jvp`):

            - ``"forward"`` (default): ``torch.func.jvp`` vmapped over the block. Needs
              forward-mode AD for the model's ops (SDPA flash attention has none).
            - ``"double_vjp"``: the derivative of ``u -> Jᵀu`` along ``V``; reverse mode
              only, but needs double backward through the model.
            - ``"finite_difference"``: ``(f(θ + h v) - f(θ - h v)) / 2h`` with two no-grad
              forwards per vector; no tangent or second graph, so the leanest in
              memory; about 1e-10 relative error in float64, 1e-4 in float32. Parameters
              are perturbed in place and restored bit-exactly.
    """

    config_type = OutputSpaceConfig
    derivative: JvpStrategy

    def __init__(
        self,
        model: nn.Module,
        criterion: nn.Module | Objective,
        data: Iterable[Batch],
        *,
        jvp: JvpMethod = "forward",
        # Any rather than Unpack[CurvatureOptions]: mypy 2.4 fails to join the Unpack
        # constructors of HessianOperator and GGNOperator (an inferred dict of the two)
        **options: Any,
    ) -> None:
        self._build(OutputSpaceConfig.of(type(self).__name__, model, criterion, data,
                                         jvp=jvp, **options))

    def _build(self, config: CurvatureConfig) -> None:
        assert isinstance(config, OutputSpaceConfig)
        self.derivative = strategy_for("jvp", config.jvp, compile=config.compile)
        self.jvp = config.jvp
        super()._build(config)
        if not has_separate_output(self.objective):
            raise ValueError(
                f"{type(self).__name__} needs the model output separate from the loss; "
                "Objective.from_loss_fn gives only the loss. Pass a criterion or "
                "Objective(forward=..., loss=..., weight=...)"
            )

    # -- what subclasses provide ---------------------------------------------------
    def _output_curvature(
        self,
        output: torch.Tensor,
        batch: Batch,
        scale: torch.Tensor | float,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, OutputCurvature]:
        """The batch's unscaled loss and ``C_b`` (including ``scale``) at ``output``;
        ``generator`` is the product's random stream (only sampled ``C_b`` use it)."""
        raise NotImplementedError

    def _new_product(self) -> ProductState:
        """The state a product starts from."""
        return self.derivative.new_product(self)

    def _enter_batch(self, product: ProductState, index: int) -> None:
        """Called before each batch (each microbatch) the product visits."""
        product.batch = index

    # -- products ------------------------------------------------------------------
    def _local_matmat(self, V: torch.Tensor) -> tuple[torch.Tensor, BatchLosses]:
        # CurvatureOperator's walk over the batches, with the product's state passed down
        # (the base walk has no place for it). Forward-mode JVPs hold the transforms lock
        # for the whole product (Strategy.serialised). Finite differences restore the
        # parameters from the product's own copy after every vector (also on errors), so
        # preserved need not copy them again.
        product = self._new_product()
        with self.derivative.serialised():
            return self._walk_batches(
                V, lambda op, batch, scale, blocks: self._batch_matmat(
                    batch, scale, blocks, product),
                enter=lambda i: self._enter_batch(product, i))

    def _batch_matmat(self, batch, scale, blocks, product: ProductState | None = None):
        if product is None:  # a lone batch product, outside a walk over the data
            product = self._new_product()
        output, jv = self.derivative.jacobian_block(self, batch, blocks, product)
        loss, curvature = self._output_curvature(
            output.detach(), batch, scale, product.generator
        )
        return loss, vjp_batched(output, self.params, curvature.matmat(jv.to(output.dtype)))
