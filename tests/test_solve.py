"""torchcurv.solve, InverseOperator, eigsh(sigma=) and JacobianOperator against explicit
float64 matrices of the zoo models (numpy.linalg.solve / eigh / svd) and scipy."""

import numpy as np
import pytest
import scipy.sparse.linalg as sla
import torch
from curvature_oracles import (
    concatenated,
    explicit_empirical_fisher,
    explicit_ggn,
    explicit_jacobian,
)
from zoo import assert_unchanged, case, explicit_hessian, snapshot

import torchcurv
from torchcurv.interop.scipy import as_linear_operator

DT = torch.float64


def _hessian(loss="mse"):
    model, crit, data = case("mlp_tanh", loss)
    return model, crit, data, explicit_hessian(model, crit, data)


def _dense_hessian():
    return _hessian()[3]


def _rhs(n, m, seed=0):
    return torch.randn(n, m, dtype=DT, generator=torch.Generator().manual_seed(seed))


def _dense_solve(A, B, damping):
    return torch.from_numpy(np.linalg.solve((A + damping * torch.eye(len(A), dtype=DT)).numpy(),
                                            B.numpy()))


@pytest.mark.parametrize("kind", ["ggn", "ef", "hessian_damped"])
def test_cg_matches_numpy_solve_on_positive_definite_curvature(kind):
    model, crit, data = case("mlp_tanh", "ce")
    if kind == "ggn":
        op, A = torchcurv.GGNOperator(model, crit, data), explicit_ggn(model, crit, data)
    elif kind == "ef":
        op = torchcurv.EmpiricalFisherOperator(model, crit, data)
        A = explicit_empirical_fisher(model, crit, data)
    else:
        op, A = torchcurv.HessianOperator(model, crit, data), explicit_hessian(model, crit, data)
    damping = 1.0 if kind == "hessian_damped" else 1e-2  # singular GGN/EF plus damping
    B = _rhs(op.n, 3)
    before = snapshot(model)
    r = torchcurv.solve(op, B, damping=damping, tol=1e-10)
    assert_unchanged(model, before)
    x = _dense_solve(A, B, damping)
    assert r.all_converged and not r.indefinite.any()
    assert float((r.x - x).norm() / x.norm()) < 1e-8
    assert r.x.shape == B.shape and r.num_matvecs <= 3 * (int(r.iterations.max()) + 2)


def test_minres_solves_an_indefinite_hessian_and_cg_reports_it():
    A = _dense_hessian()
    assert float(torch.linalg.eigvalsh(A)[0]) < 0  # the case is indefinite
    op = torchcurv.MatrixOperator(A)
    B = _rhs(op.n, 2)
    r = torchcurv.solve(op, B, method="minres", tol=1e-11)
    x = _dense_solve(A, B, 0.0)
    assert r.all_converged and float((r.x - x).norm() / x.norm()) < 1e-7
    cg = torchcurv.solve(op, B, method="cg", tol=1e-11)
    assert cg.indefinite.all() and not cg.converged.any()
    with pytest.raises(torchcurv.NotConvergedError, match="non-positive curvature"):
        cg.raise_if_not_converged()


