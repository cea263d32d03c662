"""torchcurv: curvature matrices of PyTorch models as first-class linear operators."""

from torchcurv.errors import (
    MissingExtraError,
    NondeterminismError,
    NonFiniteLossError,
    OperatorInputError,
)
from torchcurv.kernels import ce_hessian_matmat, cross_entropy_row_weights
from torchcurv.objectives import Objective, supervised
from torchcurv.operators.base import LinearOperator, ParameterOperator
from torchcurv.operators.curvature import CurvatureOperator
from torchcurv.operators.hessian import HessianOperator
from torchcurv.operators.matrix import MatrixOperator

__version__ = "0.1.0"

__all__ = [
    "CurvatureOperator",
    "HessianOperator",
    "LinearOperator",
    "MatrixOperator",
    "MissingExtraError",
    "NonFiniteLossError",
    "NondeterminismError",
    "Objective",
    "OperatorInputError",
    "ParameterOperator",
    "ce_hessian_matmat",
    "cross_entropy_row_weights",
    "supervised",
]
