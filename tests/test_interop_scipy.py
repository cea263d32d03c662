"""as_linear_operator: a torchcurv operator is a genuine scipy LinearOperator."""

import numpy as np
import pytest
import scipy.sparse.linalg as sla
import torch
from spectra import known_matrix
from zoo import case, explicit_hessian

from torchcurv import HessianOperator, MatrixOperator, as_linear_operator
from torchcurv.interop.scipy import ScipyLinearOperator

N = 40


@pytest.fixture
def matrix():
    A, lam = known_matrix("indefinite", N)
    return A, lam


@pytest.fixture
def adapter(matrix):
    return as_linear_operator(MatrixOperator(torch.tensor(matrix[0])))


def test_adapter_is_a_scipy_operator_with_explicit_dtype_and_no_probe_product():
    op = MatrixOperator(torch.eye(5, dtype=torch.float32))
    A = as_linear_operator(op)
    assert isinstance(A, sla.LinearOperator)
    assert A.shape == (5, 5)
    assert A.dtype == np.float64  # the default for every operator: ARPACK in double
    assert as_linear_operator(op, np.float32).dtype == np.float32
    assert op.num_matvecs == 0 and A.num_matvecs == 0
    assert sla.aslinearoperator(A) is A


def test_matvec_shapes_follow_scipy(adapter, matrix):
    A = matrix[0]
    x = np.random.default_rng(1).standard_normal(N)
    y = adapter.matvec(x)
    assert y.shape == (N,)
    np.testing.assert_allclose(y, A @ x, rtol=1e-13)
    assert adapter.matvec(x[:, None]).shape == (N, 1)
    assert (adapter @ x).shape == (N,)
    assert adapter.dot(x[:, None]).shape == (N, 1)
    X = np.random.default_rng(2).standard_normal((N, 3))
    np.testing.assert_allclose(adapter.matmat(X), A @ X, rtol=1e-13)
    np.testing.assert_allclose(adapter @ X, A @ X, rtol=1e-13)
    with pytest.raises(ValueError, match="dimension mismatch"):
        adapter.matvec(X)


def test_matmat_is_one_block_product_and_counts_every_vector(adapter):
    op = adapter.operator
    adapter.matmat(np.ones((N, 7)))
    assert op.num_calls == 1 and op.num_matvecs == 7
    assert adapter.num_calls == 1 and adapter.num_matvecs == 7
    adapter.matvec(np.ones(N))
    assert adapter.num_calls == 2 and adapter.num_matvecs == 8


@pytest.mark.parametrize(
    "layout",
    ["C", "F", "strided_rows", "negative_stride", "float32", "int64", "read_only"],
)
def test_any_memory_layout_and_real_dtype_gives_the_same_product(adapter, matrix, layout):
    A = matrix[0]
    X = np.random.default_rng(3).standard_normal((N, 4))
    if layout == "F":
        X = np.asfortranarray(X)
    elif layout == "strided_rows":
        X = np.random.default_rng(3).standard_normal((2 * N, 4))[::2]
    elif layout == "negative_stride":
        X = X[::-1]
    elif layout == "float32":
        X = X.astype(np.float32)
    elif layout == "int64":
        X = np.arange(4 * N).reshape(N, 4)
    elif layout == "read_only":
        X.setflags(write=False)
    Y = adapter.matmat(X)
    assert Y.dtype == np.result_type(np.float64, X.dtype)
    np.testing.assert_allclose(Y, A @ X.astype(np.float64), rtol=1e-12)
    np.testing.assert_allclose(adapter.matvec(X[:, 1]), A @ X[:, 1].astype(np.float64),
                               rtol=1e-12)


def test_complex_vectors_are_multiplied_in_one_block(adapter, matrix):
    z = np.random.default_rng(4).standard_normal((N, 2)) @ np.array([1.0, 1j])
    y = adapter.matvec(z)
    assert y.dtype == np.complex128
    np.testing.assert_allclose(y, matrix[0] @ z, rtol=1e-12)
    assert adapter.num_calls == 1 and adapter.num_matvecs == 2


def test_transpose_and_adjoint_are_the_operator_itself(adapter, matrix):
    x = np.random.default_rng(5).standard_normal(N)
    assert adapter.T is adapter and adapter.H is adapter and adapter.adjoint() is adapter
    np.testing.assert_allclose(adapter.rmatvec(x), matrix[0] @ x, rtol=1e-13)
    np.testing.assert_allclose(adapter.rmatmat(x[:, None]), matrix[0] @ x[:, None], rtol=1e-13)


def test_float32_operator_takes_float64_vectors_and_returns_float64(matrix):
    A32 = torch.tensor(matrix[0], dtype=torch.float32)
    adapter = as_linear_operator(MatrixOperator(A32))
    x = np.random.default_rng(6).standard_normal(N)
    y = adapter.matvec(x)
    assert y.dtype == np.float64
    np.testing.assert_allclose(y, matrix[0] @ x, rtol=1e-5, atol=1e-5)
    single = as_linear_operator(MatrixOperator(A32), dtype=np.float32)
    assert single.matvec(x.astype(np.float32)).dtype == np.float32


def test_bad_construction_is_refused_clearly():
    with pytest.raises(TypeError, match="from_linear_operator"):
        as_linear_operator(np.eye(3))
    with pytest.raises(ValueError, match="float32 or float64"):
        as_linear_operator(MatrixOperator(torch.eye(3)), dtype=np.float16)


