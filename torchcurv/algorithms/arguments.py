"""Argument checks shared by the eigensolvers, so every backend rejects bad input alike."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from torchcurv.errors import MissingExtraError

WHICH = ("LA", "SA", "LM", "BE")


def check_k(k: int, n: int) -> int:
    """``1 <= k < n`` as for ``scipy.sparse.linalg.eigsh``."""
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= k < n:
        raise ValueError(f"k must satisfy 1 <= k < n = {n}, got k={k}")
    return k


def check_which(which: str, allowed: tuple[str, ...] = WHICH) -> str:
    if which not in allowed:
        raise ValueError(f"which must be one of {allowed}, got {which!r}")
    return which


def check_tol(tol: float, dtype: torch.dtype) -> float:
    """Relative tolerance; ``0`` means machine precision of ``dtype`` (scipy's convention)."""
    tol = float(tol)
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    return tol if tol > 0 else float(torch.finfo(dtype).eps)


def check_maxiter(maxiter: int | None, default: int) -> int:
    if maxiter is None:
        return default
    if isinstance(maxiter, bool) or not isinstance(maxiter, int) or maxiter < 1:
        raise ValueError(f"maxiter must be a positive int or None, got {maxiter!r}")
    return maxiter


def check_start(v0: torch.Tensor, n: int, columns: int) -> torch.Tensor:
    """A caller's start vector/block as ``(n, columns)`` float64 on the CPU."""
    if not isinstance(v0, torch.Tensor):
        raise TypeError(f"v0 must be a torch tensor, got {type(v0).__name__}")
    block = v0.reshape(n, 1) if v0.ndim == 1 and v0.shape[0] == n else v0
    if block.shape != (n, columns):
        expected = f"({n},) or ({n}, 1)" if columns == 1 else f"({n}, {columns})"
        raise ValueError(f"v0 must have shape {expected}, got {tuple(v0.shape)}")
    if not torch.isfinite(block).all():
        raise ValueError("v0 contains NaN or inf")
    return block.detach().to("cpu", torch.float64)


def progress_bar(enabled: bool, total: int, desc: str):
    """A tqdm bar when ``enabled`` (tqdm is optional), else ``None``."""
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError as err:
        raise MissingExtraError("tqdm", "progress", "progress=True") from err
    return tqdm(total=total, desc=desc, leave=False)


def check_callback(callback: Callable | None) -> None:
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable, got {type(callback).__name__}")


def synchronized_clock(device: torch.device) -> float:
    """``time.perf_counter()`` after the device's queued work has finished."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
