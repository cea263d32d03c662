"""Curvature in the model's output space: a linear map on output-shaped blocks.

GGN, empirical Fisher and Monte-Carlo Fisher all have the form ``Jᵀ C J`` with ``J`` the
Jacobian of the model output and ``C`` a symmetric matrix on the output space: the loss
Hessian, or a sum of gradient outer products. An :class:`OutputCurvature` is one batch's
``C``, applied to blocks ``U`` of shape ``(m, *output.shape)``.
"""

from __future__ import annotations

import torch

from torchcurv.errors import OperatorInputError
from torchcurv.losses.layout import SampleLayout


class OutputCurvature:
    """A symmetric matrix on the output space of one batch.

    Args:
        output_shape: shape of the model output the matrix acts on.
    """

    def __init__(self, output_shape: torch.Size | tuple[int, ...]) -> None:
        self.output_shape = torch.Size(output_shape)

    def _matmat(self, U: torch.Tensor) -> torch.Tensor:
        """``C @ U`` for a validated block ``U`` of shape ``(m, *output_shape)``."""
        raise NotImplementedError

    def matmat(self, U: torch.Tensor) -> torch.Tensor:
        """``C @ U`` for ``U`` of shape ``(m, *output_shape)`` or ``output_shape`` (same out)."""
        one = U.shape == self.output_shape
        if not one and U.shape[1:] != self.output_shape:
            raise OperatorInputError(
                f"output-space block has shape {tuple(U.shape)}; expected "
                f"{tuple(self.output_shape)} or (m, {', '.join(map(str, self.output_shape))})"
            )
        out = self._matmat(U.unsqueeze(0) if one else U)
        return out.squeeze(0) if one else out

    def to_dense(self) -> torch.Tensor:
        """The ``(d, d)`` matrix, ``d = output.numel()`` (small outputs only)."""
        d = self.output_shape.numel()
        eye = torch.eye(d, dtype=self._dtype(), device=self._device())
        return self.matmat(eye.reshape(d, *self.output_shape)).reshape(d, d)

    def _dtype(self) -> torch.dtype:
        raise NotImplementedError

    def _device(self) -> torch.device:
        raise NotImplementedError


class SampleOuterProducts(OutputCurvature):
    """``C = (1/S) sum_s sum_r g_{s,r} g_{s,r}ᵀ``: block diagonal over samples ``r``.

    The empirical Fisher (``S = 1``, ``g`` the per-sample loss gradient) and the
    Monte-Carlo Fisher (``g`` gradients for labels drawn from the model) in output space.

    Args:
        layout: which output entries form a sample.
        factors: ``(S, R, K)``: ``S`` draws, ``R`` samples, ``K`` entries per sample.
    """

    def __init__(self, layout: SampleLayout, factors: torch.Tensor) -> None:
        super().__init__(layout.shape)
        if factors.ndim != 3 or factors.shape[1:] != (layout.rows, layout.width):
            raise ValueError(
                f"factors must have shape (S, {layout.rows}, {layout.width}), "
                f"got {tuple(factors.shape)}"
            )
        self.layout = layout
        self.factors = factors

    def _matmat(self, U: torch.Tensor) -> torch.Tensor:
        rows = self.layout.to_rows(U)  # (m, R, K)
        coeff = torch.einsum("mrk,srk->msr", rows, self.factors)
        out = torch.einsum("msr,srk->mrk", coeff, self.factors) / self.factors.shape[0]
        return self.layout.from_rows(out)

    def _dtype(self) -> torch.dtype:
        return self.factors.dtype

    def _device(self) -> torch.device:
        return self.factors.device
