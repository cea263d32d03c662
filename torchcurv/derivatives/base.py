"""What every derivative strategy states about itself, and the factory that picks one."""

from __future__ import annotations

import contextlib
import types
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Literal, overload

import torch

from torchcurv.operators.attention import differentiable_attention
from torchcurv.operators.functional import BoundCall, compile_errors, serialised_transforms

if TYPE_CHECKING:
    from torchcurv.derivatives.hessian import HessianStrategy
    from torchcurv.derivatives.jvp import JvpStrategy
    from torchcurv.operators.curvature import CurvatureOperator

# The torch.compile backend of compiled products; the tests set "aot_eager" (dynamo and
# AOTAutograd without inductor's C++ build, which takes tens of seconds per graph on a CPU).
_COMPILE_BACKEND = "inductor"


class Strategy:
    """A way of differentiating the model during products, chosen once per operator.

    Strategies hold no per-product state (that lives in the product's locals or its
    :class:`~torchcurv.derivatives.jvp.ProductState`), so one strategy object serves
    concurrent and nested products.

    Attributes:
        name: the ``method=`` / ``jvp=`` value that selects it.
        argument: which of the two keywords selects it (``"method"`` or ``"jvp"``).
        needs_second_order: differentiates the model's backward (double backward).
        needs_forward_mode: pushes tangents through the model (``torch.func.jvp``); such
            products hold the process-wide transforms lock for their whole duration.
        supports_fsdp: works on FSDP2-sharded models (needs only gradients).
        walks_data_per_vector: walks the data once per vector (per side) instead of
            once per block.
        perturbs_params: writes perturbed values into the parameters (restored bit for
            bit), so one operator must not be shared by threads.
        can_compile: has a ``torch.compile`` path (``compile=True``): its per-batch
            derivative is ``torch.func`` transforms only, which dynamo traces; double
            backward (``torch.autograd.grad`` with ``create_graph``) is not traced.
        compile: products run the compiled path (:class:`CompiledKernel`), chosen at
            construction.
        one_vector_rows: its per-batch kernels read a one-vector block as rows
            ``(1, *param.shape)``; ``False``: only as parameter-shaped vectors
            (:attr:`~torchcurv.operators.base.ParameterBlock.vectors`), so the walk
            over the data makes no rows.
    """

    name: ClassVar[str]
    argument: ClassVar[str]
    needs_second_order: ClassVar[bool] = False
    needs_forward_mode: ClassVar[bool] = False
    supports_fsdp: ClassVar[bool] = False
    walks_data_per_vector: ClassVar[bool] = False
    perturbs_params: ClassVar[bool] = False
    can_compile: ClassVar[bool] = False
    one_vector_rows: ClassVar[bool] = True

    def __init__(self, compile: bool = False) -> None:
        self.compile = compile
        # one compiled kernel per kernel function, made at the first product
        self._compiled: dict[Callable[..., Any], CompiledKernel] = {}

    def compiled(self, op: CurvatureOperator, kernel: Callable[..., Any],
                 call: Callable[[Any, Any], torch.Tensor]) -> CompiledKernel:
        """``kernel`` compiled for ``op``'s products with ``BoundCall(op.model, call)``,
        made at the first call and reused: a compiled function is no per-product state,
        and a fresh module per product would fail dynamo's guards and recompile."""
        found = self._compiled.get(kernel)
        if found is None:
            found = self._compiled[kernel] = CompiledKernel(kernel, BoundCall(op.model, call),
                                                            op.device)
        return found

    @property
    def restricts_attention(self) -> bool:
        """Whether products run with SDPA restricted to its math backend: fused attention
        kernels have neither a double backward nor forward-mode rules, but first-order
        passes (gradients, no-grad forwards) go through them, which keeps attention
        ``O(T)`` in memory instead of ``O(T^2)``."""
        return self.needs_second_order or self.needs_forward_mode

    def attention(self) -> contextlib.AbstractContextManager[None]:
        """The SDPA restriction a product runs under: math backend for second order by
        double backward; ``order="jvp"`` (the Triton attention where it applies, math
        otherwise) for forward mode, including a strategy that needs both, whose second
        order is forward mode over a first-order backward (forward over reverse, which
        the kernel differentiates); none for first-order strategies. Compiled products
        keep the math backend: dynamo cannot trace the kernel's autograd.Functions under
        torch.func transforms ("Cannot access storage of TensorWrapper")."""
        if self.needs_second_order and not self.needs_forward_mode:
            return differentiable_attention("second")
        if self.needs_forward_mode:
            return differentiable_attention("second" if self.compile else "jvp")
        return contextlib.nullcontext()

    def serialised(self) -> contextlib.AbstractContextManager[None]:
        """The whole product under the transforms lock for forward-mode strategies:
        ``functional_call`` swaps the model's parameters during a JVP, which another
        product on the same model must not see while it records its graph."""
        return serialised_transforms() if self.needs_forward_mode else contextlib.nullcontext()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}{' compiled' if self.compile else ''}>"


