"""Square roots of closed-form loss Hessians, one column at a time (the type-2 Fisher).

KFAC's ``fisher_type="type-2"`` backpropagates the columns of a square root ``S_r`` of
each sample's loss Hessian, ``S_r S_rᵀ = ∇²_f criterion`` restricted to sample ``r``;
column ``c`` of every sample goes through the network in one backward pass, so a
``K``-entry sample costs ``K`` backward passes (curvlinops' ``KFACLinearOperator`` does
the same). The square roots are curvlinops' (``loss_hessian_matrix_sqrt``):

- ``CrossEntropyLoss``: ``S = sqrt(w) (diag(sqrt p) - p sqrt(p)ᵀ)`` with ``p`` the
  softmax and ``w`` the sample's factor (class weight, ``ignore_index``, reduction);
- ``MSELoss``, ``BCEWithLogitsLoss``: the Hessian is diagonal, ``S = diag(sqrt h)``.
"""

from __future__ import annotations

import torch
from torch import nn

from torchcurv.dtypes import device_scalar
from torchcurv.losses.cross_entropy import criterion_row_weights
from torchcurv.losses.elementwise import bce_with_logits_hessian_diagonal, mse_hessian_diagonal
from torchcurv.losses.layout import SampleLayout, sample_layout

SQRT_KNOWN = (nn.CrossEntropyLoss, nn.MSELoss, nn.BCEWithLogitsLoss)


class LossHessianSqrt:
    """The columns of ``sqrt(scale) S_r`` for every sample ``r`` of one batch output.

    Args:
        criterion: ``CrossEntropyLoss``, ``MSELoss`` or ``BCEWithLogitsLoss``.
        output: the batch's model output (detached here).
        target: the criterion's targets.
        scale: the batch's share of the data set's loss (``w_b / W``, or 1 for "sum").

    Attributes:
        layout: the samples' layout in ``output`` (:func:`sample_layout`).
        width: ``K``, the number of columns (entries per sample).
    """

    def __init__(self, criterion: nn.Module, output: torch.Tensor, target: torch.Tensor,
                 scale: torch.Tensor | float) -> None:
        if not isinstance(criterion, SQRT_KNOWN):
            raise TypeError(
                f"the type-2 Fisher needs the loss Hessian's square root, known for "
                f"{[c.__name__ for c in SQRT_KNOWN]}, not {type(criterion).__name__}"
            )
        output = output.detach()
        self.layout: SampleLayout = sample_layout(criterion, output)
        self.width = self.layout.width
        scale_t = device_scalar(scale, output.dtype, output.device)
        if isinstance(criterion, nn.CrossEntropyLoss):
            rows = self.layout.to_rows(output[None])[0]  # (R, K)
            self._prob = torch.softmax(rows, dim=1)
            weight = criterion_row_weights(criterion, output, target).to(output.dtype)
            self._root = (weight * scale_t).clamp_min(0).sqrt()  # (R,)
            self._diagonal = None
        else:
            if isinstance(criterion, nn.MSELoss):
                h = mse_hessian_diagonal(criterion, output).expand(output.shape)
            else:
                h = bce_with_logits_hessian_diagonal(criterion, output, target)
            self._diagonal = self.layout.to_rows((h * scale_t).clamp_min(0).sqrt()[None])[0]

    def column(self, c: int) -> torch.Tensor:
        """Column ``c`` of every sample's square root, as an output-shaped tensor."""
        if self._diagonal is not None:
            rows = torch.zeros_like(self._diagonal)
            rows[:, c] = self._diagonal[:, c]
        else:
            p = self._prob
            rows = -p * p[:, c:c + 1].sqrt()
            rows[:, c] += p[:, c].sqrt()
            rows = rows * self._root[:, None]
        return self.layout.from_rows(rows[None])[0]
