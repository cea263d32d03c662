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
