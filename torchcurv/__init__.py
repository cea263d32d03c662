"""torchcurv: curvature matrices of PyTorch models as first-class linear operators."""

from torchcurv.errors import (
    MissingExtraError,
    NondeterminismError,
    NonFiniteLossError,
    OperatorInputError,
)
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
    "causal_lm_objective",
    "differentiable_attention",
    "seq2seq_lm_objective",
    "sequence_classification_objective",
    "supervised",
    "transformer_lens_objective",
]
