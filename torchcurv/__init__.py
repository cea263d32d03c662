"""torchcurv: curvature matrices of PyTorch models as first-class linear operators."""

from torchcurv.algorithms.compare import compare_backends, plot_convergence, runnable_backends
from torchcurv.algorithms.diagonal import DiagonalEstimate, diagonal
from torchcurv.algorithms.eigsh import eigsh
from torchcurv.algorithms.landscape import LossLandscape, loss_landscape
from torchcurv.algorithms.result import ConvergenceHistory, EigshInfo, EigshResult
from torchcurv.algorithms.solve import SolveResult, solve
from torchcurv.algorithms.spectral import SpectralDensity, spectral_density
from torchcurv.algorithms.trace import TraceEstimate, trace
from torchcurv.errors import (
    DataChangedError,
    MissingExtraError,
    NondeterminismError,
    NonFiniteLossError,
    NotConvergedError,
    OperatorInputError,
    RankFailedError,
)
from torchcurv.interop import as_cupy_linear_operator, as_linear_operator, from_linear_operator
from torchcurv.models import (
    causal_lm_objective,
    seq2seq_lm_objective,
    sequence_classification_objective,
    transformer_lens_objective,
)
from torchcurv.objectives import Objective, supervised
from torchcurv.operators.base import LinearOperator, ParameterOperator
from torchcurv.operators.config import CurvatureConfig
from torchcurv.operators.curvature import CurvatureOperator
from torchcurv.operators.fisher import EmpiricalFisherOperator, MCFisherOperator
from torchcurv.operators.ggn import GGNOperator
from torchcurv.operators.hessian import HessianOperator
from torchcurv.operators.inverse import InverseOperator
from torchcurv.operators.jacobian_operator import JacobianOperator
from torchcurv.operators.kfac import EKFACOperator, KFACInverseOperator, KFACOperator
from torchcurv.operators.matrix import MatrixOperator
from torchcurv.validation import ValidationReport, validate

__version__ = "0.1.0"

__all__ = [
    "ConvergenceHistory",
    "CurvatureConfig",
    "CurvatureOperator",
    "DataChangedError",
    "DiagonalEstimate",
    "EKFACOperator",
    "EigshInfo",
    "EigshResult",
    "EmpiricalFisherOperator",
    "GGNOperator",
    "HessianOperator",
    "InverseOperator",
    "JacobianOperator",
    "KFACInverseOperator",
    "KFACOperator",
    "LinearOperator",
    "LossLandscape",
    "MCFisherOperator",
    "MatrixOperator",
    "MissingExtraError",
    "NonFiniteLossError",
    "NondeterminismError",
    "NotConvergedError",
    "Objective",
    "OperatorInputError",
    "ParameterOperator",
    "RankFailedError",
    "SolveResult",
    "SpectralDensity",
    "TraceEstimate",
    "ValidationReport",
    "as_cupy_linear_operator",
    "as_linear_operator",
    "causal_lm_objective",
    "compare_backends",
    "diagonal",
    "eigsh",
    "from_linear_operator",
    "loss_landscape",
    "plot_convergence",
    "runnable_backends",
    "seq2seq_lm_objective",
    "sequence_classification_objective",
    "solve",
    "spectral_density",
    "supervised",
    "trace",
    "transformer_lens_objective",
    "validate",
]
