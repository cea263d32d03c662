"""Resumable thick-restart Lanczos: the restart state on disk, written atomically.

After each thick restart the driver's whole state is small beside the work it
summarises: the ``kept + p`` leading basis rows (the rest are rewritten before they are
read), the projected matrix ``T``, the running ``||A||`` bound of the breakdown test, the
random generator (breakdown replacements), the counters (restarts, products so far,
failed checks, check products) and the convergence history. With all of it restored, the
next cycle does exactly what the uninterrupted run did next, so a resumed solve returns
the uninterrupted run's eigenvalues (bit-identical on the CPU for a deterministic
operator) and spends only the products that run had left.

File format: one ``torch.save`` of plain types and CPU tensors, read back with
``torch.load(weights_only=True)`` (no pickled code is ever executed). Writes go to a
temporary file in the checkpoint's directory followed by ``os.replace``, so an
interruption at any moment leaves either the previous checkpoint or the new one, never a
torn file. Cost per restart: writing ``(kept + p) * n`` basis entries.

A checkpoint belongs to one solve: the arguments that determine the iteration (backend,
``n``, ``k``, ``which``, ``tol``, ``ncv``, block size, the operator's class and dtype, the
basis dtype, a digest of the start vector, i.e. of ``seed`` or ``v0``) are saved with it
and a resume with any of them different is refused. ``maxiter`` may differ (it bounds the
total restarts, those before the interruption included), as may the devices. A solve
that finishes deletes its checkpoint, so a finished solve is never resumed by another.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

FORMAT = "torchcurv-lanczos-checkpoint"
VERSION = 1


def start_digest(start: torch.Tensor) -> str:
    """SHA-256 of the float64 start block: names ``seed``/``v0`` without storing it."""
    data = start.detach().to("cpu", torch.float64).contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()


def solve_arguments(op: Any, *, backend: str, k: int, which: str, tol: float, ncv: int,
                    block_size: int, basis_dtype: torch.dtype,
                    start: torch.Tensor) -> dict[str, Any]:
    """The arguments a checkpoint must match to be resumed (see the module notes)."""
    return {
        "backend": backend, "n": int(op.n), "k": int(k), "which": str(which),
        "tol": float(tol), "ncv": int(ncv), "block_size": int(block_size),
        "operator": f"{type(op).__module__}.{type(op).__qualname__}",
        "dtype": str(op.dtype), "basis_dtype": str(basis_dtype),
        "start vector (seed or v0)": start_digest(start),
    }


def check_checkpoint_path(checkpoint: str | os.PathLike | None) -> Path | None:
    """``checkpoint`` as a ``Path`` whose directory exists (``None`` passes through)."""
    if checkpoint is None:
        return None
    if not isinstance(checkpoint, (str, os.PathLike)):
        raise TypeError(f"checkpoint must be a path (str or os.PathLike), got "
                        f"{type(checkpoint).__name__}")
    path = Path(checkpoint)
    if path.is_dir():
        raise ValueError(f"checkpoint={str(path)!r} is a directory; pass a file path")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"checkpoint={str(path)!r}: directory {str(path.parent)!r} "
                                "does not exist")
    return path


def load_checkpoint(path: Path, arguments: dict[str, Any]) -> dict[str, Any] | None:
    """The saved state at ``path`` if it exists (``None`` otherwise), after checking it is
    a checkpoint of a solve with exactly these ``arguments``."""
    if not path.exists():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unreadable file: say which and what to do
        raise ValueError(f"checkpoint {str(path)!r} exists but cannot be read as a torchcurv "
                         f"checkpoint ({type(err).__name__}: {err}); delete it or pass "
                         "another path") from err
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not a torchcurv Lanczos checkpoint; delete it "
                         "or pass another path")
    if saved.get("version") != VERSION:
        raise ValueError(f"checkpoint {str(path)!r} has format version "
                         f"{saved.get('version')!r}, this torchcurv reads {VERSION}")
    differ = [f"{name}: saved {saved['arguments'].get(name)!r}, asked {value!r}"
              for name, value in arguments.items() if saved["arguments"].get(name) != value]
    if differ:
        raise ValueError(f"checkpoint {str(path)!r} belongs to another solve ("
                         + "; ".join(differ) + "); pass the same arguments to resume it, "
                         "or delete it (or pass another path) to start afresh")
    return saved["state"]


def save_checkpoint(path: Path, arguments: dict[str, Any], state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically: a temporary file in the same directory,
    flushed to disk, then ``os.replace`` (an interruption leaves the old file intact)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, "version": VERSION, "arguments": arguments,
                        "state": state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cpu_copy(t: torch.Tensor) -> torch.Tensor:
    """A CPU tensor owning exactly ``t``'s elements (``torch.save`` of a view writes its
    whole storage, i.e. the whole basis)."""
    return torch.empty(t.shape, dtype=t.dtype).copy_(t)
