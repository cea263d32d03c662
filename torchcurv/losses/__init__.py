"""Loss curvature in the model's output space: closed-form Hessians and Fisher factors."""

from torchcurv.losses.autograd import AutogradHessian
from torchcurv.losses.base import OutputCurvature, SampleOuterProducts
from torchcurv.losses.cross_entropy import CrossEntropyHessian, criterion_row_weights
from torchcurv.losses.elementwise import DiagonalHessian
from torchcurv.losses.fisher import empirical_fisher_factors, monte_carlo_fisher_factors
from torchcurv.losses.hessians import loss_hessian, objective_loss_hessian
from torchcurv.losses.layout import SampleLayout, sample_layout

__all__ = [
    "AutogradHessian",
    "CrossEntropyHessian",
    "DiagonalHessian",
    "OutputCurvature",
    "SampleLayout",
    "SampleOuterProducts",
    "criterion_row_weights",
    "empirical_fisher_factors",
    "loss_hessian",
    "monte_carlo_fisher_factors",
    "objective_loss_hessian",
    "sample_layout",
]