# -- scipy solvers on the adapter -------------------------------------------------------
@pytest.mark.parametrize("which", ["LA", "SA", "LM", "BE"])
def test_scipy_eigsh_finds_the_known_eigenvalues(adapter, matrix, which):
    lam = matrix[1]
    vals, vecs = sla.eigsh(adapter, k=4, which=which, tol=1e-10)
    want = {"LA": lam[-4:], "SA": lam[:4], "BE": np.r_[lam[:2], lam[-2:]],
            "LM": np.sort(lam[np.argsort(np.abs(lam))[-4:]])}[which]
    np.testing.assert_allclose(np.sort(vals), want, rtol=1e-8)
    np.testing.assert_allclose(matrix[0] @ vecs, vecs * vals, atol=1e-7)


def test_scipy_shift_invert_runs_through_scipys_inner_gmres():
    # scipy inverts a LinearOperator with GMRES, the adapter supplying the products: it
    # works, at many products per eigenvalue (torchcurv.eigsh(sigma=) solves with MINRES).
    adapter = as_linear_operator(MatrixOperator(torch.diag(torch.arange(1.0, 13.0,
                                                                        dtype=torch.float64))))
    vals = sla.eigsh(adapter, k=2, sigma=4.4, tol=1e-8, return_eigenvectors=False)
    np.testing.assert_allclose(np.sort(vals), [4.0, 5.0], rtol=1e-7)
    assert adapter.num_matvecs > 10 * 12


def test_scipy_lobpcg_uses_block_products(adapter, matrix):
    X = np.random.default_rng(7).standard_normal((N, 3))
    vals, _ = sla.lobpcg(adapter, X, largest=True, tol=1e-9, maxiter=300)
    np.testing.assert_allclose(np.sort(vals), matrix[1][-3:], rtol=1e-7)
    assert adapter.num_matvecs > adapter.num_calls  # blocks, not single vectors


def test_linear_solvers_solve_with_the_operator():
    A, _ = known_matrix("conjugated", N)
    spd = as_linear_operator(MatrixOperator(torch.tensor(A + np.eye(N))))
    b = np.random.default_rng(8).standard_normal(N)
    for solver in (sla.cg, sla.minres, sla.gmres):
        x, info = solver(spd, b, rtol=1e-10, maxiter=2000)
        assert info == 0, solver.__name__
        np.testing.assert_allclose((A + np.eye(N)) @ x, b, atol=1e-7)


def test_svds_gives_the_absolute_eigenvalues(adapter, matrix):
    s = sla.svds(adapter, k=3, return_singular_vectors=False, rng=0)
    np.testing.assert_allclose(np.sort(s), np.sort(np.abs(matrix[1]))[-3:], rtol=1e-8)


def test_expm_multiply_matches_the_dense_exponential(matrix):
    A = matrix[0] / 10
    adapter = as_linear_operator(MatrixOperator(torch.tensor(A)))
    b = np.random.default_rng(9).standard_normal(N)
    w, V = np.linalg.eigh(A)
    np.testing.assert_allclose(sla.expm_multiply(adapter, b, traceA=np.trace(A)),
                               V @ (np.exp(w) * (V.T @ b)), rtol=1e-9)


def test_operator_algebra_composes(adapter, matrix):
    A = matrix[0]
    x = np.random.default_rng(10).standard_normal(N)
    shifted = adapter + 0.5 * sla.aslinearoperator(np.eye(N))
    np.testing.assert_allclose(shifted @ x, A @ x + 0.5 * x, rtol=1e-12)
    identity = sla.LinearOperator((N, N), matvec=lambda v: v, dtype=np.float64)
    np.testing.assert_allclose((adapter - 2.0 * identity) @ x, A @ x - 2 * x, rtol=1e-12)
    np.testing.assert_allclose((adapter @ adapter) @ x, A @ (A @ x), rtol=1e-12)
    np.testing.assert_allclose((2 * adapter) @ x, 2 * (A @ x), rtol=1e-12)
    np.testing.assert_allclose((adapter**2).matmat(x[:, None]), A @ A @ x[:, None], rtol=1e-12)


# -- a curvature operator ------------------------------------------------------------
def test_eigsh_on_a_hessian_matches_the_explicit_hessian():
    model, crit, data = case("mlp_tanh", "ce")
    H = HessianOperator(model, crit, data)
    lam = np.linalg.eigvalsh(explicit_hessian(model, crit, data).numpy())
    A = as_linear_operator(H)
    for which, want in (("LA", lam[-3:]), ("SA", lam[:3])):
        vals = sla.eigsh(A, k=3, which=which, tol=1e-10, return_eigenvectors=False)
        np.testing.assert_allclose(np.sort(vals), want, rtol=1e-7, atol=1e-10)
    assert A.num_matvecs == H.num_matvecs  # every ARPACK product reached the Hessian


def test_float32_hessian_round_trips_float64_scipy_vectors():
    model, crit, data = case("mlp_tanh", "ce")
    lam = np.linalg.eigvalsh(explicit_hessian(model, crit, data).numpy())
    model32 = model.float()
    data32 = [(x.float(), y) for x, y in data]
    A = as_linear_operator(HessianOperator(model32, crit, data32))
    assert isinstance(A, ScipyLinearOperator) and A.dtype == np.float64
    vals = sla.eigsh(A, k=3, which="LA", tol=1e-6, return_eigenvectors=False)
    np.testing.assert_allclose(np.sort(vals), lam[-3:], rtol=1e-4)
