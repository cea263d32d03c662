"""The Jacobian of a model's outputs over a data set, as a ``(outputs, n)`` operator.

For SVDs of Jacobians, Gauss-Newton pieces (``J^T C J`` with any output-space ``C``),
and influence computations in output space. The products reuse the GGN's per-batch
kernels (:mod:`torchcurv.operators.jacobian`) and its walk over the data, with every
check that walk makes (changed data, the model given back bit-identical).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from typing_extensions import Self, Unpack

from torchcurv.dtypes import accumulation_dtype
from torchcurv.errors import DataChangedError
from torchcurv.objectives import Objective
from torchcurv.operators.config import CurvatureOptions, OutputSpaceConfig
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

    Arguments: as for :class:`~torchcurv.GGNOperator`. ``J`` is the Jacobian of this
    process's data: under ``torch.distributed`` each rank has its own rows (no collective
    runs), so ``distributed`` must stay ``False`` (its default here) and
    ``process_group`` / ``debug_distributed`` unset. :attr:`config` and :meth:`replace`
    are the :attr:`ggn`'s.

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
        jvp: JvpMethod = "forward",
        **options: Unpack[CurvatureOptions],
    ) -> None:
        for name in ("distributed", "process_group", "debug_distributed"):
            if options.get(name) not in (None, False):
                raise ValueError(
                    f"JacobianOperator is the Jacobian of this process's data, it runs no "
                    f"collective: {name}={options.get(name)!r} is not possible"
                )
        options["distributed"] = False
        self.ggn = GGNOperator(model, criterion, data, jvp=jvp, **options)
        g = self.ggn
        # one no-grad pass learns each batch's output shape (the rows of J); first-order,
        # so SDPA keeps its default backends
        with preserved(g.model), torch.no_grad():
            self.output_shapes = [tuple(g.objective.forward(g.model, batch).shape)
                                  for _, batch, _ in g._batches()]
        self._sizes = [int(torch.Size(s).numel()) for s in self.output_shapes]
        self.outputs = sum(self._sizes)
        self.n = g.n
        super().__init__(self.outputs, g.n, g.dtype, g.device)

    @property
    def config(self) -> OutputSpaceConfig:
        """The arguments this operator was built with (its :attr:`ggn`'s)."""
        config = self.ggn.config
        assert isinstance(config, OutputSpaceConfig)
        return config

    def replace(self, **changes: Any) -> Self:
        """A new ``JacobianOperator`` from :attr:`config` with ``changes``, as
        ``dataclasses.replace`` (unknown names raise a ``TypeError`` listing the fields)."""
        config = self.config.replace("JacobianOperator.replace", **changes)
        return type(self)(config.model, config.criterion, config.data, **config.keywords())

    def __repr__(self) -> str:
        return repr(self.ggn).replace("GGNOperator", type(self).__name__, 1)

    def _checked(self, i: int, output: torch.Tensor) -> torch.Tensor:
        if tuple(output.shape[-len(self.output_shapes[i]):]) != self.output_shapes[i]:
            raise DataChangedError(
                f"batch {i}'s output has shape {tuple(output.shape)}, not the "
                f"{self.output_shapes[i]} it had at construction; build a new operator"
            )
        return output

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        g = self.ggn
        strategy = g.derivative
        product = g._new_product()
        blocks = g._split_block(V)
        m = V.shape[1]
        pieces = []
        with strategy.attention(), strategy.serialised(), preserved(g.model, guard=g._guard):
            for i, batch, _ in g._batches():
                g._enter_batch(product, i)
                _, jv = strategy.jacobian_block(g, batch, blocks, product)
                pieces.append(self._checked(i, jv).reshape(m, -1))
        return torch.cat(pieces, dim=1).T.to(self.dtype)

    def _rmatmat(self, W: torch.Tensor) -> torch.Tensor:
        g = self.ggn
        m = W.shape[1]
        total = torch.zeros(g.n, m, dtype=accumulation_dtype(W.dtype), device=W.device)
        rows = W.split(self._sizes, dim=0)
        # first order (one forward with graph, one backward): default SDPA backends
        with preserved(g.model, guard=g._guard):
            for i, batch, _ in g._batches():
                output = self._checked(i, forward_with_graph(g.model, g.objective, batch))
                cotangents = rows[i].T.reshape(m, *output.shape).to(output.dtype)
                total.add_(g._join_block(vjp_batched(output, g.params, cotangents)))
        return total.to(self.dtype)
