"""torchcurv.eigsh: one front door, one result type, every backend right to the tol asked."""

import sys

import numpy as np
import pytest
import torch
from spectra import KINDS, expected, known_matrix
from zoo import case, explicit_hessian

import torchcurv
from torchcurv import EigshResult, HessianOperator, MatrixOperator, OperatorInputError
from torchcurv.algorithms import eigsh as front_door
from torchcurv.algorithms.eigsh import Backend

N = 48
CPU_BACKENDS = {"arpack": ["LA", "SA", "LM", "SM", "BE"], "lobpcg": ["LA", "SA"]}
CASES = [(b, w) for b, ws in CPU_BACKENDS.items() for w in ws]
SINGLE_VECTOR = {"arpack", "cupy"}  # Krylov methods started from one vector


def _op(kind, dtype=torch.float64):
    A, lam = known_matrix(kind, N)
    return MatrixOperator(torch.tensor(A, dtype=dtype)), lam


def _assert_agrees(result: EigshResult, want: np.ndarray, tol: float):
    # A residual r bounds the distance of the Ritz value to the spectrum by r.
    err = np.abs(result.eigenvalues.numpy() - want)
    assert (err <= tol * np.abs(want) + 1e-12).all(), (result.eigenvalues, want)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("backend", "which"), CASES)
def test_every_backend_finds_the_known_eigenvalues_to_tol(kind, backend, which):
    op, lam = _op(kind)
    tol = 1e-8
    r = torchcurv.eigsh(op, k=4, which=which, backend=backend, tol=tol, seed=0)
    assert isinstance(r, EigshResult) and r.backend == backend and r.which == which
    assert r.all_converged, r
    if kind == "degenerate" and backend in SINGLE_VECTOR:
        # A Krylov space grown from one vector holds one direction per distinct
        # eigenvalue (in exact arithmetic): a triple eigenvalue may be found fewer times,
        # and then its place goes to the next eigenvalue. Every pair is still a true one.
        gaps = np.abs(r.eigenvalues.numpy()[:, None] - lam[None, :]).min(axis=1)
        assert (gaps <= tol * np.abs(r.eigenvalues.numpy())).all()
        assert set(np.round(expected(lam, 4, which), 8)) <= set(np.round(lam, 8))
    else:
        _assert_agrees(r, expected(lam, 4, which), tol)
    assert (r.residuals <= tol * r.eigenvalues.abs()).all()
    assert r.num_matvecs > 0 and r.wall_time > 0


@pytest.mark.parametrize(("backend", "which"), CASES)
def test_eigenvalues_ascend_and_vectors_live_on_the_operator(backend, which):
    op, _ = _op("indefinite", torch.float64)
    r = torchcurv.eigsh(op, k=5, which=which, backend=backend, tol=1e-8)
    assert r.eigenvalues.dtype == torch.float64 and r.eigenvalues.device.type == "cpu"
    assert torch.all(r.eigenvalues[1:] >= r.eigenvalues[:-1])
    V = r.eigenvectors
    assert V.shape == (N, 5) and V.dtype == op.dtype and V.device == op.device
    torch.testing.assert_close(V.T @ V, torch.eye(5, dtype=V.dtype), atol=1e-7, rtol=0)
    torch.testing.assert_close(op @ V, V * r.eigenvalues, atol=1e-6, rtol=0)


def test_a_float32_operator_is_solved_in_float64_and_returns_float32_vectors():
    op, lam = _op("conjugated", torch.float32)
    r = torchcurv.eigsh(op, k=3, which="LA", tol=1e-5)
    assert r.eigenvectors.dtype == torch.float32
    _assert_agrees(r, lam[-3:], 1e-5)
    assert r.all_converged


def test_values_only_skips_the_vectors_and_their_residuals():
    op, lam = _op("diagonal")
    for backend in CPU_BACKENDS:
        r = torchcurv.eigsh(op, k=3, backend=backend, return_eigenvectors=False, tol=1e-9)
        assert r.eigenvectors is None and torch.isnan(r.residuals).all()
        _assert_agrees(r, lam[-3:], 1e-9)


@pytest.mark.parametrize("backend", list(CPU_BACKENDS))
def test_a_fixed_seed_gives_the_same_run(backend):
    op, _ = _op("clustered")
    a = torchcurv.eigsh(op, k=3, backend=backend, seed=7)
    b = torchcurv.eigsh(op, k=3, backend=backend, seed=7)
    assert torch.equal(a.eigenvalues, b.eigenvalues) and a.num_matvecs == b.num_matvecs


def test_arpack_non_convergence_gives_a_flagged_partial_result_not_an_exception():
    op, _ = _op("clustered")
    with pytest.warns(RuntimeWarning, match="ARPACK converged"):
        r = torchcurv.eigsh(op, k=6, which="LA", maxiter=1, tol=1e-12, ncv=8)
    assert r.eigenvalues.shape == (6,) and r.eigenvectors.shape == (N, 6)
    assert not r.all_converged
    missing = torch.isnan(r.eigenvalues)
    assert missing.any() and not r.converged[missing].any()
    assert torch.isnan(r.eigenvalues[-int(missing.sum()):]).all()  # NaN sorts last


