"""HuggingFace and TransformerLens objectives: the operator on them is the Hessian of the
model's own loss over all the data as one batch (tiny config-built models, float64)."""

import pytest
import torch

pytest.importorskip("transformers")

from hf_zoo import (
    DT,
    bart,
    classification_batches,
    concatenated,
    gpt2,
    hessian_by_rows,
    hessian_of,
    lm_batches,
    rel,
    seq2seq_batches,
    transformer_lens_model,
)

import torchcurv
from torchcurv.models.hf import PROBLEM_TYPES

ATTN = "transformer.h.0.attn.c_attn.bias"  # 48 entries through attention's softmax
LN = "transformer.h.1.ln_2.*"


def model_loss(batch):
    return lambda call: call(**batch).loss


def reference_causal_lm_loss(batch):
    """HuggingFace's shifted CE written out in float64 (``model(**batch).loss`` itself
    upcasts logits to float32 -- *also* float64 ones -- so it is only float32-exact)."""
    def loss(call):
        logits = call(**{k: v for k, v in batch.items() if k != "labels"}).logits
        return torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1))
    return loss


def test_causal_lm_loss_equals_model_loss_on_a_padded_batch():
    model, batch = gpt2(), lm_batches(sizes=(4,))[0]
    assert (batch["attention_mask"] == 0).any()
    loss = torchcurv.causal_lm_objective()(model, batch)
    assert loss.dtype == DT
    torch.testing.assert_close(loss, reference_causal_lm_loss(batch)(model), rtol=1e-13, atol=0)
    hf_loss = float(model(**batch).loss.detach())  # HF's float32 upcast: 1e-6 close
    assert abs(float(loss.detach()) - hf_loss) < 1e-6 * float(loss.detach())


def test_causal_lm_weight_counts_predicted_tokens():
    batch = lm_batches(sizes=(3,))[0]
    shifted = batch["labels"][:, 1:]
    objective = torchcurv.causal_lm_objective()
    assert int(objective.weight(batch)) == int((shifted != -100).sum())


def test_causal_lm_forward_rows_are_a_view_of_the_model_logits():
    model, batch = gpt2(), lm_batches(sizes=(2,))[0]
    rows = torchcurv.causal_lm_objective().forward(model, batch)
    assert rows.shape == (2 * 6, 50)
    assert rows._base is not None or rows.is_contiguous()


def test_causal_lm_ignores_targets_under_attention_mask_even_with_labels():
    model, batch = gpt2(), lm_batches(sizes=(3,))[0]
    unmasked_labels = dict(batch, labels=batch["input_ids"])
    objective = torchcurv.causal_lm_objective()
    torch.testing.assert_close(objective(model, unmasked_labels),
                               reference_causal_lm_loss(batch)(model), rtol=1e-13, atol=0)


def test_causal_lm_without_labels_predicts_input_ids():
    model, batch = gpt2(), lm_batches(sizes=(2,), pad=False)[0]
    no_labels = {k: v for k, v in batch.items() if k != "labels"}
    objective = torchcurv.causal_lm_objective()
    torch.testing.assert_close(objective(model, no_labels),
                               reference_causal_lm_loss(batch)(model), rtol=1e-13, atol=0)


def test_causal_lm_hessian_equals_hessian_of_model_loss_over_unequal_batches():
    model, data = gpt2(), lm_batches()
    H = torchcurv.HessianOperator(model, torchcurv.causal_lm_objective(), data,
                                  param_filter=[ATTN, LN])
    expected = hessian_of(model, H.param_names, reference_causal_lm_loss(concatenated(data)))
    assert H.param_names == [ATTN, "transformer.h.1.ln_2.weight", "transformer.h.1.ln_2.bias"]
    assert rel(H.to_dense(), expected) < 1e-10


def reference_seq2seq_loss(batch):
    """The model's decoder (fed from its own ``labels`` shift) and CE written out in
    float64; ``model(**batch).loss`` is computed in float32."""
    def loss(call):
        logits = call(**batch).logits
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 batch["labels"].reshape(-1))
    return loss


def test_seq2seq_hessian_equals_hessian_of_model_loss():
    model, data = bart(), seq2seq_batches()
    assert (data[0]["labels"] == -100).any()
    objective = torchcurv.seq2seq_lm_objective()
    loss = objective(model, data[0])
    torch.testing.assert_close(loss, reference_seq2seq_loss(data[0])(model), rtol=1e-13, atol=0)
    assert abs(float(loss.detach()) - float(model(**data[0]).loss.detach())) < 1e-6 * float(
        loss.detach())
    H = torchcurv.HessianOperator(model, objective, data, param_filter=[
        "model.decoder.layers.0.self_attn.q_proj.bias", "model.decoder.layers.0.self_attn_*"])
    expected = hessian_of(model, H.param_names, reference_seq2seq_loss(concatenated(data)))
    assert rel(H.to_dense(), expected) < 1e-10


