"""Fused kernels for curvature products (each with its eager specification beside it)."""

from torchcurv.kernels.ce_hvp import ce_hessian_matmat, cross_entropy_row_weights

__all__ = ["ce_hessian_matmat", "cross_entropy_row_weights"]
