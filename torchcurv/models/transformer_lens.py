"""The next-token objective of TransformerLens models.

Works with any module called as ``model(tokens, return_type="logits")`` returning
``(B, T, V)`` logits: ``HookedTransformer`` (TransformerLens < 4) and ``TransformerBridge``
(TransformerLens >= 4, which removed ``HookedTransformer``). Nothing here imports
``transformer_lens``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from torchcurv.models.language import (
    next_token_targets,
    token_objective,
    token_rows,
)
from torchcurv.objectives import Objective

Batch = Any


def transformer_lens_objective() -> Objective:
    """Next-token cross-entropy, the loss of ``model(tokens, return_type="loss")``.

    Batches are token tensors ``(B, T)``, or mappings ``{"tokens": (B, T),
    "attention_mask": (B, T)}`` (the mask is passed to the model and marks padded targets).

    - ``forward``: logits rows ``(B*T, V)``.
    - ``loss``: ``CrossEntropyLoss(ignore_index=-100)`` against the tokens shifted left by
      one, ``-100`` at the last position and at padded targets.
    - ``weight``: the number of predicted tokens, ``B*(T-1)`` without padding.
    """

    def forward(model: nn.Module, batch: Batch) -> torch.Tensor:
        tokens, mask = _tokens_and_mask(batch)
        extra = {} if mask is None else {"attention_mask": mask}
        return token_rows(model(tokens, return_type="logits", **extra))

    def targets(batch: Batch) -> torch.Tensor:
        return next_token_targets(*_tokens_and_mask(batch))

    return token_objective(forward, targets)


def _tokens_and_mask(batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, Mapping) and "tokens" in batch:
        return batch["tokens"], batch.get("attention_mask")
    raise TypeError(
        "TransformerLens batches are token tensors (B, T) or {'tokens': ..., "
        f"'attention_mask': ...}}, got {type(batch).__name__}"
    )
