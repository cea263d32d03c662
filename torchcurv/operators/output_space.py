"""Curvature of the form ``sum_b Jᵀ_b C_b J_b``: GGN, empirical and Monte-Carlo Fisher.

``J_b`` is the Jacobian of batch ``b``'s model output with respect to the selected
parameters and ``C_b`` a symmetric output-space matrix (already scaled to the batch's
share of the data set's loss). A product never forms ``J``: ``J V`` by forward-mode AD,
double backward or finite differences, then ``C_b`` in output space, then one batched
backward for ``Jᵀ``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from torchcurv.losses.base import OutputCurvature
from torchcurv.objectives import Objective, has_separate_output
from torchcurv.operators.curvature import BatchLosses, CurvatureOperator, accumulation_dtype
from torchcurv.operators.functional import serialised_transforms
from torchcurv.operators.jacobian import (
    JVP_METHODS,
    JvpMethod,
    forward_with_graph,
    jvp_double_vjp,
    jvp_finite_difference,
    jvp_forward_mode,
    vjp_batched,
)
from torchcurv.operators.model_guard import preserved

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


class OutputSpaceOperator(CurvatureOperator):
    """Base of the ``Jᵀ C J`` operators; subclasses supply the output-space ``C_b``.

    ``model``, ``criterion``, ``data``, ``params``, ``param_filter``,
    ``check_deterministic``, ``process_group``, ``distributed``, ``debug_distributed``,
    ``microbatch_size``: as for :class:`~torchcurv.operators.curvature.CurvatureOperator`.

    Args:
        jvp: how ``J V`` is computed:

            - ``"forward"`` (default): ``torch.func.jvp`` vmapped over the block. Needs
              forward-mode AD for the model's ops (SDPA flash attention has none).
            - ``"double_vjp"``: the derivative of ``u -> Jᵀu`` along ``V``; reverse mode
              only, but needs double backward through the model.
            - ``"finite_difference"``: ``(f(θ + h v) - f(θ - h v)) / 2h`` with two no-grad
              forwards per vector; no tangent or second graph, so the leanest in
              memory; about 1e-10 relative error in float64, 1e-4 in float32. Parameters
              are perturbed in place and restored bit-exactly.
    """

    def __init__(
        self,
        model: nn.Module,
        criterion: nn.Module | Objective,
        data: Iterable[Batch],
        *,
        params: Iterable[torch.Tensor] | None = None,
        param_filter: str | Sequence[str] | None = None,
        jvp: JvpMethod = "forward",
        check_deterministic: bool = True,
        process_group: Any = None,
        distributed: bool | None = None,
        debug_distributed: bool = False,
        microbatch_size: int | None = None,
    ) -> None:
        if jvp not in JVP_METHODS:
            raise ValueError(f"jvp must be one of {JVP_METHODS}, got {jvp!r}")
        self.jvp = jvp
        super().__init__(
            model, criterion, data, params=params, param_filter=param_filter,
            check_deterministic=check_deterministic, process_group=process_group,
            distributed=distributed, debug_distributed=debug_distributed,
            microbatch_size=microbatch_size,
        )
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
        if self.jvp != "finite_difference":
            return ProductState()
        return ProductState(origin=[p.detach().clone() for p in self.params])

    def _enter_batch(self, product: ProductState, index: int) -> None:
        """Called before each batch (each microbatch) the product visits."""
        product.batch = index

    # -- products ------------------------------------------------------------------
    def _perturbed_params(self) -> Sequence[torch.Tensor]:
        return self.params if self.jvp == "finite_difference" else ()

    def _local_matmat(self, V: torch.Tensor) -> tuple[torch.Tensor, BatchLosses]:
        # CurvatureOperator's walk over the batches, with the product's state passed down
        # (the base walk has no place for it).
        # With forward-mode JVPs the whole product holds the transform lock, not only the
        # JVPs: functional_call swaps the model's parameters during a JVP, and another
        # product of this operator (same model) recording its graph at that moment would
        # differentiate the swapped tensors.
        product = self._new_product()
        blocks = self._split_block(V)
        total = torch.zeros_like(V, dtype=accumulation_dtype(V.dtype))
        losses = BatchLosses()
        lock = serialised_transforms() if self.jvp == "forward" else nullcontext()
        with lock, preserved(self.model, self._perturbed_params()):
            for i, batch, scale in self._batches():
                self._enter_batch(product, i)
                loss, out = self._batch_matmat(batch, scale, blocks, product)
                losses.add(i, loss)
                total.add_(self._join_block(out))
        return total, losses

    def _jacobian_block(self, batch: Batch, blocks: list[torch.Tensor], product: ProductState):
        """The batch's output (with graph) and ``J V`` of shape ``(m, *output.shape)``."""
        if self.jvp == "finite_difference":
            # before the graph is recorded: in-place perturbations would invalidate it
            assert product.origin is not None  # _new_product saves it for this method
            jv = jvp_finite_difference(
                self.model, self.objective, batch, self.params, product.origin, blocks
            )
            return forward_with_graph(self.model, self.objective, batch), jv
        output = forward_with_graph(self.model, self.objective, batch)
        if self.jvp == "double_vjp":
            return output, jvp_double_vjp(output, self.params, blocks)
        jv = jvp_forward_mode(
            self.model, self.objective, batch, self.param_names, self.params, blocks
        )
        return output, jv

    def _batch_matmat(self, batch, scale, blocks, product: ProductState | None = None):
        if product is None:  # a lone batch product, outside a walk over the data
            product = self._new_product()
        output, jv = self._jacobian_block(batch, blocks, product)
        loss, curvature = self._output_curvature(
            output.detach(), batch, scale, product.generator
        )
        return loss, vjp_batched(output, self.params, curvature.matmat(jv.to(output.dtype)))
