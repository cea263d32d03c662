"""from_linear_operator: matrices and foreign operators become torchcurv operators."""

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as sla
import torch
from spectra import known_matrix
from zoo import case

import torchcurv
from torchcurv import HessianOperator, LinearOperator, MatrixOperator, from_linear_operator
from torchcurv.interop.reverse import CurvlinopsBackedOperator, ScipyBackedOperator

N = 30


@pytest.fixture
def matrix():
    return known_matrix("conjugated", N)[0]


def _block(dtype=torch.float64, m=3):
    return torch.randn(N, m, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(
        dtype)


def test_numpy_matrix_keeps_its_float_dtype_on_the_cpu(matrix):
    A = matrix
    op = from_linear_operator(A)
    assert isinstance(op, MatrixOperator) and op.dtype == torch.float64
    assert op.device == torch.device("cpu")
    assert from_linear_operator(A.astype(np.float32)).dtype == torch.float32
    assert from_linear_operator(np.eye(4, dtype=np.int64)).dtype == torch.float64
    torch.testing.assert_close(op.matmat(_block()), torch.tensor(A) @ _block())


def test_torch_matrix_keeps_dtype_and_device_unless_asked(matrix):
    A = matrix
    T = torch.tensor(A, dtype=torch.float32)
    assert from_linear_operator(T).dtype == torch.float32
    assert from_linear_operator(T, dtype=torch.float64).dtype == torch.float64


def test_a_torchcurv_operator_is_returned_as_it_is(matrix):
    A = matrix
    op = MatrixOperator(torch.tensor(A))
    assert from_linear_operator(op) is op
    with pytest.raises(ValueError, match="cannot be converted"):
        from_linear_operator(op, dtype=torch.float32)


def test_scipy_operator_products_are_one_host_matmat_per_block(matrix):
    A = matrix
    calls = []

    def matmat(X):
        calls.append(X.shape)
        return A @ X

    S = sla.LinearOperator((N, N), matvec=lambda x: A @ x, matmat=matmat, dtype=np.float64)
    op = from_linear_operator(S)
    assert isinstance(op, ScipyBackedOperator) and isinstance(op, LinearOperator)
    assert op.dtype == torch.float64 and op.device == torch.device("cpu")
    torch.testing.assert_close(op.matmat(_block(m=4)), torch.tensor(A) @ _block(m=4))
    assert calls == [(N, 4)]
    torch.testing.assert_close(op.matvec(_block()[:, 0]), torch.tensor(A) @ _block()[:, 0])


def test_scipy_float32_operator_stays_float32_and_dtype_can_be_chosen(matrix):
    A = matrix
    S = sla.aslinearoperator(A.astype(np.float32))
    assert from_linear_operator(S).dtype == torch.float32
    op = from_linear_operator(S, dtype=torch.float64)
    assert op.matvec(_block()[:, 0]).dtype == torch.float64


def test_scipy_sparse_matrix_is_accepted(matrix):
    A = matrix
    op = from_linear_operator(sp.csr_matrix(A))
    torch.testing.assert_close(op.matmat(_block()), torch.tensor(A) @ _block())


def test_torch_algorithms_see_the_scipy_operators_spectrum():
    A, lam = known_matrix("indefinite", N)
    r = torchcurv.eigsh(sla.aslinearoperator(A), k=3, which="SA", tol=1e-10)
    np.testing.assert_allclose(r.eigenvalues.numpy(), lam[:3], rtol=1e-8)


def test_curvlinops_hessian_gives_the_same_products_as_torchcurvs():
    curvlinops = pytest.importorskip("curvlinops")
    model, crit, data = case("mlp_tanh", "ce")
    params = [p for p in model.parameters()]
    C = curvlinops.HessianLinearOperator(model, crit, params, data, check_deterministic=False)
    op = from_linear_operator(C)
    assert isinstance(op, CurvlinopsBackedOperator)
    assert op.dtype == torch.float64 and op.n == sum(p.numel() for p in params)
    H = HessianOperator(model, crit, data)
    V = torch.randn(op.n, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(op.matmat(V), H.matmat(V), rtol=1e-10, atol=1e-12)


def test_non_square_non_symmetric_complex_and_unknown_inputs_are_refused():
    with pytest.raises(ValueError, match="square"):
        from_linear_operator(np.ones((3, 4)))
    with pytest.raises(ValueError, match="square"):
        from_linear_operator(sla.aslinearoperator(np.ones((3, 4))))
    with pytest.raises(ValueError, match="square"):
        from_linear_operator(torch.ones(3))
    with pytest.raises(ValueError, match="not symmetric"):
        from_linear_operator(np.triu(np.ones((3, 3))))
    with pytest.raises(TypeError, match="real symmetric"):
        from_linear_operator(np.eye(3) * 1j)
    with pytest.raises(TypeError, match="cannot make a torchcurv operator"):
        from_linear_operator([[1.0, 0.0], [0.0, 1.0]])
