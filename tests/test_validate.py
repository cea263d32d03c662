"""torchcurv.validate: per-probe relative errors against external references."""

import numpy as np
import pytest
import scipy.sparse.linalg as spla
import torch
from curvature_oracles import explicit_ggn
from zoo import case

import torchcurv


@pytest.mark.parametrize("op_class", [torchcurv.HessianOperator, torchcurv.GGNOperator,
                                      torchcurv.EmpiricalFisherOperator,
                                      torchcurv.MCFisherOperator])
def test_dense_and_finite_difference_references_agree(op_class):
    op = op_class(*case("layernorm", "ce"))
    dense = torchcurv.validate(op, "dense", probes=3)
    assert dense.relative_errors.shape == (3,) and dense.max_error < 1e-10
    assert torchcurv.validate(op, "finite_difference", probes=2).max_error < 1e-6


def test_matrix_references_of_every_kind():
    model, criterion, data = case("mlp_tanh", "mse")
    G = torchcurv.GGNOperator(model, criterion, data)
    M = explicit_ggn(model, criterion, data)
    for ref in (M, M.numpy(), torchcurv.MatrixOperator(M), spla.aslinearoperator(M.numpy())):
        report = torchcurv.validate(G, ref, probes=4, seed=1)
        assert report.max_error < 1e-10, type(ref)
        assert report.passed(1e-10)


def test_a_wrong_reference_is_caught():
    model, criterion, data = case("mlp_tanh", "mse")
    G = torchcurv.GGNOperator(model, criterion, data)
    M = explicit_ggn(model, criterion, data)
    report = torchcurv.validate(G, 1.01 * M)
    assert 5e-3 < report.max_error < 2e-2
    assert not report.passed(1e-3)
    assert "GGNOperator" in str(report) and "Tensor" in str(report)


def test_validate_against_curvlinops():
    pytest.importorskip("curvlinops", reason="curvlinops not installed")
    op = torchcurv.MCFisherOperator(*case("mlp_tanh", "ce"), mc_samples=3, seed=7)
    assert torchcurv.validate(op, "curvlinops").max_error < 1e-10


def test_probes_are_reproducible_and_options_checked():
    op = torchcurv.GGNOperator(*case("mlp_tanh", "ce"))
    a = torchcurv.validate(op, "dense", seed=4).relative_errors
    assert torch.equal(a, torchcurv.validate(op, "dense", seed=4).relative_errors)
    with pytest.raises(ValueError, match="against must be one of"):
        torchcurv.validate(op, "autograd")
    with pytest.raises(ValueError, match="probes"):
        torchcurv.validate(op, "dense", probes=0)
    with pytest.raises(ValueError, match="shape"):
        torchcurv.validate(op, np.eye(op.n + 1))


def test_the_report_gives_a_verdict_against_a_dtype_aware_tolerance():
    model, criterion, data = case("mlp_tanh", "mse")
    G = torchcurv.GGNOperator(model, criterion, data)
    M = explicit_ggn(model, criterion, data)
    eps64 = torch.finfo(torch.float64).eps
    good = torchcurv.validate(G, M, probes=3)
    assert good.rtol == 1000 * eps64 and good.passed()
    assert str(good).startswith("PASS:") and f"rtol {good.rtol:.1e}" in str(good)
    bad = torchcurv.validate(G, (1 + 1e-9) * M, probes=3)
    assert not bad.passed() and str(bad).startswith("FAIL:")
    assert torchcurv.validate(G, (1 + 1e-9) * M, probes=3, rtol=1e-8).passed()
    fd = torchcurv.validate(G, "finite_difference", probes=2)
    assert fd.rtol == pytest.approx(10 * eps64 ** (1 / 3)) and fd.passed()
    # float32: the same product off by float32 rounding still passes
    G32 = torchcurv.GGNOperator(model.float(), criterion, [(x.float(), y.float())
                                                           for x, y in data])
    r32 = torchcurv.validate(G32, M, probes=3)
    assert r32.rtol == 1000 * torch.finfo(torch.float32).eps and r32.passed()
    assert r32.max_error > 1e3 * eps64  # rounding a float64 tolerance would have failed
