"""Block Lanczos: repeated eigenvalues found with their multiplicity, one matmat per block."""

import pytest
import torch
from spectra import rotated
from test_lanczos import assert_true_eigenpairs, indefinite_spectrum, wanted
from zoo import case, explicit_hessian

import torchcurv
from torchcurv.algorithms.block import block_eigsh

DT = torch.float64


def degenerate_spectrum(n: int) -> torch.Tensor:
    """Eigenvalue 5 three times on top, -4 twice at the bottom, a bulk in [0, 1]."""
    ev = torch.linspace(0, 1, n, dtype=DT)
    ev[-3:] = 5.0
    ev[-4] = 4.0
    ev[:2] = -4.0
    return ev


@pytest.mark.parametrize("which", ["LA", "SA", "LM", "BE"])
def test_eigenvalues_match_eigvalsh_for_every_which(which):
    ev = indefinite_spectrum(200)
    A = rotated(ev)
    r = block_eigsh(torchcurv.MatrixOperator(A), k=6, which=which, tol=1e-9, block_size=3)
    assert r.all_converged and r.backend == "block"
    assert torch.allclose(r.eigenvalues, wanted(ev, 6, which), rtol=1e-9, atol=0)
    assert_true_eigenpairs(A, r, 1e-9)


@pytest.mark.parametrize("which, expected", [
    ("LA", [4.0, 5.0, 5.0, 5.0]),
    ("SA", [-4.0, -4.0]),
])
def test_repeated_eigenvalues_are_found_with_their_multiplicity(which, expected):
    ev = degenerate_spectrum(150)
    A = rotated(ev)
    k = len(expected)
    r = block_eigsh(torchcurv.MatrixOperator(A), k=k, which=which, tol=1e-10, block_size=3,
                    seed=0)
    assert r.all_converged
    assert torch.allclose(r.eigenvalues, torch.tensor(expected, dtype=DT), rtol=1e-10)
    assert_true_eigenpairs(A, r, 1e-10)  # including: the copies' vectors are orthonormal


def test_each_block_step_is_one_matmat_call():
    op = torchcurv.MatrixOperator(rotated(indefinite_spectrum(200)))
    r = block_eigsh(op, k=4, tol=1e-8, block_size=4)
    assert r.info.block_size == 4
    assert r.num_matvecs == 4 * op.num_calls  # the residual check is not counted


def test_default_block_size_and_ncv():
    op = torchcurv.MatrixOperator(rotated(indefinite_spectrum(300)))
    r = block_eigsh(op, k=5, tol=1e-8)
    assert r.info.block_size == 5
    assert r.info.ncv == 2 * 5 + 4 * 5
    small = block_eigsh(torchcurv.MatrixOperator(torch.diag(torch.arange(9.0, dtype=DT))),
                        k=5, tol=1e-10)
    assert small.info.block_size == 2  # shrunk so that k + 2p <= n
    assert torch.allclose(small.eigenvalues, torch.arange(4.0, 9.0, dtype=DT))


def test_hessian_of_zoo_model_matches_explicit_hessian():
    model, criterion, data = case("layernorm", "mse")
    H = torchcurv.HessianOperator(model, criterion, data)
    expected = torch.linalg.eigvalsh(explicit_hessian(model, criterion, data))
    r = block_eigsh(H, k=4, which="LM", tol=1e-8, block_size=4, seed=0)
    assert r.all_converged
    assert torch.allclose(r.eigenvalues, wanted(expected, 4, "LM"), rtol=1e-7, atol=0)


def test_same_seed_same_result():
    op = torchcurv.MatrixOperator(rotated(indefinite_spectrum(100)))
    a = block_eigsh(op, k=3, tol=1e-8, seed=4)
    b = block_eigsh(op, k=3, tol=1e-8, seed=4)
    assert torch.equal(a.eigenvectors, b.eigenvectors)


@pytest.mark.parametrize("kwargs, match", [
    ({"block_size": 0}, "block_size must be a positive int"),
    ({"block_size": 48}, "ncv must be"),
    ({"v0": torch.ones(50, dtype=DT)}, r"v0 must have shape \(50, 2\)"),
])
def test_bad_arguments_raise_clear_errors(kwargs, match):
    op = torchcurv.MatrixOperator(torch.eye(50, dtype=DT))
    args = {"k": 3, "block_size": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        block_eigsh(op, **args)