def test_a_hessian_has_the_explicit_hessians_extreme_eigenvalues():
    model, crit, data = case("mlp_tanh", "ce")
    lam = np.linalg.eigvalsh(explicit_hessian(model, crit, data).numpy())
    H = HessianOperator(model, crit, data)
    for backend, which in (("arpack", "LA"), ("arpack", "SA"), ("lobpcg", "LA")):
        r = torchcurv.eigsh(H, k=3, which=which, backend=backend, tol=1e-7)
        assert r.all_converged, r
        _assert_agrees(r, expected(lam, 3, which), 1e-7)


def test_a_matrix_goes_straight_in():
    A, lam = known_matrix("indefinite", N)
    r = torchcurv.eigsh(A, k=2, which="SA", tol=1e-10)
    _assert_agrees(r, lam[:2], 1e-10)


# -- refusals ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"k": N}, ValueError, "1 <= k < n"),
        ({"k": 0}, ValueError, "1 <= k < n"),
        ({"k": 2.0}, TypeError, "k must be an int"),
        ({"which": "LR"}, ValueError, "which must be one of"),
        ({"which": "LM", "backend": "lobpcg"}, ValueError, "backends for 'LM': arpack"),
        ({"which": "BE", "backend": "cupy"}, ValueError, "finds which in"),
        ({"backend": "magic"}, ValueError, "unknown eigsh backend 'magic'; available: arpack"),
        ({"tol": -1.0}, ValueError, "finite relative tolerance >= 0"),
        ({"tol": float("inf")}, ValueError, "finite relative tolerance >= 0"),
        ({"maxiter": 0}, ValueError, "maxiter"),
        ({"seed": "a"}, TypeError, "seed"),
        ({"sigma": 1.0, "backend": "lobpcg"}, ValueError, "shift-invert"),
        ({"sigma": float("nan")}, ValueError, "sigma must be a finite"),
        ({"ncvv": 30}, TypeError, r"takes no option\(s\) \['ncvv'\]; its options: ncv"),
        ({"v0": np.ones(N + 1)}, OperatorInputError, r"v0 has shape \(49,\)"),
        ({"backend": "lobpcg", "X0": np.ones((N, 3))}, OperatorInputError, "X0 has shape"),
        ({"backend": "lobpcg", "block_size": 2}, ValueError, "block_size"),
    ],
)
def test_bad_arguments_fail_with_a_clear_error(kwargs, error, match):
    op, _ = _op("diagonal")
    kwargs = {"k": 4, **kwargs}
    with pytest.raises(error, match=match):
        torchcurv.eigsh(op, **kwargs)


def test_a_non_square_operator_is_refused():
    with pytest.raises(ValueError, match="square"):
        torchcurv.eigsh(np.ones((5, 4)), k=2)


def test_a_backend_module_not_installed_is_named_with_the_available_ones(monkeypatch):
    monkeypatch.setitem(front_door.BACKENDS, "lanczos",
                        Backend("torchcurv.algorithms.no_such_module", "f", None, ""))
    with pytest.raises(ValueError, match=r"'lanczos' is not part of this installation.*arpack"):
        torchcurv.eigsh(_op("diagonal")[0], k=2, backend="lanczos")


def test_the_cupy_backend_without_cupy_names_the_extra():
    if "cupy" in sys.modules or _importable("cupy"):
        pytest.skip("CuPy is installed here")
    with pytest.raises(torchcurv.MissingExtraError, match=r"torchcurv\[gpu\]"):
        torchcurv.eigsh(_op("diagonal")[0], k=2, backend="cupy")


def _importable(name):
    import importlib.util

    return importlib.util.find_spec(name) is not None


# -- plugging in a backend -------------------------------------------------------------
CALLS = []


def recording_eigsh(op, *, k, which, tol, maxiter, seed, return_eigenvectors, **options):
    CALLS.append(dict(k=k, which=which, tol=tol, maxiter=maxiter, seed=seed,
                      return_eigenvectors=return_eigenvectors, **options))
    vals, vecs = torch.linalg.eigh(op.to_dense())
    return torchcurv.algorithms.assemble.assemble_result(
        op, vals[-k:], vecs[:, -k:], k=k, backend="recording", which=which, tol=tol,
        num_matvecs=op.n, wall_time=0.0)


def test_a_plugged_in_backend_gets_every_argument_and_its_options(monkeypatch):
    monkeypatch.setitem(front_door.BACKENDS, "recording",
                        Backend(__name__, "recording_eigsh", None, "test double"))
    CALLS.clear()
    op, lam = _op("diagonal")
    r = torchcurv.eigsh(op, k=3, backend="recording", tol=1e-3, maxiter=5, seed=2,
                        basis_dtype=torch.float64)
    assert CALLS == [dict(k=3, which="LA", tol=1e-3, maxiter=5, seed=2,
                          return_eigenvectors=True, basis_dtype=torch.float64)]
    _assert_agrees(r, lam[-3:], 1e-12)
