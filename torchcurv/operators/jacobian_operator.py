"""The Jacobian of a model's outputs over a data set, as a ``(outputs, n)`` operator.

For SVDs of Jacobians, Gauss-Newton pieces (``J^T C J`` with any output-space ``C``),
and influence computations in output space. The products reuse the GGN's per-batch
kernels (:mod:`torchcurv.operators.jacobian`) and its walk over the data, with every
check that walk makes (changed data, the model given back bit-identical).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from torchcurv.dtypes import accumulation_dtype
from torchcurv.errors import DataChangedError
from torchcurv.objectives import Objective
from torchcurv.operators.attention import differentiable_attention
from torchcurv.operators.functional import serialised_transforms
from torchcurv.operators.ggn import GGNOperator
from torchcurv.operators.jacobian import JvpMethod, forward_with_graph, vjp_batched
from torchcurv.operators.model_guard import preserved
from torchcurv.operators.rectangular import RectangularOperator

Batch = Any


class JacobianOperator(RectangularOperator):
    """``J``: the derivative of the model outputs with respect to the selected parameters.

    The outputs are the tensors the criterion receives (``model(X)``, or the
    :class:`~torchcurv.Objective`'s ``forward``), over the whole data set in data order:
    batch 0's output flattened (row-major), then batch 1's, and so on. So ``J`` has shape
    ``(outputs, n)`` with ``outputs`` the sum of the outputs' sizes.

    * ``J @ v`` / :meth:`matvec` / :meth:`matmat`: a JVP per batch (``jvp=``, as for
      :class:`~torchcurv.GGNOperator`), concatenated; cost per batch for ``m`` vectors:
      the GGN's ``J V`` (the forward that records a graph included).
    * ``J.T @ w`` / :meth:`rmatvec` / :meth:`rmatmat`: a batched VJP per batch, summed;
      cost per batch: one forward with graph and one batched backward.
    * :func:`torchcurv.as_linear_operator` gives a non-square scipy operator whose
      ``rmatvec``, ``.T`` and ``.H`` are the transpose's, so
      ``scipy.sparse.linalg.svds(as_linear_operator(J), k)`` and ``lsqr`` work.
    * ``J.T @ (H_out @ (J @ V))`` is :attr:`ggn` ``@ V``, where ``H_out`` is the
      block-diagonal matrix of the batches' loss Hessians in their outputs, each scaled
      by the batch's share of the data set's loss.

    Arguments ``model``, ``criterion``, ``data``, ``params``, ``param_filter``, ``jvp``,
    ``check_deterministic``: as for :class:`~torchcurv.GGNOperator`. ``J`` is the
    Jacobian of this process's data: under ``torch.distributed`` each rank has its own
    rows (no collective runs).

    Attributes:
        ggn: the :class:`~torchcurv.GGNOperator` of the same model, criterion, data and
            parameters (it holds the parameters, the objective and the data walk).
        output_shapes: the shape of each batch's output.
        outputs: the number of rows, ``sum(prod(shape) for shape in output_shapes)``.
        n: the number of columns, the selected parameter entries.
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
    ) -> None:
        self.ggn = GGNOperator(model, criterion, data, params=params, param_filter=param_filter,
                               jvp=jvp, check_deterministic=check_deterministic,
                               distributed=False)
        g = self.ggn
        # one no-grad pass learns each batch's output shape (the rows of J)
        with differentiable_attention(), preserved(g.model), torch.no_grad():
            self.output_shapes = [tuple(g.objective.forward(g.model, batch).shape)
                                  for _, batch, _ in g._batches()]
        self._sizes = [int(torch.Size(s).numel()) for s in self.output_shapes]
        self.outputs = sum(self._sizes)
        self.n = g.n
        super().__init__(self.outputs, g.n, g.dtype, g.device)

    def _checked(self, i: int, output: torch.Tensor) -> torch.Tensor:
        if tuple(output.shape[-len(self.output_shapes[i]):]) != self.output_shapes[i]:
            raise DataChangedError(
                f"batch {i}'s output has shape {tuple(output.shape)}, not the "
                f"{self.output_shapes[i]} it had at construction; build a new operator"
            )
        return output

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        g = self.ggn
        product = g._new_product()
        blocks = g._split_block(V)
        m = V.shape[1]
        pieces = []
        lock = serialised_transforms() if g.jvp == "forward" else nullcontext()
        with differentiable_attention(), lock, preserved(g.model, g._perturbed_params()):
            for i, batch, _ in g._batches():
                g._enter_batch(product, i)
                _, jv = g._jacobian_block(batch, blocks, product)
                pieces.append(self._checked(i, jv).reshape(m, -1))
        return torch.cat(pieces, dim=1).T.to(self.dtype)

    def _rmatmat(self, W: torch.Tensor) -> torch.Tensor:
        g = self.ggn
        m = W.shape[1]
        total = torch.zeros(g.n, m, dtype=accumulation_dtype(W.dtype), device=W.device)
        rows = W.split(self._sizes, dim=0)
        with differentiable_attention(), preserved(g.model):
            for i, batch, _ in g._batches():
                output = self._checked(i, forward_with_graph(g.model, g.objective, batch))
                cotangents = rows[i].T.reshape(m, *output.shape).to(output.dtype)
                total.add_(g._join_block(vjp_batched(output, g.params, cotangents)))
        return total.to(self.dtype)
