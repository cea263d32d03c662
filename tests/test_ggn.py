"""GGNOperator: Jᵀ H J over the whole data set, equal to explicit autograd matrices."""

import pytest
import torch
from curvature_oracles import explicit_ggn
from torch import nn
from zoo import LOSSES, MODELS, assert_unchanged, case, explicit_hessian, rel, snapshot

import torchcurv
from torchcurv.errors import OperatorInputError

JVPS = ["forward", "double_vjp", "finite_difference"]


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_dense_ggn_equals_explicit_jacobian_product(model_name, loss, reduction):
    model, criterion, data = case(model_name, loss, reduction)
    G = torchcurv.GGNOperator(model, criterion, data)
    assert rel(G.to_dense(), explicit_ggn(model, criterion, data)) < 1e-10


@pytest.mark.parametrize("model_name", ["mlp_silu", "layernorm", "cnn_bn", "sequence"])
@pytest.mark.parametrize("jvp", JVPS)
def test_every_jvp_method_matches_oracle_on_blocks(model_name, jvp):
    model, criterion, data = case(model_name, "ce")
    expected = explicit_ggn(model, criterion, data)
    G = torchcurv.GGNOperator(model, criterion, data, jvp=jvp)
    V = torch.randn(G.n, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    tol = 1e-7 if jvp == "finite_difference" else 1e-10
    assert rel(G.matmat(V), expected @ V) < tol
    assert rel(G @ V[:, 0], expected @ V[:, 0]) < tol


def test_block_product_equals_stacked_matvecs():
    G = torchcurv.GGNOperator(*case("sequence", "ce"))
    V = torch.randn(G.n, 4, dtype=torch.float64)
    stacked = torch.stack([G.matvec(V[:, j]) for j in range(4)], dim=1)
    assert rel(G.matmat(V), stacked) < 1e-13


def test_ggn_equals_hessian_for_a_linear_model_with_mse():
    model, _, data = case("mlp_tanh", "mse")
    linear = nn.Linear(4, 3).double()
    criterion = nn.MSELoss()
    G = torchcurv.GGNOperator(linear, criterion, data).to_dense()
    assert rel(G, explicit_hessian(linear, criterion, data)) < 1e-12
    assert model is not linear


def test_ggn_is_symmetric_and_psd():
    for loss in LOSSES:
        G = torchcurv.GGNOperator(*case("layernorm", loss)).to_dense()
        assert rel(G, G.T) < 1e-13
        assert float(torch.linalg.eigvalsh(G).min()) >= -1e-12 * float(G.norm())
        V = torch.randn(G.shape[0], 16, dtype=torch.float64)
        assert float((V * (G @ V)).sum(0).min()) >= -1e-12


def test_ignore_index_class_weights_and_label_smoothing_are_exact():
    model, _, data = case("sequence", "ce", sizes=(4, 3))
    data[0][1][:3] = -100
    criterion = nn.CrossEntropyLoss(
        weight=torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64), label_smoothing=0.1
    )
    G = torchcurv.GGNOperator(model, criterion, data)
    assert rel(G.to_dense(), explicit_ggn(model, criterion, data)) < 1e-10


def test_custom_objective_uses_autograd_fallback_and_agrees():
    model, criterion, data = case("mlp_tanh", "mse")
    objective = torchcurv.Objective(
        forward=lambda m, b: m(b[0]),
        loss=lambda out, b: ((out - b[1]) ** 2).mean(),
        weight=lambda b: b[1].numel(),
    )
    G = torchcurv.GGNOperator(model, objective, data)
    assert rel(G.to_dense(), explicit_ggn(model, criterion, data)) < 1e-12


def test_loss_only_objective_is_refused():
    model, _, data = case("mlp_tanh", "mse")
    objective = torchcurv.Objective.from_loss_fn(lambda m, b: m(b[0]).pow(2).mean())
    with pytest.raises(ValueError, match="output separate from the loss"):
        torchcurv.GGNOperator(model, objective, data)


def test_parameter_subset_by_list_and_glob():
    model, criterion, data = case("sequence", "ce")
    chosen = [model.mix.weight, model.head.bias]
    G = torchcurv.GGNOperator(model, criterion, data, params=chosen)
    assert rel(G.to_dense(), explicit_ggn(model, criterion, data, chosen)) < 1e-10
    F = torchcurv.GGNOperator(model, criterion, data, param_filter="norm.*")
    assert F.param_names == ["norm.weight", "norm.bias"]
    expected = explicit_ggn(model, criterion, data, [model.norm.weight, model.norm.bias])
    assert rel(F.to_dense(), expected) < 1e-10


@pytest.mark.parametrize("jvp", JVPS)
def test_model_comes_back_bit_identical(jvp):
    model, criterion, data = case("cnn_bn", "ce")
    model[0].weight.grad = torch.ones_like(model[0].weight)
    before = snapshot(model)
    G = torchcurv.GGNOperator(model, criterion, data, jvp=jvp)
    G.matmat(torch.randn(G.n, 2, dtype=torch.float64))
    G @ torch.randn(G.n, dtype=torch.float64)
    assert_unchanged(model, before)


def test_finite_difference_restores_parameters_when_the_forward_raises():
    model, criterion, data = case("mlp_tanh", "ce")
    before = snapshot(model)
    G = torchcurv.GGNOperator(model, criterion, data, jvp="finite_difference")
    calls = {"n": 0}

    def boom(module, args):
        calls["n"] += 1
        if calls["n"] == 2:  # inside the perturbed forwards
            raise RuntimeError("boom")

    handle = model.register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        G @ torch.randn(G.n, dtype=torch.float64)
    handle.remove()
    assert_unchanged(model, before)


def test_bad_inputs_and_options_are_named():
    model, criterion, data = case("mlp_tanh", "ce")
    with pytest.raises(ValueError, match="jvp must be one of"):
        torchcurv.GGNOperator(model, criterion, data, jvp="reverse")
    G = torchcurv.GGNOperator(model, criterion, data)
    with pytest.raises(OperatorInputError, match="dtype"):
        G @ torch.zeros(G.n, dtype=torch.float32)
    with pytest.raises(OperatorInputError, match="shape"):
        G @ torch.zeros(G.n + 1, dtype=torch.float64)


def test_nan_loss_is_reported():
    model, criterion, data = case("mlp_tanh", "ce")
    G = torchcurv.GGNOperator(model, criterion, data)
    with torch.no_grad():
        model[0].bias[0] = float("nan")
    try:
        with pytest.raises(torchcurv.NonFiniteLossError):
            G @ torch.ones(G.n, dtype=torch.float64)
    finally:
        with torch.no_grad():
            model[0].bias[0] = 0.0


@pytest.mark.gpu
@pytest.mark.parametrize("op_class", [torchcurv.GGNOperator, torchcurv.EmpiricalFisherOperator,
                                      torchcurv.MCFisherOperator])
def test_cuda_operators_match_their_dense_reference(op_class):
    model, criterion, data = case("sequence", "ce")
    model = model.cuda()
    data = [(x.cuda(), y.cuda()) for x, y in data]
    for jvp in ("forward", "double_vjp", "finite_difference"):
        op = op_class(model, criterion, data, jvp=jvp)
        assert op.device.type == "cuda"
        tol = 1e-7 if jvp == "finite_difference" else 1e-10
        assert torchcurv.validate(op, "dense", probes=3).max_error < tol
