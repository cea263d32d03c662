"""torchcurv: curvature matrices of PyTorch models as first-class linear operators."""

from torchcurv.algorithms.compare import compare_backends
from torchcurv.algorithms.diagonal import DiagonalEstimate, diagonal
from torchcurv.algorithms.eigsh import eigsh
from torchcurv.algorithms.result import EigshResult
from torchcurv.algorithms.spectral import SpectralDensity, spectral_density
from torchcurv.algorithms.trace import TraceEstimate, trace
from torchcurv.errors import (
    DataChangedError,
    MissingExtraError,
    NondeterminismError,
    NonFiniteLossError,
    OperatorInputError,
    RankFailedError,
)
from torchcurv.interop import as_cupy_linear_operator, as_linear_operator, from_linear_operator
from torchcurv.kernels import ce_hessian_matmat, cross_entropy_row_weights
from torchcurv.models import (
    causal_lm_objective,
    seq2seq_lm_objective,
    sequence_classification_objective,
    transformer_lens_objective,
)
from torchcurv.objectives import Objective, supervised
from torchcurv.operators.attention import differentiable_attention
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
    "DataChangedError",
    "DiagonalEstimate",
    "EigshResult",
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
    "RankFailedError",
    "SpectralDensity",
    "TraceEstimate",
    "ValidationReport",
    "as_cupy_linear_operator",
    "as_linear_operator",
    "causal_lm_objective",
    "ce_hessian_matmat",
    "compare_backends",
    "cross_entropy_row_weights",
    "diagonal",
    "differentiable_attention",
    "eigsh",
    "from_linear_operator",
    "seq2seq_lm_objective",
    "sequence_classification_objective",
    "spectral_density",
    "supervised",
    "trace",
    "transformer_lens_objective",
    "validate",
]
