"""as_cupy_linear_operator: CuPy's solvers on torchcurv operators, zero-copy on the GPU.

All but the first test need a CUDA device (marked ``gpu``) and CuPy
(``pip install 'torchcurv[gpu]'``).
"""

import importlib.util
import inspect

import numpy as np
import pytest
import torch
from spectra import expected, known_matrix
from zoo import case, explicit_hessian

import torchcurv
from torchcurv import HessianOperator, MatrixOperator, MissingExtraError

N = 48


@pytest.mark.skipif(importlib.util.find_spec("cupy") is not None, reason="CuPy is installed")
def test_without_cupy_the_error_names_the_extra_to_install():
    op = MatrixOperator(torch.eye(3))
    with pytest.raises(MissingExtraError, match=r"pip install 'torchcurv\[gpu\]'") as err:
        torchcurv.as_cupy_linear_operator(op)
    assert err.value.package == "cupy" and err.value.extra == "gpu"


@pytest.fixture
def cp():
    return pytest.importorskip("cupy")


@pytest.fixture
def csla(cp):
    import cupyx.scipy.sparse.linalg

    return cupyx.scipy.sparse.linalg


class RecordingOperator(MatrixOperator):
    """Remembers where the vectors it received and returned live."""

    def _matmat(self, V):
        out = super()._matmat(V)
        self.seen = (V.data_ptr(), out.data_ptr())
        return out


def _cuda_op(kind="indefinite", dtype=torch.float64, cls=MatrixOperator):
    A, lam = known_matrix(kind, N)
    return cls(torch.tensor(A, dtype=dtype, device="cuda")), A, lam


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(N,), (N, 1), (N, 3)])
def test_vectors_cross_by_pointer_with_no_host_copy(cp, shape):
    op, A, _ = _cuda_op(cls=RecordingOperator)
    L = torchcurv.as_cupy_linear_operator(op)
    assert L.dtype == np.float64
    assert op.num_matvecs == 0  # explicit dtype: CuPy did not probe with a product
    x = cp.random.standard_normal(shape)
    y = L @ x
    assert y.shape == shape and isinstance(y, cp.ndarray)
    assert op.seen == (x.data.ptr, y.data.ptr)
    assert_same_product(cp.asnumpy(y), A @ cp.asnumpy(x))
    assert L.num_matvecs == (shape[1] if len(shape) == 2 else 1)


def assert_same_product(got: np.ndarray, expected: np.ndarray) -> None:
    # cuBLAS and NumPy sum in different orders: entries near zero differ by ~eps * scale
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-13 * np.abs(expected).max())


@pytest.mark.gpu
def test_products_on_a_non_default_cupy_stream_are_right(cp):
    op, A, _ = _cuda_op()
    L = torchcurv.as_cupy_linear_operator(op)
    with cp.cuda.Stream(non_blocking=True):
        x = cp.random.standard_normal((N, 4))
        y = L.matmat(x)
        got = cp.asnumpy(y)
    assert_same_product(got, A @ cp.asnumpy(x))


