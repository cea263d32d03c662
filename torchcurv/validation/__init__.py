"""Validating an operator against external oracles: :func:`validate`."""

from __future__ import annotations

from typing import Any

import torch

from torchcurv.operators.base import LinearOperator
from torchcurv.validation.dense import dense_matrix
from torchcurv.validation.references import (
    curvlinops_reference,
    dense_reference,
    finite_difference_reference,
    matrix_reference,
)
from torchcurv.validation.report import ValidationReport, default_rtol

_NAMED = {
    "dense": dense_reference,
    "curvlinops": curvlinops_reference,
    "finite_difference": finite_difference_reference,
}


def validate(
    op: LinearOperator, against: str | Any = "dense", probes: int = 8, seed: int = 0,
    rtol: float | None = None,
) -> ValidationReport:
    """Compare ``op``'s products with a reference on random probe vectors.

    Args:
        op: the operator to check.
        against: the reference:

            - ``"dense"``: the explicit matrix built by plain autograd
              (:func:`~torchcurv.validation.dense_matrix`; small models only);
            - ``"finite_difference"``: the operator rebuilt with central differences
              (``method=`` / ``jvp="finite_difference"``): expect ~1e-7 in float64;
            - ``"curvlinops"``: the matching curvlinops operator (optional dependency);
            - any operator or matrix of shape ``(n, n)``: a torchcurv operator, a torch
              tensor, a NumPy array, a SciPy ``LinearOperator``.
        probes: number of standard-normal probe vectors (one block product each side).
        seed: seed of the probes (drawn on the CPU in float64, then cast to ``op``'s
            dtype and device).
        rtol: the tolerance of the report's pass/fail verdict; default
            :func:`~torchcurv.validation.report.default_rtol` of ``against`` and
            ``op.dtype`` (1000 eps for exact references, ``10 eps^(1/3)`` for finite
            differences), so a float32 operator is not failed for float32 rounding.

    Returns:
        A :class:`ValidationReport` with one relative error per probe; ``print`` shows
        PASS or FAIL against its ``rtol``.
    """
    if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
        raise ValueError(f"probes must be a positive int, got {probes!r}")
    if isinstance(against, str):
        if against not in _NAMED:
            raise ValueError(
                f"against must be one of {sorted(_NAMED)} or an operator / matrix, "
                f"got {against!r}"
            )
        reference, name = _NAMED[against](op), against
    else:
        shape = tuple(getattr(against, "shape", ()))
        if shape and shape != op.shape:
            raise ValueError(f"reference has shape {shape}, the operator {op.shape}")
        reference, name = matrix_reference(against), type(against).__name__
    g = torch.Generator().manual_seed(seed)
    V = torch.randn(op.n, probes, generator=g, dtype=torch.float64)
    V = V.to(dtype=op.dtype, device=op.device)
    ours = op.matmat(V).double()
    theirs = reference(V).double()
    diff = (ours - theirs).norm(dim=0)
    norm = theirs.norm(dim=0)
    errors = torch.where(norm > 0, diff / norm.clamp_min(torch.finfo(torch.float64).tiny), diff)
    if rtol is None:
        rtol = default_rtol(name, op.dtype)
    return ValidationReport(name, errors.cpu(), probes, seed, repr(op), float(rtol))


__all__ = ["ValidationReport", "dense_matrix", "validate"]
