"""torchcurv: curvature matrices of PyTorch models as first-class linear operators."""

from torchcurv.algorithms.diagonal import DiagonalEstimate, diagonal
from torchcurv.algorithms.spectral import SpectralDensity, spectral_density
from torchcurv.algorithms.trace import TraceEstimate, trace
from torchcurv.errors import (
    MissingExtraError,
    NondeterminismError,
    NonFiniteLossError,
    OperatorInputError,
)
from torchcurv.objectives import Objective, supervised
from torchcurv.operators.base import LinearOperator, ParameterOperator
from torchcurv.operators.curvature import CurvatureOperator
from torchcurv.operators.hessian import HessianOperator
from torchcurv.operators.matrix import MatrixOperator

__version__ = "0.1.0"

__all__ = [
    "CurvatureOperator",
    "DiagonalEstimate",
    "HessianOperator",
    "LinearOperator",
    "MatrixOperator",
    "MissingExtraError",
    "NonFiniteLossError",
    "NondeterminismError",
    "Objective",
    "OperatorInputError",
    "ParameterOperator",
    "SpectralDensity",
    "TraceEstimate",
    "diagonal",
    "spectral_density",
    "supervised",
    "trace",
]
