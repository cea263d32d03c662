"""Dense reference matrices of curvature operators, built by plain autograd.

Independent of the operators' product code: per batch, ``torch.autograd.functional``
builds the full parameter Hessian, or the explicit Jacobian ``J_b`` of the output and
the output-space matrix ``C_b``. No ``torch.func`` transform is used (wrong through
LayerNorm in torch 2.13). Only for small models: ``n x n`` and ``output.numel() x n``
matrices are formed.
"""

from __future__ import annotations

import torch
from torch.func import functional_call

from torchcurv.operators.base import LinearOperator
from torchcurv.operators.curvature import CurvatureOperator
from torchcurv.operators.fisher import MCFisherOperator
from torchcurv.operators.ggn import GGNOperator
from torchcurv.operators.hessian import HessianOperator
from torchcurv.operators.model_guard import preserved
from torchcurv.operators.output_space import OutputSpaceOperator


def dense_matrix(op: LinearOperator, max_n: int = 5_000) -> torch.Tensor:
    """The ``(n, n)`` matrix ``op`` represents, computed without ``op``'s products.

    Supports :class:`HessianOperator` and the ``Jᵀ C J`` operators (GGN, empirical and
    Monte-Carlo Fisher). For the GGN, ``C_b`` is the autograd Hessian of the batch loss
    in the output; for the Fisher operators it is the operator's own output-space factor
    (same gradients / same sampled labels), so what is checked is everything else.
    """
    if op.n > max_n:
        raise ValueError(f"a dense reference needs n <= {max_n}, the operator has n={op.n}")
    if not isinstance(op, (HessianOperator, OutputSpaceOperator)):
        raise TypeError(f"no dense reference is known for {type(op).__name__}")
    total = torch.zeros(op.n, op.n, dtype=op.dtype, device=op.device)
    if isinstance(op, MCFisherOperator):
        # draw from the same streams, in the same order, as a product does: the
        # operator's _batches switches to per-batch generators where it uses them
        op._rng = op.fresh_generator()
    try:
        with preserved(op.model):
            for _, batch, scale in op._batches():
                if isinstance(op, HessianOperator):
                    total += _batch_hessian(op, batch, scale)
                else:
                    total += _batch_output_space(op, batch, scale)
    finally:
        if isinstance(op, MCFisherOperator):
            op._rng = None
    return total


def _flat_function(op: CurvatureOperator, fn):
    """``theta -> fn(model with the selected params set from theta)``."""
    shapes = [p.shape for p in op.params]
    sizes = [p.numel() for p in op.params]

    def f(theta: torch.Tensor):
        values = dict(zip(op.param_names, (c.view(s) for c, s in
                                           zip(theta.split(sizes), shapes))))
        return fn(lambda batch: _call(op, values, batch))

    theta0 = torch.cat([p.detach().reshape(-1) for p in op.params])
    return f, theta0


def _call(op: CurvatureOperator, values: dict, batch):
    """``objective.forward`` with the selected parameters replaced by ``values``."""
    class _Forward(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = op.model

        def forward(self):
            return op.objective.forward(self.model, batch)

    return functional_call(_Forward(), {"model." + k: v for k, v in values.items()}, ())


def _scaled(value: torch.Tensor, scale) -> torch.Tensor:
    return value * (scale.to(value.dtype) if isinstance(scale, torch.Tensor) else scale)


def _batch_hessian(op: HessianOperator, batch, scale) -> torch.Tensor:
    f, theta = _flat_function(op, lambda fwd: op.objective.loss(fwd(batch), batch))
    return torch.autograd.functional.hessian(lambda t: _scaled(f(t), scale), theta)


def _batch_output_space(op: OutputSpaceOperator, batch, scale) -> torch.Tensor:
    f, theta = _flat_function(op, lambda fwd: fwd(batch))
    output = f(theta).detach()
    J = torch.autograd.functional.jacobian(f, theta).reshape(output.numel(), -1)
    d = output.numel()
    if isinstance(op, GGNOperator):
        H = torch.autograd.functional.hessian(
            lambda o: _scaled(op.objective.loss(o, batch), scale), output
        )
        C = H.reshape(d, d)
    else:
        C = op._output_curvature(output, batch, scale)[1].to_dense()
    return J.T @ C @ J
