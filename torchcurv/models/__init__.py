"""Objectives for model families: HuggingFace ``transformers`` and TransformerLens."""

from torchcurv.models.hf import (
    causal_lm_objective,
    seq2seq_lm_objective,
    sequence_classification_objective,
)
from torchcurv.models.transformer_lens import transformer_lens_objective

__all__ = [
    "causal_lm_objective",
    "seq2seq_lm_objective",
    "sequence_classification_objective",
    "transformer_lens_objective",
]
