"""Objectives for HuggingFace ``transformers`` models, on their usual dict batches.

Batches are mappings (``dict`` or ``BatchEncoding``) such as a tokenizer or data collator
gives: model inputs (``input_ids``, ``attention_mask``, ...) plus ``labels``. Everything
but ``labels`` is passed to the model; the loss is computed here from the logits, not by
the model, so that the objective has the separate ``forward -> logits`` and
``loss(logits, batch)`` a GGN needs. Nothing here imports ``transformers``.

For ``reduction="mean"`` every objective weighs a batch by its number of loss terms, so
a curvature operator over many batches is that of the mean over the whole data set, as
if it were one batch passed to ``model(**batch).loss``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from torchcurv.models.language import (
    aligned_targets,
    at_least_float32,
    count_targets,
    next_token_targets,
    token_objective,
    token_rows,
)
from torchcurv.objectives import Objective

Batch = Mapping[str, Any]

PROBLEM_TYPES = ("single_label_classification", "multi_label_classification", "regression")


def causal_lm_objective() -> Objective:
    """Next-token cross-entropy of a causal LM (``GPT2LMHeadModel``, ``LlamaForCausalLM``, ...).

    Equals ``model(**batch).loss`` for batches whose padded targets are ``-100`` (as
    HuggingFace's language-modelling collators make them).

    - ``forward(model, batch)``: logits rows ``(B*T, V)``, a view of the model's
      ``(B, T, V)`` logits (``use_cache=False``).
    - ``loss(rows, batch)``: ``CrossEntropyLoss(ignore_index=-100)`` against targets
      ``(B*T,)``: ``labels`` (default ``input_ids``) shifted left by one, ``-100`` at each
      sequence's last position and wherever the target position has
      ``attention_mask == 0``; 16-bit logits are upcast to float32 first.
    - ``weight(batch)``: the number of predicted tokens.
    """

    def forward(model: nn.Module, batch: Batch) -> torch.Tensor:
        return token_rows(model(**_model_inputs(batch), use_cache=False).logits)

    def targets(batch: Batch) -> torch.Tensor:
        labels = batch["labels"] if "labels" in batch else _require(batch, "input_ids")
        return next_token_targets(labels, batch.get("attention_mask"))

    return token_objective(forward, targets)


def seq2seq_lm_objective() -> Objective:
    """Decoder cross-entropy of an encoder-decoder LM (``T5ForConditionalGeneration``, BART).

    Equals ``model(**batch).loss``. The decoder's inputs are ``decoder_input_ids`` when
    the batch has them, else ``model.prepare_decoder_input_ids_from_labels(labels)`` (the
    labels shifted right, as the model does internally).

    - ``forward``: decoder logits rows ``(B*T_dec, V)``.
    - ``loss``: ``CrossEntropyLoss(ignore_index=-100)`` against ``labels`` ``(B*T_dec,)``
      (also ignored where ``decoder_attention_mask == 0``).
    - ``weight``: the number of labels other than ``-100``.
    """

    def forward(model: nn.Module, batch: Batch) -> torch.Tensor:
        inputs = _model_inputs(batch)
        if "decoder_input_ids" not in inputs and "decoder_inputs_embeds" not in inputs:
            prepare = getattr(model, "prepare_decoder_input_ids_from_labels", None)
            if prepare is None:
                raise ValueError(
                    f"{type(model).__name__} cannot derive decoder inputs from labels; put "
                    "'decoder_input_ids' in the batch"
                )
            inputs["decoder_input_ids"] = prepare(labels=_require(batch, "labels"))
        return token_rows(model(**inputs, use_cache=False).logits)

    def targets(batch: Batch) -> torch.Tensor:
        return aligned_targets(_require(batch, "labels"), batch.get("decoder_attention_mask"))

    return token_objective(forward, targets)


def sequence_classification_objective(
    problem_type: str = "single_label_classification",
) -> Objective:
    """The loss of ``*ForSequenceClassification`` models, as ``config.problem_type`` says.

    Args:
        problem_type: HuggingFace's names, with its losses, means and weights:

            - ``"single_label_classification"``: ``CrossEntropyLoss`` of logits ``(B, C)``
              against integer ``labels`` ``(B,)``; weight: labels other than ``-100``.
            - ``"multi_label_classification"``: ``BCEWithLogitsLoss`` against float
              ``labels`` ``(B, C)``; weight: ``B*C``.
            - ``"regression"``: ``MSELoss`` against ``labels`` of ``B*C`` values;
              weight: ``B*C``.

    ``forward`` returns the logits ``(B, C)``.
    """
    if problem_type not in PROBLEM_TYPES:
        raise ValueError(f"problem_type must be one of {PROBLEM_TYPES}, got {problem_type!r}")

    def forward(model: nn.Module, batch: Batch) -> torch.Tensor:
        return model(**_model_inputs(batch)).logits

    if problem_type == "single_label_classification":
        criterion: nn.Module = nn.CrossEntropyLoss()

        def loss(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
            return criterion(at_least_float32(logits), targets(batch))

        def weight(batch: Batch) -> torch.Tensor | float:
            return count_targets(_require(batch, "labels"))

        def targets(batch: Batch) -> torch.Tensor:
            return _require(batch, "labels").reshape(-1)
    else:
        criterion = nn.BCEWithLogitsLoss() if problem_type.startswith("multi") else nn.MSELoss()

        def loss(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
            logits = at_least_float32(logits)
            labels = _require(batch, "labels")
            if labels.numel() != logits.numel():
                raise ValueError(
                    f"{problem_type} needs one label per logit: labels "
                    f"{tuple(labels.shape)}, logits {tuple(logits.shape)}"
                )
            return criterion(logits, labels.reshape(logits.shape).to(logits.dtype))

        def weight(batch: Batch) -> torch.Tensor | float:
            return float(_require(batch, "labels").numel())

        # labels are reshaped to the logits inside the loss: no closed form, autograd's
        # loss Hessian (cheap: (B, C) outputs)
        return Objective(forward=forward, loss=loss, weight=weight)

    return Objective(forward=forward, loss=loss, weight=weight, criterion=criterion,
                     targets=targets)


def _model_inputs(batch: Batch) -> dict[str, Any]:
    if not isinstance(batch, Mapping):
        raise TypeError(
            "HuggingFace objectives take dict batches like {'input_ids': ..., "
            f"'attention_mask': ..., 'labels': ...}}, got {type(batch).__name__}"
        )
    return {k: v for k, v in batch.items() if k != "labels"}


def _require(batch: Batch, key: str) -> Any:
    if key not in batch:
        raise KeyError(f"the batch has no '{key}' (keys: {sorted(batch)})")
    return batch[key]
