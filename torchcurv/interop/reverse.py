"""The reverse direction: foreign matrices and operators as torchcurv operators.

So torchcurv's torch algorithms run on anything square and symmetric: explicit matrices
with known spectra in tests, scipy operators, CuPy arrays, curvlinops operators.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as sla
import torch

from torchcurv.interop.scipy import tensor_to_numpy
from torchcurv.operators.base import LinearOperator
from torchcurv.operators.matrix import MatrixOperator

_NUMPY_TO_TORCH = {
    np.dtype(np.float16): torch.float16,
    np.dtype(np.float32): torch.float32,
    np.dtype(np.float64): torch.float64,
}


class ScipyBackedOperator(LinearOperator):
    """A ``scipy.sparse.linalg.LinearOperator`` (or sparse matrix) as a torchcurv operator.

    Each product moves the ``(n, m)`` block to the host, calls the scipy operator's
    ``matmat`` once, and moves the result to this operator's device and dtype. The
    scipy operator is assumed symmetric (torchcurv's contract); nothing checks it.

    Attributes:
        source: the scipy operator.
    """

    def __init__(self, source: sla.LinearOperator, dtype: torch.dtype, device: torch.device):
        super().__init__(source.shape[0], dtype, device)
        self.source = source

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        Y = np.asarray(self.source.matmat(tensor_to_numpy(V)))
        return torch.from_numpy(np.ascontiguousarray(Y)).to(self.device, self.dtype)


class CurvlinopsBackedOperator(LinearOperator):
    """A curvlinops ``PyTorchLinearOperator`` as a torchcurv operator.

    Products are curvlinops' own ``A @ V`` on its device (one call per block), with
    conversion to this operator's dtype/device when they differ from curvlinops'.

    Attributes:
        source: the curvlinops operator.
    """

    def __init__(self, source: Any, dtype: torch.dtype, device: torch.device):
        super().__init__(source.shape[0], dtype, device)
        self.source = source

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        V = V.to(self.source.device, self.source.dtype)
        return (self.source @ V).detach().to(self.device, self.dtype)


def _is_curvlinops_operator(A: Any) -> bool:
    return any(c.__module__.split(".")[0] == "curvlinops" for c in type(A).__mro__) and hasattr(
        A, "to_scipy"
    )


def _floating(dtype: torch.dtype) -> torch.dtype:
    if dtype.is_complex:
        raise TypeError(f"torchcurv operators are real symmetric; got a {dtype} matrix")
    return dtype if dtype.is_floating_point else torch.float64


def _check_square(shape: tuple, what: str) -> None:
    if len(shape) != 2 or shape[0] != shape[1]:
        raise ValueError(
            f"torchcurv operators are square (and symmetric); the {what} has shape "
            f"{tuple(shape)}"
        )


def from_linear_operator(
    A: Any,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> LinearOperator:
    """Wrap a square symmetric matrix or operator as a torchcurv :class:`LinearOperator`.

    Accepted, with the default dtype and device of the result:

    - a torchcurv ``LinearOperator``: returned as it is (``dtype``/``device`` must then
      be ``None`` or equal to the operator's);
    - a torch tensor ``(n, n)``: a :class:`MatrixOperator` of its dtype on its device;
    - a NumPy array ``(n, n)``: its float dtype (integers become float64), on the CPU;
    - a CuPy (or any DLPack-exporting) array ``(n, n)``: shared zero-copy with torch,
      on its device, in its dtype;
    - a scipy sparse matrix or ``scipy.sparse.linalg.LinearOperator``: products run
      on the host through its ``matmat``; float32 stays float32, anything else
      becomes float64; on the CPU;
    - a curvlinops operator (``HessianLinearOperator``, ``GGNLinearOperator``, ...):
      products by curvlinops' ``A @ V``; its dtype and device.

    Matrices are checked for symmetry (:class:`MatrixOperator`); operators are assumed
    symmetric.

    Args:
        A: the matrix or operator.
        dtype: dtype of the torch vectors the result takes (default above).
        device: device of the torch vectors the result takes (default above).

    Raises:
        ValueError: ``A`` is not square, or (matrices) not symmetric.
        TypeError: ``A`` is of no kind above, or complex.
    """
    if isinstance(A, LinearOperator):
        if (dtype is not None and dtype != A.dtype) or (
            device is not None and torch.device(device) != A.device
        ):
            raise ValueError(
                f"A is already a torchcurv operator ({A.dtype}, {A.device}); it cannot be "
                f"converted to dtype={dtype}, device={device}"
            )
        return A
    if isinstance(A, torch.Tensor):
        _check_square(tuple(A.shape), "tensor")
        return MatrixOperator(A.detach().to(device or A.device, dtype or _floating(A.dtype)))
    if isinstance(A, np.ndarray):
        _check_square(A.shape, "array")
        if np.iscomplexobj(A):
            raise TypeError(f"torchcurv operators are real symmetric; got a {A.dtype} array")
        T = torch.from_numpy(np.array(A, dtype=A.dtype if A.dtype in _NUMPY_TO_TORCH else
                                      np.float64, order="C"))
        return MatrixOperator(T.to(device or "cpu", dtype or T.dtype))
    if sp.issparse(A) or isinstance(A, sla.LinearOperator):
        _check_square(A.shape, "scipy operator")
        if A.dtype is not None and np.dtype(A.dtype).kind == "c":
            raise TypeError(f"torchcurv operators are real symmetric; got dtype {A.dtype}")
        source = sla.aslinearoperator(A) if sp.issparse(A) else A
        default = torch.float32 if np.dtype(A.dtype) == np.float32 else torch.float64
        return ScipyBackedOperator(source, dtype or default, torch.device(device or "cpu"))
    if _is_curvlinops_operator(A):
        _check_square(tuple(A.shape), "curvlinops operator")
        if not getattr(A, "SELF_ADJOINT", True):
            raise ValueError(
                f"{type(A).__name__} is not self-adjoint; torchcurv operators are symmetric"
            )
        return CurvlinopsBackedOperator(A, dtype or A.dtype, torch.device(device or A.device))
    if hasattr(A, "__dlpack__") and hasattr(A, "shape"):
        T = torch.from_dlpack(A)
        _check_square(tuple(T.shape), f"{type(A).__name__} array")
        return MatrixOperator(T.to(device or T.device, dtype or _floating(T.dtype)))
    raise TypeError(
        f"cannot make a torchcurv operator from {type(A).__name__}: pass a square matrix "
        "(torch, NumPy, CuPy, scipy sparse), a scipy LinearOperator or a curvlinops operator"
    )