@pytest.mark.gpu
def test_float32_operator_with_float64_cupy_vectors_and_complex_vectors(cp):
    op, A, _ = _cuda_op(dtype=torch.float32)
    assert torchcurv.as_cupy_linear_operator(op).dtype == np.float32  # default: shared
    L = torchcurv.as_cupy_linear_operator(op, dtype=np.float64)
    x = cp.random.standard_normal(N)
    y = L.matvec(x)
    assert y.dtype == cp.float64
    np.testing.assert_allclose(cp.asnumpy(y), A @ cp.asnumpy(x), rtol=1e-5, atol=1e-5)
    z = x + 1j * cp.random.standard_normal(N)
    np.testing.assert_allclose(cp.asnumpy(L.matvec(z)), A @ cp.asnumpy(z), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_a_cpu_operator_is_refused(cp):
    with pytest.raises(ValueError, match="CUDA"):
        torchcurv.as_cupy_linear_operator(MatrixOperator(torch.eye(3)))


@pytest.mark.gpu
@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
def test_cupy_eigsh_matches_numpy_eigh(csla, cp, which):
    op, A, lam = _cuda_op()
    w, v = csla.eigsh(torchcurv.as_cupy_linear_operator(op), k=4, which=which, tol=1e-10)
    w, v = cp.asnumpy(w), cp.asnumpy(v)
    np.testing.assert_allclose(np.sort(w), expected(lam, 4, which), rtol=1e-7)
    np.testing.assert_allclose(A @ v, v * w, atol=1e-7)


@pytest.mark.gpu
def test_cupy_cg_minres_and_lobpcg_work_on_the_operator(csla, cp):
    op, A, lam = _cuda_op("conjugated")
    L = torchcurv.as_cupy_linear_operator(op)
    b = cp.random.standard_normal(N)
    for solver in (csla.cg, csla.minres):
        # CuPy 14 renamed tol to rtol, as SciPy 1.12 did
        name = "rtol" if "rtol" in inspect.signature(solver).parameters else "tol"
        x, info = solver(L, b, maxiter=2000, **{name: 1e-10})
        assert info == 0, solver.__name__
        np.testing.assert_allclose(A @ cp.asnumpy(x), cp.asnumpy(b), atol=1e-7)
    X = cp.random.standard_normal((N, 6))
    vals, _ = csla.lobpcg(L, X, largest=True, tol=1e-9, maxiter=500)
    np.testing.assert_allclose(np.sort(cp.asnumpy(vals))[-3:], lam[-3:], rtol=1e-6)


@pytest.mark.gpu
def test_cupy_eigsh_on_a_gpu_hessian_matches_the_explicit_hessian(csla, cp):
    model, crit, data = case("mlp_tanh", "ce")
    lam = np.linalg.eigvalsh(explicit_hessian(model, crit, data).numpy())
    H = HessianOperator(model.cuda(), crit, [(x.cuda(), y.cuda()) for x, y in data])
    w = csla.eigsh(torchcurv.as_cupy_linear_operator(H), k=3, which="LA", tol=1e-10,
                   return_eigenvectors=False)
    np.testing.assert_allclose(np.sort(cp.asnumpy(w)), lam[-3:], rtol=1e-7)


@pytest.mark.gpu
@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
@pytest.mark.parametrize("kind", ["conjugated", "indefinite", "clustered"])
def test_the_cupy_backend_meets_the_relative_tol(cp, kind, which):
    op, _, lam = _cuda_op(kind)
    tol = 1e-8
    r = torchcurv.eigsh(op, k=4, which=which, backend="cupy", tol=tol, seed=0)
    assert r.backend == "cupy" and r.all_converged, (r, r.info)
    assert r.eigenvectors.device.type == "cuda" and r.eigenvectors.dtype == torch.float64
    want = expected(lam, 4, which)
    assert (np.abs(r.eigenvalues.numpy() - want) <= tol * np.abs(want) + 1e-12).all()


@pytest.mark.gpu
def test_cupy_and_arpack_agree_on_a_gpu_hessian(cp):
    model, crit, data = case("mlp_tanh", "ce")
    H = HessianOperator(model.cuda(), crit, [(x.cuda(), y.cuda()) for x, y in data])
    table = torchcurv.compare_backends(H, k=3, backends=["arpack", "cupy"], tol=1e-8)
    assert table["cupy"].error is None, table["cupy"].error
    assert table["cupy"].eigenvalue_agreement < 1e-7


@pytest.mark.gpu
def test_a_cupy_matrix_becomes_an_operator_without_a_copy(cp):
    A, lam = known_matrix("diagonal", N)
    M = cp.asarray(A)
    op = torchcurv.from_linear_operator(M)
    assert op.device.type == "cuda" and op.matrix.data_ptr() == M.data.ptr
    r = torchcurv.eigsh(op, k=2, backend="cupy", tol=1e-9)
    np.testing.assert_allclose(r.eigenvalues.numpy(), lam[-2:], rtol=1e-9)