def test_block_columns_stop_on_their_own_and_match_single_solves():
    A = torch.diag(torch.linspace(1.0, 100.0, 40, dtype=DT))
    op = torchcurv.MatrixOperator(A)
    B = torch.zeros(40, 3, dtype=DT)
    B[0, 0] = 1.0  # an eigenvector: one iteration
    B[:, 1] = 1.0
    r = torchcurv.solve(op, B, tol=1e-12)
    assert r.iterations[0] == 1 and r.iterations[1] > 1 and r.iterations[2] == 0  # b = 0
    assert torch.equal(r.x[:, 2], torch.zeros(40, dtype=DT)) and r.all_converged
    single = torchcurv.solve(op, B[:, 1], tol=1e-12)
    assert single.x.shape == (40,)
    assert torch.allclose(single.x, r.x[:, 1], rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", ["cg", "minres"])
def test_agrees_with_scipy_on_as_linear_operator(method):
    model, crit, data = case("mlp_tanh", "ce")
    G = torchcurv.GGNOperator(model, crit, data)
    b = _rhs(G.n, 1)[:, 0]
    ours = torchcurv.solve(G, b, damping=0.1, method=method, tol=1e-10)
    shifted = as_linear_operator(G) + 0.1 * sla.aslinearoperator(np.eye(G.n))
    theirs, info = getattr(sla, method)(shifted, b.numpy(), rtol=1e-12)
    assert info == 0
    assert np.linalg.norm(ours.x.numpy() - theirs) / np.linalg.norm(theirs) < 1e-8


def test_preconditioners_keep_the_answer_and_jacobi_saves_iterations():
    d = torch.logspace(0, 4, 60, dtype=DT)
    U, _ = torch.linalg.qr(_rhs(60, 60, seed=1))
    A = torch.diag(d) + 1e-2 * (U @ torch.diag(torch.rand(60, dtype=DT)) @ U.T)
    A = (A + A.T) / 2
    op = torchcurv.MatrixOperator(A)
    b = _rhs(60, 1)[:, 0]
    x = _dense_solve(A, b[:, None], 0.0)[:, 0]
    plain = torchcurv.solve(op, b, tol=1e-10)
    jacobi = torchcurv.solve(op, b, tol=1e-10,
                             preconditioner=torchcurv.diagonal(op, method="exact"))
    exact = torchcurv.solve(op, b, tol=1e-10, method="minres",
                            preconditioner=torch.linalg.inv(A))
    for r in (plain, jacobi, exact):
        assert r.all_converged and float((r.x - x).norm() / x.norm()) < 1e-7
    assert int(jacobi.iterations[0]) < int(plain.iterations[0]) / 2
    assert int(exact.iterations[0]) <= 2
    with pytest.raises(ValueError, match="not positive definite"):
        torchcurv.solve(op, b, preconditioner=-torch.eye(60, dtype=DT))


def test_bad_input_is_refused_clearly():
    op = torchcurv.MatrixOperator(torch.eye(4, dtype=DT))
    with pytest.raises(torchcurv.OperatorInputError, match=r"\(4,\)"):
        torchcurv.solve(op, torch.ones(5, dtype=DT))
    with pytest.raises(torchcurv.OperatorInputError, match="non-finite"):
        torchcurv.solve(op, torch.tensor([1.0, float("nan"), 0, 0], dtype=DT))
    with pytest.raises(ValueError, match="unknown solve method"):
        torchcurv.solve(op, torch.ones(4, dtype=DT), method="gmres")
    with pytest.raises(ValueError, match="damping"):
        torchcurv.solve(op, torch.ones(4, dtype=DT), damping=float("inf"))
    with pytest.raises(ValueError, match="ambiguous"):
        torchcurv.solve(op, torch.ones(4, dtype=DT), preconditioner=torch.ones(4, dtype=DT))


def test_inverse_operator_is_an_operator_and_raises_when_a_solve_fails():
    A = _dense_hessian()
    op = torchcurv.MatrixOperator(A)
    inv = torchcurv.InverseOperator(op, 0.5, method="minres", tol=1e-12)
    Ainv = torch.linalg.inv(A + 0.5 * torch.eye(len(A), dtype=DT))
    V = _rhs(op.n, 2)
    assert torch.allclose(inv @ V, Ainv @ V, rtol=0, atol=1e-9 * float(Ainv.norm()))
    lin = as_linear_operator(inv)
    assert np.allclose(lin @ V[:, 0].numpy(), (Ainv @ V[:, 0]).numpy(), atol=1e-8)
    top = torchcurv.eigsh(inv, k=3, which="LM", tol=1e-8).eigenvalues
    want = torch.linalg.eigvalsh(Ainv)
    want = want[want.abs().argsort(descending=True)[:3]].sort().values
    assert torch.allclose(top, want, rtol=1e-7)
    starved = torchcurv.InverseOperator(op, 0.5, method="minres", tol=1e-12, maxiter=2)
    with pytest.raises(torchcurv.NotConvergedError, match="did not converge"):
        starved @ V


@pytest.mark.parametrize("backend", ["arpack", "lanczos"])
def test_shift_invert_finds_the_eigenvalues_nearest_zero_of_a_zoo_hessian(backend):
    A = _dense_hessian()
    ev = torch.linalg.eigvalsh(A)
    nearest = ev[ev.abs().argsort()[:5]].sort().values
    r = torchcurv.eigsh(torchcurv.MatrixOperator(A), k=5, sigma=0.0, backend=backend, tol=1e-10)
    assert r.which == "LM" and r.all_converged
    assert float((r.eigenvalues - nearest).abs().max()) < 1e-8
    above = torchcurv.eigsh(torchcurv.MatrixOperator(A), k=2, sigma=0.0, which="LA",
                            backend=backend, tol=1e-10).eigenvalues
    assert torch.allclose(above, ev[ev > 0][:2], rtol=0, atol=1e-8)


def test_shift_invert_on_a_hessian_operator_keeps_the_model():
    model, crit, data, A = _hessian()
    H = torchcurv.HessianOperator(model, crit, data)
    before = snapshot(model)
    r = torchcurv.eigsh(H, k=1, sigma=0.0, backend="lanczos", tol=1e-8)
    assert_unchanged(model, before)
    ev = torch.linalg.eigvalsh(A)
    assert abs(float(r.eigenvalues[0]) - float(ev[ev.abs().argmin()])) < 1e-9
    assert r.num_matvecs > 0


@pytest.mark.parametrize("jvp", ["forward", "double_vjp"])
def test_jacobian_operator_matches_the_explicit_jacobian(jvp):
    model, crit, data = case("mlp_tanh", "ce")
    before = snapshot(model)
    J = torchcurv.JacobianOperator(model, crit, data, jvp=jvp)
    X, _ = concatenated(data)
    _, Jd = explicit_jacobian(model, X)
    assert J.shape == tuple(Jd.shape) == (30, 43)
    v, w = _rhs(43, 2), _rhs(30, 2, seed=1)
    assert torch.allclose(J @ v, Jd @ v, atol=1e-12)
    assert torch.allclose(J.T @ w, Jd.T @ w, atol=1e-12)
    assert torch.allclose(J.rmatvec(w[:, 0]), Jd.T @ w[:, 0], atol=1e-12)
    assert J.T.T is J and J.T.shape == (43, 30)
    assert_unchanged(model, before)


def test_jacobian_svds_and_gauss_newton_identity():
    model, crit, data = case("mlp_tanh", "mse")
    J = torchcurv.JacobianOperator(model, crit, data)
    X, _ = concatenated(data)
    _, Jd = explicit_jacobian(model, X)
    s = sla.svds(as_linear_operator(J), k=4, return_singular_vectors=False)
    assert np.allclose(np.sort(s)[::-1], np.linalg.svd(Jd.numpy(), compute_uv=False)[:4],
                       rtol=1e-10)
    # MSE 'mean' over 30 outputs: H_out = 2/30 I on every batch
    V = _rhs(J.shape[1], 3)
    ggn = J.T @ ((2 / 30) * (J @ V))
    assert torch.allclose(ggn, explicit_ggn(model, crit, data) @ V, atol=1e-12)
    assert torch.allclose(ggn, J.ggn @ V, atol=1e-12)
    with pytest.raises(torchcurv.OperatorInputError, match=r"\(30,\)"):
        J.T @ torch.ones(43, dtype=DT)
