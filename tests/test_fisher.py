"""Empirical and Monte-Carlo Fisher: definitions, determinism, convergence to the GGN."""

import math

import pytest
import torch
from curvature_oracles import explicit_empirical_fisher, explicit_ggn
from torch import nn
from zoo import LOSSES, MODELS, assert_unchanged, case, rel, snapshot

import torchcurv
from torchcurv.errors import OperatorInputError


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_empirical_fisher_is_scaled_sum_of_per_sample_gradient_outer_products(
    model_name, loss, reduction
):
    model, criterion, data = case(model_name, loss, reduction)
    EF = torchcurv.EmpiricalFisherOperator(model, criterion, data)
    assert rel(EF.to_dense(), explicit_empirical_fisher(model, criterion, data)) < 1e-10


def test_empirical_fisher_counts_loss_terms_with_ignore_index_and_class_weights():
    model, _, data = case("sequence", "ce", sizes=(4, 3))
    data[1][1][:2] = -100
    criterion = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64))
    EF = torchcurv.EmpiricalFisherOperator(model, criterion, data)
    assert rel(EF.to_dense(), explicit_empirical_fisher(model, criterion, data)) < 1e-10


@pytest.mark.parametrize("jvp", ["double_vjp", "finite_difference"])
def test_empirical_fisher_jvp_methods_agree(jvp):
    model, criterion, data = case("layernorm", "ce")
    expected = explicit_empirical_fisher(model, criterion, data)
    EF = torchcurv.EmpiricalFisherOperator(model, criterion, data, jvp=jvp)
    V = torch.randn(EF.n, 3, dtype=torch.float64)
    assert rel(EF.matmat(V), expected @ V) < (1e-7 if jvp == "finite_difference" else 1e-10)


def test_mc_fisher_is_a_fixed_matrix_for_a_seed():
    model, criterion, data = case("mlp_tanh", "ce")
    F = torchcurv.MCFisherOperator(model, criterion, data, mc_samples=2, seed=5)
    V = torch.randn(F.n, 3, dtype=torch.float64)
    first = F.matmat(V)
    assert torch.equal(F.matmat(V), first)
    stacked = torch.stack([F @ V[:, j] for j in range(3)], dim=1)
    assert rel(stacked, first) < 1e-13  # every column saw the same labels
    other = torchcurv.MCFisherOperator(model, criterion, data, mc_samples=2, seed=6)
    assert rel(other.matmat(V), first) > 1e-3


def test_mc_fisher_uses_the_generators_state_without_advancing_it():
    model, criterion, data = case("mlp_tanh", "mse")
    g = torch.Generator().manual_seed(11)
    state = g.get_state()
    F = torchcurv.MCFisherOperator(model, criterion, data, generator=g)
    v = torch.randn(F.n, dtype=torch.float64)
    F @ v
    assert torch.equal(g.get_state(), state)
    seeded = torchcurv.MCFisherOperator(model, criterion, data, seed=11)
    assert torch.equal(seeded @ v, F @ v)


def test_mc_fisher_per_batch_seeds_draw_each_batch_from_its_own_generator():
    model, criterion, data = case("mlp_tanh", "ce")
    F = torchcurv.MCFisherOperator(model, criterion, data, mc_samples=512, seed=2,
                                   per_batch_seeds=True)
    stream = torchcurv.MCFisherOperator(model, criterion, data, mc_samples=512, seed=2)
    dense = F.to_dense()
    assert torch.equal(F.to_dense(), dense)
    assert rel(dense, stream.to_dense()) > 1e-3  # other draws than the single stream
    assert rel(dense, explicit_ggn(model, criterion, data)) < 0.05  # same expectation
    # batch i draws from batch_generator(batch_offset + i): seeds differ per batch
    draws = [torch.rand(4, generator=F.batch_generator(i)) for i in range(3)]
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])


def _mc_error(model, criterion, data, G, samples, seeds):
    errs = [rel(torchcurv.MCFisherOperator(model, criterion, data, mc_samples=samples,
                                           seed=s).to_dense(), G) for s in seeds]
    return sum(errs) / len(errs)


@pytest.mark.parametrize("loss", ["ce", "mse", "bce"])
def test_mc_fisher_converges_to_the_ggn_like_one_over_sqrt_samples(loss):
    model, criterion, data = case("mlp_tanh", loss)
    G = explicit_ggn(model, criterion, data)
    samples = [4, 64, 1024]
    errors = [_mc_error(model, criterion, data, G, s, range(3)) for s in samples]
    slope = math.log(errors[-1] / errors[0]) / math.log(samples[-1] / samples[0])
    assert errors[0] > errors[1] > errors[2]
    assert -0.65 < slope < -0.35, (errors, slope)


def test_mc_fisher_expectation_honours_ignore_index_and_class_weights():
    model, _, data = case("mlp_tanh", "ce", sizes=(6, 4))
    data[0][1][:2] = -100
    criterion = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 3.0, 0.5], dtype=torch.float64))
    G = explicit_ggn(model, criterion, data)
    assert _mc_error(model, criterion, data, G, 4096, [0]) < 0.05


@pytest.mark.parametrize("op_class", [torchcurv.EmpiricalFisherOperator,
                                      torchcurv.MCFisherOperator])
def test_fishers_are_psd_and_symmetric(op_class):
    for loss in LOSSES:
        A = op_class(*case("cnn_bn", loss)).to_dense()
        assert rel(A, A.T) < 1e-13
        assert float(torch.linalg.eigvalsh(A).min()) >= -1e-12 * float(A.norm())


@pytest.mark.parametrize("op_class", [torchcurv.EmpiricalFisherOperator,
                                      torchcurv.MCFisherOperator])
def test_parameter_subsets_select_the_principal_submatrix(op_class):
    model, criterion, data = case("sequence", "ce")
    full = op_class(model, criterion, data)
    chosen = [model.norm.weight, model.head.weight]
    sub = op_class(model, criterion, data, params=chosen)
    names = [n for n, _ in model.named_parameters()]
    sizes = [p.numel() for p in model.parameters()]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    idx = torch.cat([torch.arange(offsets[names.index(n)], offsets[names.index(n)] + s)
                     for n, s in (("norm.weight", 4), ("head.weight", 12))])
    assert rel(sub.to_dense(), full.to_dense()[idx][:, idx]) < 1e-12


@pytest.mark.parametrize("op_class", [torchcurv.EmpiricalFisherOperator,
                                      torchcurv.MCFisherOperator])
def test_model_comes_back_bit_identical(op_class):
    model, criterion, data = case("cnn_bn", "ce")
    model[0].weight.grad = torch.ones_like(model[0].weight)
    before = snapshot(model)
    A = op_class(model, criterion, data, jvp="finite_difference")
    A.matmat(torch.randn(A.n, 2, dtype=torch.float64))
    assert_unchanged(model, before)


def test_mc_fisher_refuses_unknown_distributions_and_bad_sample_counts():
    model, _, data = case("mlp_tanh", "mse")
    with pytest.raises(TypeError, match="predictive distribution"):
        torchcurv.MCFisherOperator(model, nn.HuberLoss(), data)
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="mc_samples"):
            torchcurv.MCFisherOperator(model, nn.MSELoss(), data, mc_samples=bad)


def test_wrong_vectors_are_named():
    EF = torchcurv.EmpiricalFisherOperator(*case("mlp_tanh", "ce"))
    with pytest.raises(OperatorInputError, match="dtype"):
        EF @ torch.zeros(EF.n, dtype=torch.float32)
