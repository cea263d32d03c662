"""Argument checks shared by the eigensolvers, so every backend rejects bad input alike."""

from __future__ import annotations

import contextlib
import math
import numbers
import time
from collections.abc import Callable, Iterator
from typing import Any, Literal, get_args

import numpy as np
import torch

from torchcurv.errors import MissingExtraError, OperatorInputError

Which = Literal["LA", "SA", "LM", "SM", "BE"]
"""scipy's names: largest/smallest algebraic, largest/smallest magnitude, both ends."""

WHICH: tuple[Which, ...] = get_args(Which)
"""Every ``which`` an eigensolver may be asked for; each backend serves a subset
(:data:`torchcurv.algorithms.eigsh.BACKENDS`)."""


def as_tensor(x: Any) -> torch.Tensor:
    """A torch view of a NumPy array, a DLPack array (CuPy) or a tensor."""
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    return torch.from_dlpack(x)


def check_k(k: int, n: int) -> int:
    """``1 <= k < n`` as for ``scipy.sparse.linalg.eigsh``."""
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= k < n:
        raise ValueError(
            f"k={k} eigenpairs of an n={n} operator: need 1 <= k < n (ARPACK and Lanczos "
            "need k < n; for all n eigenpairs use torch.linalg.eigh(op.to_dense()))"
        )
    return k


def check_which(which: str, allowed: tuple[str, ...] = WHICH, who: str | None = None) -> Which:
    """``which`` if it is one of ``allowed`` (a backend's subset of :data:`WHICH`)."""
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}")
    if which not in allowed:
        raise ValueError(f"{who or 'this solver'} finds which in {allowed}, not {which!r}")
    return which


def check_tol(tol: float, dtype: torch.dtype) -> float:
    """The relative tolerance ``tol >= 0``; ``0`` means the machine precision of ``dtype``
    (scipy's convention), the precision the solve works in."""
    if (isinstance(tol, bool) or not isinstance(tol, numbers.Real)
            or not math.isfinite(tol) or tol < 0):
        raise ValueError(
            f"tol must be a finite relative tolerance >= 0 (0: machine precision), got {tol!r}"
        )
    return float(tol) if tol > 0 else float(torch.finfo(dtype).eps)


def check_maxiter(maxiter: int | None, default: int) -> int:
    if maxiter is None:
        return default
    if isinstance(maxiter, bool) or not isinstance(maxiter, int) or maxiter < 1:
        raise ValueError(f"maxiter must be a positive int or None, got {maxiter!r}")
    return maxiter


def check_seed(seed: int | None) -> int | None:
    """``None`` or an int (a float or a bool seed is a mistake, not a seed)."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be None or an int, got {seed!r}")
    return seed


def check_start(v0: Any, n: int, columns: int, name: str = "v0") -> torch.Tensor:
    """A caller's start vector/block (torch, NumPy or CuPy) as ``(n, columns)`` float64.

    The one check of start vectors, so every backend refuses the same ones: a wrong
    shape, complex or non-finite entries, and an all-zero column (the Krylov space it
    spans is ``{0}``; ARPACK refuses it). Returned on its own device.
    """
    if not isinstance(v0, (torch.Tensor, np.ndarray)) and not hasattr(v0, "__dlpack__"):
        raise TypeError(
            f"{name} must be a torch tensor or a NumPy/CuPy array, got {type(v0).__name__}"
        )
    t = as_tensor(v0)
    block = t.reshape(n, 1) if t.ndim == 1 and t.shape[0] == n else t
    if tuple(block.shape) != (n, columns):
        expected = f"({n},) or ({n}, 1)" if columns == 1 else f"({n}, {columns})"
        raise OperatorInputError(
            f"{name} has shape {tuple(t.shape)}; {name} must have shape {expected}"
        )
    if block.is_complex() or block.dtype == torch.bool:
        raise OperatorInputError(f"{name} must be real numbers, got dtype {block.dtype}")
    block = block.detach().to(torch.float64)
    if not bool(torch.isfinite(block).all()):
        raise OperatorInputError(f"{name} contains NaN or inf")
    zero = (block == 0).all(dim=0).nonzero().flatten().tolist()
    if zero:
        which = "is the zero vector" if columns == 1 else f"has all-zero column(s) {zero}"
        raise OperatorInputError(
            f"{name} {which}: an iteration started from it never leaves 0; pass a nonzero "
            f"start vector, or {name}=None for a random one drawn from seed"
        )
    return block


def tqdm_bar(total: int, desc: str, **options: Any) -> Any:
    """A tqdm bar (tqdm is optional: :class:`MissingExtraError` names the extra)."""
    try:
        from tqdm.auto import tqdm
    except ImportError as err:
        raise MissingExtraError("tqdm", "progress", "progress=True") from err
    return tqdm(total=total, desc=desc, **options)


@contextlib.contextmanager
def progress_bar(enabled: bool, total: int, desc: str) -> Iterator[Any]:
    """A tqdm bar when ``enabled``, else ``None``; closed however the block ends (also by
    a callback's exception or KeyboardInterrupt), so no bar is left on the terminal."""
    bar = tqdm_bar(total, desc, leave=False) if enabled else None
    try:
        yield bar
    finally:
        if bar is not None:
            bar.close()


def check_callback(callback: Callable | None) -> None:
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable, got {type(callback).__name__}")


def synchronized_clock(device: torch.device) -> float:
    """``time.perf_counter()`` after the device's queued work has finished."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
