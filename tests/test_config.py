"""One frozen configuration per operator: ``op.config``, ``op.replace(**changes)``, repr.

``replace`` must give the operator that building it directly with the changed arguments
gives: compared as dense float64 matrices, bit for bit, for every operator class.
"""

import dataclasses

import pytest
import torch
from curvature_oracles import explicit_ggn
from zoo import DT, case, explicit_hessian, rel

import torchcurv
from torchcurv.operators.config import CurvatureConfig, HessianConfig, MCFisherConfig

# (class, keywords it is first built with, changes replace() applies)
CASES = {
    "hessian": (torchcurv.HessianOperator, {}, {"method": "forward_over_reverse"}),
    "hessian_params": (torchcurv.HessianOperator, {"method": "finite_difference"},
                       {"param_filter": "2.*"}),
    "ggn": (torchcurv.GGNOperator, {}, {"jvp": "double_vjp", "microbatch_size": 2}),
    "empirical_fisher": (torchcurv.EmpiricalFisherOperator, {"jvp": "finite_difference"},
                         {"jvp": "forward"}),
    "mc_fisher": (torchcurv.MCFisherOperator, {"seed": 1}, {"seed": 7, "mc_samples": 3}),
    "jacobian": (torchcurv.JacobianOperator, {}, {"jvp": "double_vjp"}),
    "kfac": (torchcurv.KFACOperator, {"fisher_type": "empirical"},
             {"fisher_type": "type-2", "separate_weight_and_bias": False}),
    "ekfac": (torchcurv.EKFACOperator, {"seed": 3}, {"mc_samples": 2}),
}


@pytest.mark.parametrize("name", CASES)
def test_replace_is_the_operator_built_directly_with_the_changes(name):
    cls, first, changes = CASES[name]
    model, criterion, data = case("mlp_tanh", "ce")
    op = cls(model, criterion, data, **first)
    replaced = op.replace(**changes)
    direct = cls(model, criterion, data, **{**first, **changes})
    assert type(replaced) is cls
    assert torch.equal(replaced.to_dense(), direct.to_dense())
    for key, value in changes.items():
        assert getattr(replaced.config, key) == value
    # the original is untouched: its own configuration, its own matrix
    assert all(getattr(op.config, k) == v for k, v in first.items())
    assert torch.equal(op.to_dense(), cls(model, criterion, data, **first).to_dense())


def test_replace_changes_the_matrix_as_the_change_says():
    model, criterion, data = case("mlp_tanh", "mse")
    H = torchcurv.HessianOperator(model, criterion, data)
    assert rel(H.to_dense(), explicit_hessian(model, criterion, data)) < 1e-12
    first_layer = list(model[0].parameters())
    H0 = H.replace(params=first_layer)
    assert H0.n == sum(p.numel() for p in first_layer)
    assert rel(H0.to_dense(), explicit_hessian(model, criterion, data, first_layer)) < 1e-12
    G = torchcurv.GGNOperator(model, criterion, data, jvp="finite_difference")
    assert rel(G.replace(jvp="forward").to_dense(), explicit_ggn(model, criterion, data)) < 1e-12


def test_config_holds_the_construction_arguments_and_is_frozen():
    model, criterion, data = case("mlp_tanh", "ce")
    H = torchcurv.HessianOperator(model, criterion, data, method="finite_difference",
                                  microbatch_size=2)
    c = H.config
    assert isinstance(c, HessianConfig) and isinstance(c, CurvatureConfig)
    assert (c.model, c.criterion, c.data) == (model, criterion, data)
    assert (c.method, c.microbatch_size) == ("finite_difference", 2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.method = "autograd"  # type: ignore[misc]


def test_unknown_names_are_refused_listing_the_valid_ones():
    model, criterion, data = case("mlp_tanh", "ce")
    H = torchcurv.HessianOperator(model, criterion, data)
    with pytest.raises(TypeError, match=r"\['jvp'\].*valid: model, criterion, data, params"):
        H.replace(jvp="forward")
    with pytest.raises(TypeError, match=r"HessianOperator got unknown argument\(s\) \['metod'\]"):
        torchcurv.HessianOperator(model, criterion, data, metod="autograd")
    J = torchcurv.JacobianOperator(model, criterion, data)
    with pytest.raises(TypeError, match="method"):
        J.replace(method="autograd")
    with pytest.raises(TypeError, match="max_memry"):
        torchcurv.GGNOperator(model, criterion, data, max_memry=2**20)


def test_a_class_with_arguments_outside_the_configuration_refuses_replace():
    class Scaled(torchcurv.HessianOperator):
        def __init__(self, model, criterion, data, *, factor: float = 1.0, **options):
            super().__init__(model, criterion, data, **options)
            self.factor = factor

    model, criterion, data = case("mlp_tanh", "ce")
    with pytest.raises(TypeError, match="does not hold.*factor"):
        Scaled(model, criterion, data, factor=2.0).replace(check_deterministic=False)


@pytest.mark.parametrize(("bad", "message"), [
    ({"compile": True}, "no derivative to compile"),
    ({"max_memory": 2**30}, "max_memory has nothing to bound"),
    ({"cuda_graphs": True}, "KFACOperator has none to record"),
])
def test_kfac_refuses_the_options_it_has_no_use_for(bad, message):
    model, criterion, data = case("mlp_tanh", "ce")
    with pytest.raises(ValueError, match=message):
        torchcurv.KFACOperator(model, criterion, data, **bad)


def test_the_mc_fisher_keeps_the_generator_state_it_was_built_with():
    model, criterion, data = case("mlp_tanh", "ce")
    g = torch.Generator().manual_seed(5)
    F = torchcurv.MCFisherOperator(model, criterion, data, generator=g)
    before = F.to_dense()
    torch.rand(10, generator=g)  # the caller's generator moves on; the operator's does not
    assert isinstance(F.config, MCFisherConfig) and F.config.generator is not g
    assert torch.equal(F.replace(mc_samples=1).to_dense(), before)


def test_repr_shows_the_class_and_the_non_default_fields():
    model, criterion, data = case("mlp_tanh", "ce")
    H = torchcurv.HessianOperator(model, criterion, data, method="finite_difference",
                                  check_deterministic=False)
    text = repr(H)
    assert text.startswith("HessianOperator(model=<Sequential>, criterion=CrossEntropyLoss()")
    assert "method='finite_difference'" in text and "check_deterministic=False" in text
    assert "microbatch_size" not in text and "distributed" not in text
    assert repr(torchcurv.GGNOperator(model, criterion, data)) == (
        "GGNOperator(model=<Sequential>, criterion=CrossEntropyLoss(), data=<list of 3>)")
    assert repr(torchcurv.JacobianOperator(model, criterion, data)).startswith(
        "JacobianOperator(model=<Sequential>")


def test_validation_references_rebuild_through_replace():
    model, criterion, data = case("mlp_tanh", "ce")
    G = torchcurv.GGNOperator(model, criterion, data, microbatch_size=2)
    from torchcurv.validation.references import rebuild

    ref = rebuild(G, jvp="finite_difference")
    assert ref.config.microbatch_size == 2 and ref.config.jvp == "finite_difference"
    assert ref.config.check_deterministic is False
    assert rel(ref.to_dense(), G.to_dense()) < 1e-7
    assert G.to_dense().dtype == DT
