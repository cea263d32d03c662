"""The loss Hessian in output space by double backward, for any twice-differentiable loss."""

from __future__ import annotations

from collections.abc import Callable

import torch

from torchcurv.losses.base import OutputCurvature


class AutogradHessian(OutputCurvature):
    """``scale * ∇²_f loss_fn(f)`` at ``f = output`` via autograd (no closed form needed).

    One first backward with ``create_graph`` at construction; each block costs one
    batched second backward through the loss only (not the model).
    """

    def __init__(
        self,
        loss_fn: Callable[[torch.Tensor], torch.Tensor],
        output: torch.Tensor,
        scale: torch.Tensor | float = 1.0,
    ) -> None:
        super().__init__(output.shape)
        self._point = output.detach().requires_grad_(True)
        self.scale = scale
        with torch.enable_grad():
            self.loss = loss_fn(self._point)
            if self.loss.ndim != 0:
                raise ValueError(f"the loss must be a scalar, got shape {tuple(self.loss.shape)}")
            (self._grad,) = torch.autograd.grad(self.loss, self._point, create_graph=True)

    def _matmat(self, U: torch.Tensor) -> torch.Tensor:
        if not self._grad.requires_grad:  # the loss is linear in the output
            return torch.zeros_like(U)
        (out,) = torch.autograd.grad(
            self._grad, self._point, grad_outputs=U, retain_graph=True,
            is_grads_batched=True, allow_unused=True,
        )
        if out is None:
            return torch.zeros_like(U)
        if isinstance(self.scale, torch.Tensor):
            return out * self.scale.to(out.dtype)
        return out * self.scale

    def _dtype(self) -> torch.dtype:
        return self._point.dtype

    def _device(self) -> torch.device:
        return self._point.device
