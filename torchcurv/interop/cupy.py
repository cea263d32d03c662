"""torchcurv operators as ``cupyx.scipy.sparse.linalg.LinearOperator``, zero-copy.

Vectors cross between CuPy and torch by DLPack: the torch operator reads the very
device memory CuPy's solver wrote, and CuPy receives the tensor the operator returned,
with no host round trip. The torch work runs on CuPy's current stream, so neither side
has to wait for the other. CuPy is optional; it is imported only when used.
"""

from __future__ import annotations

import contextlib
import functools
from types import ModuleType
from typing import Any

import numpy as np
import torch

from torchcurv.errors import MissingExtraError, OperatorInputError
from torchcurv.operators.base import LinearOperator, _same_device
from torchcurv.operators.counting import ProductCounter

_SOLVER_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_TORCH_DTYPE: dict[np.dtype, torch.dtype] = {
    np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}


def import_cupy(what: str) -> tuple[ModuleType, ModuleType]:
    """``(cupy, cupyx.scipy.sparse.linalg)``, or :class:`MissingExtraError` naming ``what``."""
    try:
        import cupy
        import cupyx.scipy.sparse.linalg as csla
    except ImportError as e:
        raise MissingExtraError("cupy", "gpu", what) from e
    return cupy, csla


@contextlib.contextmanager
def _torch_on_stream(stream_ptr: int, device: torch.device):
    """Run torch work on the CUDA stream ``stream_ptr`` (CuPy's current stream)."""
    if torch.cuda.current_stream(device).cuda_stream == stream_ptr:
        yield
        return
    with torch.cuda.stream(torch.cuda.ExternalStream(stream_ptr, device=device)):
        yield


@functools.cache
def _adapter_class() -> type:
    # The class derives from CuPy's LinearOperator, so it can only exist once CuPy is
    # importable; it is built on first use and then reused.
    cupy, csla = import_cupy("as_cupy_linear_operator")

    # CuPy is untyped: its LinearOperator is an Any base class
    base: Any = csla.LinearOperator

    class CupyLinearOperator(base, ProductCounter):
        """A torchcurv operator seen by ``cupyx.scipy.sparse.linalg``.

        Attributes:
            operator: the wrapped torch operator (on a CUDA device).
            num_matvecs: vectors multiplied through this adapter (a block of ``m``
                counts ``m``, a complex vector 2).
            num_calls: product calls through this adapter.
        """

        def __init__(self, operator: LinearOperator, dtype: np.dtype) -> None:
            super().__init__(dtype=dtype, shape=operator.shape)
            self.operator = operator

        def _matmat(self, X):
            out_dtype = cupy.result_type(self.dtype, X.dtype)
            if X.dtype.kind == "c":
                m = X.shape[1]
                Y = self._real_product(cupy.concatenate([X.real, X.imag], axis=1))
                return (Y[:, :m] + 1j * Y[:, m:]).astype(out_dtype, copy=False)
            return self._real_product(X).astype(out_dtype, copy=False)

        def _matvec(self, x):
            return self._matmat(x.reshape(-1, 1))

        _rmatvec = _matvec
        _rmatmat = _matmat

        def _adjoint(self):
            return self

        def _transpose(self):
            return self

        def _real_product(self, X):
            op = self.operator
            if not _same_device(torch.device("cuda", X.device.id), op.device):
                raise OperatorInputError(
                    f"CuPy array is on cuda:{X.device.id}, the operator on {op.device}"
                )
            with _torch_on_stream(cupy.cuda.get_current_stream().ptr, op.device):
                V = torch.from_dlpack(X)
                if V.dtype != op.dtype:
                    V = V.to(op.dtype)
                Y = op.matmat(V).detach()
                result_dtype = _TORCH_DTYPE[np.dtype(self.dtype)]
                if Y.dtype != result_dtype:
                    Y = Y.to(result_dtype)
                out = cupy.from_dlpack(Y)
            self._count(X.shape[1])
            return out

    return CupyLinearOperator


def as_cupy_linear_operator(op: LinearOperator, dtype: np.dtype | type | str | None = None):
    """Wrap a torchcurv operator on a CUDA device as a CuPy ``LinearOperator``.

    Args:
        op: a torchcurv operator whose device is a CUDA device.
        dtype: the CuPy-side dtype, float32 or float64. Default: the operator's dtype
            when it is one of those (then vectors are shared, never copied), float32
            for half-precision operators (CuPy's solvers need f/d). With another dtype
            each product converts on the device (one cast each way).

    Returns:
        A ``cupyx.scipy.sparse.linalg.LinearOperator`` of shape ``(n, n)`` with an
        explicit dtype (CuPy would otherwise probe it with a product), whose
        ``matvec``/``matmat`` hand CuPy arrays to ``op`` and back through DLPack on the
        same device and stream.

    Raises:
        MissingExtraError: CuPy is not installed (``pip install 'torchcurv[gpu]'``).
    """
    import_cupy("as_cupy_linear_operator")
    if not isinstance(op, LinearOperator):
        raise TypeError(
            f"as_cupy_linear_operator wraps a torchcurv LinearOperator, got "
            f"{type(op).__name__}; wrap other objects with torchcurv.from_linear_operator"
        )
    if op.device.type != "cuda":
        raise ValueError(
            f"the operator is on {op.device}; CuPy needs a CUDA operator (move the model "
            "and data to the GPU, or use torchcurv.as_linear_operator for CPU solvers)"
        )
    if dtype is None:
        by_torch: dict[torch.dtype, np.dtype] = {v: k for k, v in _TORCH_DTYPE.items()}
        dtype = by_torch.get(op.dtype, np.dtype(np.float32))
    dtype = np.dtype(dtype)
    if dtype not in _SOLVER_DTYPES:
        raise ValueError(f"dtype must be float32 or float64 (what CuPy's solvers use), got {dtype}")
    return _adapter_class()(op, dtype)