class CompiledKernel:
    """A per-batch kernel of one operator under ``torch.compile`` (``dynamic=False``,
    ``fullgraph=True``: a graph break raises instead of running part of it eagerly), with
    the :class:`~torchcurv.operators.functional.BoundCall` it differentiates (``bound``).

    The kernel runs as a copy of its function with a code object of its own, since
    dynamo keeps compiled graphs and counts recompiles per code object: this operator's
    graphs are its own, and other operators' do not use up its recompile budget. It
    compiles once per batch shape and block width ``m`` (dim 0 of the vectors' blocks),
    up to ``torch._dynamo.config.recompile_limit`` graphs (8 by default); products of
    further shapes run the kernel uncompiled, with one ``RuntimeWarning``. Python floats
    among the arguments (a batch's share of the loss) are passed as float64 tensors on
    the operator's device: as constants of the graph they would recompile it for every
    batch weight.
    """

    def __init__(self, kernel: Callable[..., Any], bound: BoundCall, device: torch.device
                 ) -> None:
        own = types.FunctionType(kernel.__code__.replace(), kernel.__globals__,
                                 kernel.__name__, kernel.__defaults__, kernel.__closure__)
        own.__kwdefaults__ = kernel.__kwdefaults__
        self.bound = bound
        self.device = device
        self._kernel = kernel
        self._run = torch.compile(own, dynamic=False, fullgraph=True,
                                  backend=_COMPILE_BACKEND)
        self._over_limit_warned = False

    def __call__(self, *args: Any) -> Any:
        # torch.full, a fill kernel: no copy from host memory (which a CUDA graph being
        # recorded would refuse)
        args = tuple(torch.full((), a, dtype=torch.float64, device=self.device)
                     if isinstance(a, float) else a for a in args)
        from torch._dynamo.exc import FailOnRecompileLimitHit

        with compile_errors():
            try:
                return self._run(*args)
            except FailOnRecompileLimitHit:
                # fullgraph=True makes dynamo raise here instead of running uncompiled;
                # the shapes compiled so far keep their graphs
                self._warn_over_limit()
                return self._kernel(*args)

    def _warn_over_limit(self) -> None:
        if self._over_limit_warned:
            return
        self._over_limit_warned = True
        warnings.warn(
            f"compile=True: {self._kernel.__name__} has reached "
            f"torch._dynamo.config.recompile_limit "
            f"({torch._dynamo.config.recompile_limit}) graphs for this operator, one per "
            "batch shape and block width; products of new shapes run uncompiled (the "
            "same numbers, at eager speed). Give the data fewer batch shapes, use one "
            "block width, or raise the limit",
            RuntimeWarning, stacklevel=2,
        )


def strategy_registries() -> dict[str, dict[str, type[Strategy]]]:
    """The strategies by keyword (``"method"``, ``"jvp"``) and name."""
    from torchcurv.derivatives.hessian import HESSIAN_STRATEGIES
    from torchcurv.derivatives.jvp import JVP_STRATEGIES

    return {"method": dict(HESSIAN_STRATEGIES), "jvp": dict(JVP_STRATEGIES)}


@overload
def strategy_for(argument: Literal["method"], name: str, *, compile: bool = False
                 ) -> HessianStrategy: ...
@overload
def strategy_for(argument: Literal["jvp"], name: str, *, compile: bool = False
                 ) -> JvpStrategy: ...
def strategy_for(argument: str, name: str, *, compile: bool = False) -> Strategy:
    """The strategy that ``method=name`` (the Hessian's) or ``jvp=name`` (the ``Jᵀ C J``
    operators') selects, compiled with ``compile=True``; a ``ValueError`` listing the
    choices for any other name, and naming those with a compiled path where ``name`` has
    none."""
    registries = strategy_registries()
    if argument not in registries:
        raise ValueError(f"argument must be one of {tuple(registries)}, got {argument!r}")
    choices = registries[argument]
    if not isinstance(name, str) or name not in choices:
        raise ValueError(f"{argument} must be one of {tuple(choices)}, got {name!r}")
    if not isinstance(compile, bool):
        raise TypeError(f"compile must be True or False, got {compile!r}")
    if compile and not choices[name].can_compile:
        compilable = tuple(k for k, c in choices.items() if c.can_compile)
        raise ValueError(
            f"compile=True: {argument}={name!r} has no compiled path (the compiled paths are "
            f"torch.func transforms; torch.compile does not trace double backward); "
            f"{argument} in {compilable} have one"
        )
    return choices[name](compile=compile)
