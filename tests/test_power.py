"""Power iteration with deflation: largest-magnitude pairs, honest convergence flags."""

import pytest
import torch
from spectra import rotated

import torchcurv
from torchcurv.algorithms.power import power_eigsh

DT = torch.float64


def gapped_spectrum(n: int = 150) -> torch.Tensor:
    ev = torch.linspace(-1, 1, n, dtype=DT)
    ev[-1], ev[0], ev[-2] = 10.0, -6.0, 3.0
    return ev


def test_top_pairs_by_magnitude_with_deflation():
    ev = gapped_spectrum()
    A = rotated(ev)
    r = power_eigsh(torchcurv.MatrixOperator(A), k=3, tol=1e-9, seed=0)
    assert r.backend == "power" and r.all_converged
    assert torch.allclose(r.eigenvalues, torch.tensor([-6.0, 3.0, 10.0], dtype=DT),
                          rtol=1e-9)
    V = r.eigenvectors
    assert bool(((A @ V - V * r.eigenvalues).norm(dim=0) <= 1e-9 * r.eigenvalues.abs()).all())
    assert torch.allclose(V.T @ V, torch.eye(3, dtype=DT), atol=1e-9)


def test_opposite_eigenvalues_of_equal_magnitude_are_reported_unconverged():
    ev = torch.linspace(-1, 1, 100, dtype=DT)
    ev[0], ev[-1] = -5.0, 5.0  # the iterate oscillates between the two eigenvectors
    r = power_eigsh(torchcurv.MatrixOperator(rotated(ev)), k=1, tol=1e-8, maxiter=50)
    assert not r.all_converged
    assert r.info.iterations_per_pair == (50,)


def test_same_seed_same_result():
    op = torchcurv.MatrixOperator(rotated(gapped_spectrum()))
    a = power_eigsh(op, k=2, tol=1e-8, seed=3)
    b = power_eigsh(op, k=2, tol=1e-8, seed=3)
    assert torch.equal(a.eigenvectors, b.eigenvectors)
    assert a.num_matvecs == b.num_matvecs == sum(a.info.iterations_per_pair)


def test_other_which_is_refused_with_a_pointer_to_lanczos():
    op = torchcurv.MatrixOperator(torch.eye(10, dtype=DT))
    with pytest.raises(ValueError, match="use the 'lanczos'"):
        power_eigsh(op, which="LA")
    with pytest.raises(ValueError, match="start vector"):
        power_eigsh(op, v0=torch.zeros(10, dtype=DT))
