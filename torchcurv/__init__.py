"""torchcurv: curvature matrices of PyTorch models as first-class linear operators."""

from torchcurv.errors import (
    MissingExtraError,
    NondeterminismError,
    NonFiniteLossError,
    OperatorInputError,
)
from torchcurv.objectives import Objective, supervised
from torchcurv.operators.base import LinearOperator, ParameterOperator
from torchcurv.operators.curvature import CurvatureOperator
from torchcurv.operators.fisher import EmpiricalFisherOperator, MCFisherOperator
from torchcurv.operators.ggn import GGNOperator
from torchcurv.operators.hessian import HessianOperator
from torchcurv.operators.matrix import MatrixOperator
from torchcurv.validation import ValidationReport, validate

__version__ = "0.1.0"

__all__ = [
    "CurvatureOperator",
    "EmpiricalFisherOperator",
    "GGNOperator",
    "HessianOperator",
    "LinearOperator",
    "MCFisherOperator",
    "MatrixOperator",
    "MissingExtraError",
    "NonFiniteLossError",
    "NondeterminismError",
    "Objective",
    "OperatorInputError",
    "ParameterOperator",
    "ValidationReport",
    "supervised",
    "validate",
]