@pytest.mark.parametrize("problem_type", PROBLEM_TYPES)
def test_sequence_classification_hessian_equals_hessian_of_model_loss(problem_type):
    model = gpt2(head="classifier", num_labels=3, problem_type=problem_type)
    data = classification_batches(problem_type)
    objective = torchcurv.sequence_classification_objective(problem_type)
    torch.testing.assert_close(objective(model, data[0]), model(**data[0]).loss,
                               rtol=1e-13, atol=0)
    H = torchcurv.HessianOperator(model, objective, data,
                                  param_filter=["score.weight", "transformer.ln_f.bias"])
    expected = hessian_of(model, H.param_names, model_loss(concatenated(data)))
    assert rel(H.to_dense(), expected) < 1e-10


def test_transformer_lens_hessian_equals_hessian_of_its_own_loss():
    pytest.importorskip("transformer_lens")
    model = transformer_lens_model()
    g = torch.Generator().manual_seed(4)
    data = [torch.randint(0, 50, (b, 6), generator=g) for b in (3, 2, 1)]
    objective = torchcurv.transformer_lens_objective()
    torch.testing.assert_close(objective(model, data[0]),
                               model(data[0], return_type="loss"), rtol=1e-13, atol=0)
    # the query bias: through attention's softmax, and only 16 rows for the slow oracle
    H = torchcurv.HessianOperator(model, objective, data, param_filter="*layers.0*attn*q*bias")
    assert H.n == 16
    expected = hessian_by_rows(model(concatenated(data), return_type="loss"), H.params)
    assert rel(H.to_dense(), expected) < 1e-10


def test_transformer_lens_dict_batch_masks_padded_targets():
    pytest.importorskip("transformer_lens")
    model = transformer_lens_model()
    tokens = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(5))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    objective = torchcurv.transformer_lens_objective()
    logits = model(tokens, return_type="logits", attention_mask=mask)
    logp = logits[:, :-1].log_softmax(-1).gather(-1, tokens[:, 1:, None])[..., 0]
    keep = mask[:, 1:].bool()
    expected = -logp[keep].mean()
    batch = {"tokens": tokens, "attention_mask": mask}
    torch.testing.assert_close(objective(model, batch), expected, rtol=1e-13, atol=0)
    assert int(objective.weight(batch)) == int(keep.sum()) == 5 + 3


def test_bad_batches_and_options_are_refused_by_name():
    model = gpt2()
    batch = lm_batches(sizes=(1,))[0]
    with pytest.raises(TypeError, match="dict batches"):
        torchcurv.causal_lm_objective()(model, (batch["input_ids"], batch["labels"]))
    with pytest.raises(ValueError, match=r"\(B, T\) tensor of token ids"):
        torchcurv.causal_lm_objective()(model, dict(batch, labels=batch["labels"][0]))
    with pytest.raises(KeyError, match="no 'labels'"):
        torchcurv.seq2seq_lm_objective().weight({"input_ids": batch["input_ids"]})
    with pytest.raises(ValueError, match="problem_type must be one of"):
        torchcurv.sequence_classification_objective("ranking")
    with pytest.raises(TypeError, match="token tensors"):
        torchcurv.transformer_lens_objective().weight([batch["input_ids"]])


def test_bf16_products_are_float32_accumulated_and_match_float64_to_measured_tolerance():
    """Accuracy of a bf16 model's Hessian products against the same weights in float64.

    Measured on this tiny GPT-2 (CPU, torch 2.13): relative error 1e-2 to 3e-2 for the
    batched products -- bf16 keeps 8 mantissa bits, so each forward/backward rounds at
    ~4e-3 and the error is that of the model's arithmetic, not of the summation.
    """
    model64, data = gpt2(), lm_batches(sizes=(2, 2, 2, 2))
    model16 = gpt2(dtype=torch.bfloat16)
    model16.load_state_dict({k: v.to(torch.bfloat16) for k, v in model64.state_dict().items()})
    objective = torchcurv.causal_lm_objective()
    kw = {"param_filter": [ATTN, LN], "microbatch_size": 1}
    H16 = torchcurv.HessianOperator(model16, objective, data, **kw)
    H64 = torchcurv.HessianOperator(model64, objective, data, **kw)
    V = torch.randn(H64.n, 4, dtype=DT, generator=torch.Generator().manual_seed(6))
    V16 = V.to(torch.bfloat16)
    out16 = H16.matmat(V16)
    assert out16.dtype == torch.bfloat16
    assert rel(out16.double(), H64.matmat(V16.double())) < 0.06
