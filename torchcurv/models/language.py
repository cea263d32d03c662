"""Token-level cross-entropy shared by the language-model objectives.

Every language-model objective here returns logits as rows ``(N, V)`` -- one row per
token position -- and targets ``(N,)`` with ``-100`` where a position predicts nothing.
The loss is then plain ``CrossEntropyLoss(ignore_index=-100)`` over the rows, the form
whose loss Hessian a GGN applies directly, and a batch's weight is its number of
predicted tokens, so the data set's loss is the mean over all its predicted tokens
whatever the batch sizes and padding.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from torchcurv.objectives import Objective

IGNORE_INDEX = -100


def next_token_targets(
    labels: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Targets ``(B*T,)`` for the logits rows of positions ``(b, t)`` flattened row-major.

    Row ``(b, t)`` predicts ``labels[b, t+1]``. The last position of every sequence
    predicts nothing, nor does a position whose target is padding
    (``attention_mask[b, t+1] == 0``) or ``-100``.

    Padding the targets instead of slicing the logits to ``(B*(T-1), V)`` keeps the
    logits a view: no copy of the largest tensor of the model.

    Args:
        labels: ``(B, T)`` integer token ids (usually ``input_ids``; ``-100`` ignored).
        attention_mask: ``(B, T)``, 0 at padding, or ``None``.
    """
    _check_tokens("labels", labels)
    targets = labels.new_full(labels.shape, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    if attention_mask is not None:
        _check_mask(attention_mask, labels)
        targets[:, :-1].masked_fill_(attention_mask[:, 1:] == 0, IGNORE_INDEX)
    return targets.reshape(-1)


def aligned_targets(
    labels: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Targets ``(B*T,)`` for logits already aligned with ``labels`` (seq2seq decoders)."""
    _check_tokens("labels", labels)
    if attention_mask is not None:
        _check_mask(attention_mask, labels)
        labels = labels.masked_fill(attention_mask == 0, IGNORE_INDEX)
    return labels.reshape(-1)


def token_rows(logits: torch.Tensor) -> torch.Tensor:
    """``(B, T, V)`` logits as ``(B*T, V)`` rows (a view for contiguous logits)."""
    if logits.ndim != 3:
        raise ValueError(f"expected logits of shape (B, T, V), got {tuple(logits.shape)}")
    return logits.reshape(-1, logits.shape[-1])


def token_cross_entropy() -> nn.CrossEntropyLoss:
    """The criterion of every token-level objective: mean over non-ignored rows."""
    return nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)


def at_least_float32(logits: torch.Tensor) -> torch.Tensor:
    """Upcast 16-bit logits for the softmax, as HuggingFace's own losses do."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        return logits.float()
    return logits


def count_targets(targets: torch.Tensor) -> torch.Tensor:
    """Number of rows that predict a token (a 0-dim tensor, no host sync)."""
    return (targets != IGNORE_INDEX).sum()


def token_objective(
    forward: Callable[[nn.Module, Any], torch.Tensor],
    targets: Callable[[Any], torch.Tensor],
) -> Objective:
    """The objective of a language model whose ``forward(model, batch)`` gives logits rows
    ``(N, V)`` and ``targets(batch)`` their targets ``(N,)`` (``-100``: no prediction):
    :func:`token_cross_entropy` over the rows (16-bit logits upcast first), each batch
    weighed by :func:`count_targets`."""
    criterion = token_cross_entropy()
    return Objective(
        forward=forward,
        loss=lambda rows, batch: criterion(at_least_float32(rows), targets(batch)),
        weight=lambda batch: count_targets(targets(batch)),
        criterion=criterion,
        targets=targets,
    )


def _check_tokens(name: str, tokens: torch.Tensor) -> None:
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2:
        shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens)
        raise ValueError(f"{name} must be a (B, T) tensor of token ids, got {shape}")
    if tokens.is_floating_point() or tokens.is_complex():
        raise ValueError(f"{name} must hold integer token ids, got dtype {tokens.dtype}")


def _check_mask(mask: torch.Tensor, tokens: torch.Tensor) -> None:
    if mask.shape != tokens.shape:
        raise ValueError(
            f"attention_mask has shape {tuple(mask.shape)}, the tokens {tuple(tokens.shape)}"
        )
