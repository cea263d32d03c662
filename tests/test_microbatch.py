"""microbatch_size: the same operator, refused where splitting a batch changes the model."""

import pytest
import torch
from torch import nn
from zoo import DT, case, rel

import torchcurv
from torchcurv.operators.microbatch import leading_size, split_batch


@pytest.mark.parametrize("model_name", ["mlp_tanh", "layernorm", "cnn_bn"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("size", [1, 2])
def test_microbatched_products_equal_unsplit_ones(model_name, reduction, size):
    model, criterion, data = case(model_name, "ce", reduction, sizes=(5, 3, 2))
    V = torch.randn(sum(p.numel() for p in model.parameters()), 3, dtype=DT,
                    generator=torch.Generator().manual_seed(0))
    whole = torchcurv.HessianOperator(model, criterion, data).matmat(V)
    split = torchcurv.HessianOperator(model, criterion, data, microbatch_size=size)
    assert rel(split.matmat(V), whole) < 1e-12
    assert split.total_weight == torchcurv.HessianOperator(model, criterion, data).total_weight


OUTPUT_SPACE = ["GGNOperator", "EmpiricalFisherOperator"]


@pytest.mark.parametrize("operator", OUTPUT_SPACE)
@pytest.mark.parametrize("jvp", ["forward", "finite_difference"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_output_space_operators_microbatch_to_the_same_matrix(operator, jvp, reduction):
    model, criterion, data = case("mlp_tanh", "ce", reduction, sizes=(5, 3, 2))
    data[0][1][:2] = -100  # unequal loss-term counts per microbatch
    cls = getattr(torchcurv, operator)
    V = torch.randn(sum(p.numel() for p in model.parameters()), 3, dtype=DT,
                    generator=torch.Generator().manual_seed(0))
    whole = cls(model, criterion, data, jvp=jvp).matmat(V)
    split = cls(model, criterion, data, jvp=jvp, microbatch_size=2).matmat(V)
    assert rel(split, whole) < (1e-8 if jvp == "finite_difference" else 1e-12)


def test_mc_fisher_microbatches_are_the_batches_split_beforehand():
    """Labels are drawn per microbatch in data order, as for data already split."""
    model, criterion, data = case("mlp_tanh", "ce", sizes=(4, 2))
    pre_split = [piece for batch in data for piece in split_batch(batch, 2)]
    kw = {"mc_samples": 3, "seed": 5}
    V = torch.randn(sum(p.numel() for p in model.parameters()), 2, dtype=DT,
                    generator=torch.Generator().manual_seed(1))
    split = torchcurv.MCFisherOperator(model, criterion, data, microbatch_size=2, **kw)
    expected = torchcurv.MCFisherOperator(model, criterion, pre_split, **kw)
    assert rel(split.matmat(V), expected.matmat(V)) < 1e-13


def test_cached_weights_keep_products_free_of_weight_counting():
    """With check_deterministic the microbatch weights are counted once, at construction."""
    model, nn_criterion, data = case("mlp_tanh", "ce")
    counts = {"n": 0}

    def weight(batch):
        counts["n"] += 1
        return batch[1].numel()

    objective = torchcurv.Objective(forward=lambda m, b: m(b[0]),
                                    loss=lambda out, b: nn_criterion(out, b[1]), weight=weight)
    op = torchcurv.GGNOperator(model, objective, data, microbatch_size=2)
    before = counts["n"]
    op @ torch.ones(op.n, dtype=DT)
    assert counts["n"] == before
    unchecked = torchcurv.GGNOperator(model, objective, data, microbatch_size=2,
                                      check_deterministic=False)
    assert rel(unchecked @ torch.ones(op.n, dtype=DT), op @ torch.ones(op.n, dtype=DT)) < 1e-13


def test_microbatches_are_weighted_by_their_own_loss_terms():
    # ignore_index targets make the microbatches' loss-term counts unequal
    model, _, data = case("mlp_tanh", "ce", sizes=(6, 4))
    data[0][1][:3] = -100
    criterion = nn.CrossEntropyLoss()
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=DT)
    whole = torchcurv.HessianOperator(model, criterion, data) @ v
    split = torchcurv.HessianOperator(model, criterion, data, microbatch_size=2) @ v
    assert rel(split, whole) < 1e-12


def test_finite_difference_method_microbatches_too():
    model, criterion, data = case("mlp_tanh", "ce")
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=DT)
    kw = {"method": "finite_difference"}
    whole = torchcurv.HessianOperator(model, criterion, data, **kw) @ v
    split = torchcurv.HessianOperator(model, criterion, data, microbatch_size=2, **kw) @ v
    # gradients summed in another order differ by ~1e-16, and the difference quotient
    # divides them by h ~ 1e-5: 1e-11 is rounding, a wrong weighting would be O(1)
    assert rel(split, whole) < 1e-9


def test_dict_batches_split_every_tensor_and_keep_their_type():
    batch = {"x": torch.arange(10).reshape(5, 2), "y": torch.arange(5), "scale": torch.tensor(2.0),
             "name": "a"}
    pieces = split_batch(batch, 2)
    assert [p["y"].tolist() for p in pieces] == [[0, 1], [2, 3], [4]]
    assert all(p["x"].shape[0] == p["y"].shape[0] and p["name"] == "a" for p in pieces)
    assert all(p["scale"] is batch["scale"] for p in pieces)
    Pair = __import__("collections").namedtuple("Pair", "x y")
    assert isinstance(split_batch(Pair(batch["x"], batch["y"]), 3)[1], Pair)


def test_batch_norm_in_train_mode_is_refused():
    model, criterion, data = case("cnn_bn", "ce")
    model.train()
    with pytest.warns(UserWarning, match="BatchNorm"), \
            pytest.raises(ValueError, match=r"'1' \(BatchNorm2d\) is in train mode.*model.eval"):
        torchcurv.HessianOperator(model, criterion, data, microbatch_size=2)


class InBatchCentering(nn.Module):
    """Couples the examples of a batch without any BatchNorm module."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - x.mean(dim=0, keepdim=True)


def test_batch_coupling_that_no_module_check_sees_is_caught_by_the_loss_check():
    model = nn.Sequential(nn.Linear(4, 5), InBatchCentering(), nn.Tanh(), nn.Linear(5, 3)).double()
    _, criterion, data = case("mlp_tanh", "ce")
    with pytest.raises(ValueError, match="couples the examples of a batch"):
        torchcurv.HessianOperator(model, criterion, data, microbatch_size=2)
    torchcurv.HessianOperator(model, criterion, data, microbatch_size=2,
                              check_deterministic=False)


def test_batches_whose_targets_are_not_split_like_the_inputs_are_refused():
    # SequenceTagger: tokens (B, T) but targets flattened to (B*T,)
    model, criterion, data = case("sequence", "ce")
    with pytest.raises(ValueError, match=r"leading sizes \[5, 10\].*dim 0"):
        torchcurv.HessianOperator(model, criterion, data, microbatch_size=2)


def test_bad_microbatch_sizes_and_batches_are_refused_by_name():
    model, criterion, data = case("mlp_tanh", "ce")
    for bad, error in ((0, ValueError), (-1, ValueError), (2.0, TypeError), (True, TypeError)):
        with pytest.raises(error, match="microbatch_size"):
            torchcurv.HessianOperator(model, criterion, data, microbatch_size=bad)
    with pytest.raises(ValueError, match=r"leading sizes \[3, 5\]"):
        leading_size((torch.zeros(5, 4), torch.zeros(3)))
    unweighted = torchcurv.Objective.from_loss_fn(lambda m, b: criterion(m(b[0]), b[1]))
    with pytest.raises(ValueError, match="needs the objective's weight"):
        torchcurv.HessianOperator(model, unweighted, data, microbatch_size=2)


@pytest.mark.parametrize("operator", ["HessianOperator", "GGNOperator"])
def test_nan_is_reported_with_the_batch_index_not_the_microbatch_index(operator):
    model, criterion, data = case("mlp_tanh", "ce")
    H = getattr(torchcurv, operator)(model, criterion, data, microbatch_size=1)
    data[1][0][2, 0] = float("nan")
    with pytest.raises(torchcurv.NonFiniteLossError, match=r"batch\(es\) \[1\]"):
        H @ torch.randn(H.n, dtype=DT)


def test_causal_lm_microbatches_with_no_predicted_token_are_skipped():
    pytest.importorskip("transformers")
    from hf_zoo import gpt2, lm_batches

    data = lm_batches(sizes=(4, 3))
    data[0]["labels"][1] = -100  # example 1 of batch 0 predicts nothing: 0/0 on its own
    model, objective = gpt2(), torchcurv.causal_lm_objective()
    kw = {"param_filter": "transformer.h.1.attn.c_attn.bias"}
    v = torch.randn(48, dtype=DT, generator=torch.Generator().manual_seed(8))
    whole = torchcurv.HessianOperator(model, objective, data, **kw) @ v
    split = torchcurv.HessianOperator(model, objective, data, microbatch_size=1, **kw) @ v
    assert rel(split, whole) < 1e-12
