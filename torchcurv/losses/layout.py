"""Which entries of a model output belong to one sample.

A *sample* is the prediction one target is compared with: for classification criteria
(``CrossEntropyLoss``, ``NLLLoss``) the ``C`` logits at one position ``(n, d1, ...)`` of
an ``(N, C, d1, ...)`` output (a token of a sequence model); for other criteria the last
axis of an ``(N, ..., K)`` output, every leading axis indexing samples; a 1-D output of a
non-classification criterion has one scalar per sample. This is curvlinops' convention.
The empirical and Monte-Carlo Fisher sum gradient outer products per sample.
"""

from __future__ import annotations

import torch
from torch import nn

_CLASSIFICATION = (nn.CrossEntropyLoss, nn.NLLLoss)


class SampleLayout:
    """View ``(m, *shape)`` blocks as ``(m, rows, width)``: one row per sample.

    Args:
        shape: the output's shape.
        sample_dim: the axis that holds one sample's entries; ``None`` makes every entry
            its own sample (width 1).
    """

    def __init__(self, shape: torch.Size | tuple[int, ...], sample_dim: int | None) -> None:
        self.shape = torch.Size(shape)
        if sample_dim is not None and not 0 <= sample_dim < len(self.shape):
            raise ValueError(f"sample_dim {sample_dim} is not an axis of shape {tuple(shape)}")
        self.sample_dim = sample_dim
        self.width = 1 if sample_dim is None else self.shape[sample_dim]
        self.rows = self.shape.numel() // max(self.width, 1)
        if sample_dim is None:
            self._moved = (*self.shape, 1)
        else:
            rest = [s for i, s in enumerate(self.shape) if i != sample_dim]
            self._moved = (*rest, self.width)

    def to_rows(self, T: torch.Tensor) -> torch.Tensor:
        """``(m, *shape) -> (m, rows, width)``, rows in the row-major order of the other axes.

        Each step (the move of the sample axis, the reshape) is left out where it would
        not change ``T``: a view costs a dispatched operation all the same."""
        m = T.shape[0]
        if self.sample_dim is not None and 1 + self.sample_dim != T.ndim - 1:
            T = T.movedim(1 + self.sample_dim, -1)
        return _reshaped(T, (m, self.rows, self.width))

    def rows_of(self, x: torch.Tensor) -> torch.Tensor:
        """One tensor of ``shape`` as ``(rows, width)``: ``to_rows`` without the block axis
        (``x`` itself for an ``(N, K)`` output with its samples along the last axis)."""
        if self.sample_dim is not None and self.sample_dim != x.ndim - 1:
            x = x.movedim(self.sample_dim, -1)
        return _reshaped(x, (self.rows, self.width))

    def from_rows(self, T: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_rows`: ``(m, rows, width) -> (m, *shape)`` (again without
        the steps that would not change ``T``)."""
        m = T.shape[0]
        T = _reshaped(T, (m, *self._moved))
        if self.sample_dim is None:
            return T.squeeze(-1)
        return T if 1 + self.sample_dim == T.ndim - 1 else T.movedim(-1, 1 + self.sample_dim)


def _reshaped(T: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    return T if T.shape == shape else T.reshape(shape)


def sample_layout(criterion: nn.Module | None, output: torch.Tensor) -> SampleLayout:
    """The sample layout of ``output`` under ``criterion`` (see the module docstring)."""
    if isinstance(criterion, _CLASSIFICATION):
        return SampleLayout(output.shape, 1 if output.ndim >= 2 else 0)
    if output.ndim == 0:
        return SampleLayout(output.shape, None)
    return SampleLayout(output.shape, output.ndim - 1 if output.ndim >= 2 else None)
