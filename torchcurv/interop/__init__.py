"""Bridges between torchcurv operators and scipy, CuPy and other operator libraries."""

from torchcurv.interop.cupy import as_cupy_linear_operator
from torchcurv.interop.reverse import from_linear_operator
from torchcurv.interop.scipy import ScipyLinearOperator, as_linear_operator

__all__ = [
    "ScipyLinearOperator",
    "as_cupy_linear_operator",
    "as_linear_operator",
    "from_linear_operator",
]
