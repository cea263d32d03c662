"""Derivative strategies: how a curvature product differentiates the model.

Each strategy is one object, picked once at construction by :func:`strategy_for` from the
operator's ``method=`` (Hessian) or ``jvp=`` (``Jᵀ C J`` operators), and asked for its
work on every product; the operators do not dispatch on the method's name per call.

- Hessian (:mod:`torchcurv.derivatives.hessian`): ``"autograd"`` (double backward),
  ``"forward_over_reverse"`` (``torch.func.jvp`` of ``torch.func.grad``),
  ``"finite_difference"`` (central differences of full gradients, its own walk over the
  data per vector).
- JVP (:mod:`torchcurv.derivatives.jvp`): ``"forward"``, ``"double_vjp"``,
  ``"finite_difference"``.

What a strategy needs is stated on it (:class:`~torchcurv.derivatives.base.Strategy`):
second-order or forward-mode derivatives through the model (products then run with SDPA
restricted to its math backend), FSDP2 support, whether it walks the data per vector,
whether it perturbs the parameters in place.
"""

from torchcurv.derivatives.base import Strategy, strategy_for

__all__ = ["Strategy", "strategy_for"]
