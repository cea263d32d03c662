"""What every derivative strategy states about itself, and the factory that picks one."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, ClassVar, Literal, overload

from torchcurv.operators.attention import differentiable_attention
from torchcurv.operators.functional import serialised_transforms

if TYPE_CHECKING:
    from torchcurv.derivatives.hessian import HessianStrategy
    from torchcurv.derivatives.jvp import JvpStrategy


class Strategy:
    """A way of differentiating the model during products, chosen once per operator.

    Strategies hold no per-product state (that lives in the product's locals or its
    :class:`~torchcurv.derivatives.jvp.ProductState`), so one strategy object serves
    concurrent and nested products.

    Attributes:
        name: the ``method=`` / ``jvp=`` value that selects it.
        needs_second_order: differentiates the model's backward (double backward).
        needs_forward_mode: pushes tangents through the model (``torch.func.jvp``); such
            products hold the process-wide transforms lock for their whole duration.
        supports_fsdp: works on FSDP2-sharded models (needs only gradients).
        walks_data_per_vector: walks the data once per vector (per side) instead of
            once per block.
        perturbs_params: writes perturbed values into the parameters (restored bit for
            bit), so one operator must not be shared by threads.
    """

    name: ClassVar[str]
    needs_second_order: ClassVar[bool] = False
    needs_forward_mode: ClassVar[bool] = False
    supports_fsdp: ClassVar[bool] = False
    walks_data_per_vector: ClassVar[bool] = False
    perturbs_params: ClassVar[bool] = False

    @property
    def restricts_attention(self) -> bool:
        """Whether products run with SDPA restricted to its math backend: fused attention
        kernels have neither a double backward nor forward-mode rules, but first-order
        passes (gradients, no-grad forwards) go through them, which keeps attention
        ``O(T)`` in memory instead of ``O(T^2)``."""
        return self.needs_second_order or self.needs_forward_mode

    def attention(self) -> contextlib.AbstractContextManager[None]:
        """The SDPA restriction a product runs under: math backend for second order,
        ``order="jvp"`` (forward-mode capable kernels) for forward mode only, none for
        first-order strategies."""
        if self.needs_second_order:
            return differentiable_attention("second")
        if self.needs_forward_mode:
            return differentiable_attention("jvp")
        return contextlib.nullcontext()

    def serialised(self) -> contextlib.AbstractContextManager[None]:
        """The whole product under the transforms lock for forward-mode strategies:
        ``functional_call`` swaps the model's parameters during a JVP, which another
        product on the same model must not see while it records its graph."""
        return serialised_transforms() if self.needs_forward_mode else contextlib.nullcontext()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


@overload
def strategy_for(argument: Literal["method"], name: str) -> HessianStrategy: ...
@overload
def strategy_for(argument: Literal["jvp"], name: str) -> JvpStrategy: ...
def strategy_for(argument: str, name: str) -> Strategy:
    """The strategy that ``method=name`` (the Hessian's) or ``jvp=name`` (the ``Jᵀ C J``
    operators') selects; a ``ValueError`` listing the choices for any other name."""
    from torchcurv.derivatives.hessian import HESSIAN_STRATEGIES
    from torchcurv.derivatives.jvp import JVP_STRATEGIES

    registries: dict[str, dict[str, type[Strategy]]] = {
        "method": dict(HESSIAN_STRATEGIES), "jvp": dict(JVP_STRATEGIES)}
    if argument not in registries:
        raise ValueError(f"argument must be one of {tuple(registries)}, got {argument!r}")
    choices = registries[argument]
    if not isinstance(name, str) or name not in choices:
        raise ValueError(f"{argument} must be one of {tuple(choices)}, got {name!r}")
    return choices[name]()
