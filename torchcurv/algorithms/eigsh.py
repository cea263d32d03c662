"""``torchcurv.eigsh``: one front door to every eigensolver backend.

Backends are functions ``fn(op, *, k, which, tol, maxiter, seed, return_eigenvectors,
**options) -> EigshResult`` listed by module path in :data:`BACKENDS` and imported on
first use, so a backend whose module (or optional dependency) is absent costs nothing
until asked for, and asking for it gives an error that lists what is available.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from torchcurv.algorithms.arguments import (
    WHICH,
    Which,
    check_k,
    check_maxiter,
    check_seed,
    check_tol,
    check_which,
)
from torchcurv.algorithms.result import EigshResult
from torchcurv.distributed.reduce import reports_failures
from torchcurv.interop.reverse import from_linear_operator
from torchcurv.operators.base import LinearOperator

EigshBackend = Literal["arpack", "lobpcg", "cupy", "lanczos", "block", "power"]

KRYLOV_WHICH: tuple[Which, ...] = ("LA", "SA", "LM", "BE")
"""What the torch Lanczos backends find: smallest magnitude ('SM') is interior, which
Krylov methods reach only through shift-invert."""

POWER_WHICH: tuple[Which, ...] = ("LM",)
"""Power iteration converges to the largest magnitude only."""

SHARED_ARGUMENTS = ("k", "which", "tol", "maxiter", "seed", "return_eigenvectors")
"""Arguments of every backend, set by :func:`eigsh` itself, never as backend options."""

CHECKPOINT_BACKENDS = ("lanczos", "block")
"""The backends whose solves resume from ``checkpoint=`` (the torch thick-restart
Lanczos: their whole restart state is in torchcurv's hands, not a library's)."""


@dataclass(frozen=True)
class Backend:
    """Where a backend lives and which ``which`` it serves (the built-in backends' own
    checks read it; ``None``: a plugged-in backend that checks itself)."""

    module: str
    function: str
    which: tuple[Which, ...] | None
    summary: str


BACKENDS: dict[str, Backend] = {
    "arpack": Backend("torchcurv.algorithms.arpack", "arpack_eigsh", WHICH,
                      "scipy ARPACK on the host, one vector per product"),
    "lobpcg": Backend("torchcurv.algorithms.scipy_lobpcg", "lobpcg_eigsh", ("LA", "SA"),
                      "scipy LOBPCG on the host, block products"),
    "cupy": Backend("torchcurv.algorithms.cupy_lanczos", "cupy_eigsh", ("LA", "SA", "LM"),
                    "CuPy thick-restart Lanczos on the GPU, zero-copy"),
    "lanczos": Backend("torchcurv.algorithms.lanczos", "lanczos_eigsh", KRYLOV_WHICH,
                       "torch restarted Lanczos on the operator's device"),
    "block": Backend("torchcurv.algorithms.block", "block_eigsh", KRYLOV_WHICH,
                     "torch block Krylov on the operator's device"),
    "power": Backend("torchcurv.algorithms.power", "power_eigsh", POWER_WHICH,
                     "torch power iteration on the operator's device"),
}


def available_backends() -> list[str]:
    """Names of the backends whose module exists in this installation.

    A listed backend may still need an optional package at call time ("cupy" needs
    CuPy and a CUDA operator).
    """
    return [name for name, b in BACKENDS.items() if importlib.util.find_spec(b.module)]


def backend_function(name: str) -> Callable[..., EigshResult]:
    """The function implementing backend ``name``, imported now."""
    spec = BACKENDS.get(name)
    available = ", ".join(available_backends())
    if spec is None:
        raise ValueError(f"unknown eigsh backend {name!r}; available: {available}")
    if importlib.util.find_spec(spec.module) is None:
        raise ValueError(
            f"eigsh backend {name!r} is not part of this installation (no module "
            f"{spec.module}); available: {available}"
        )
    return getattr(importlib.import_module(spec.module), spec.function)


@reports_failures
def eigsh(
    op: Any,
    k: int = 6,
    which: Which | None = None,
    backend: EigshBackend = "arpack",
    tol: float = 1e-6,
    maxiter: int | None = None,
    seed: int | None = None,
    return_eigenvectors: bool = True,
    sigma: float | None = None,
    **backend_options: Any,
) -> EigshResult:
    """``k`` eigenpairs of a symmetric operator, by the backend of your choice.

    Args:
        op: a torchcurv operator, or anything :func:`torchcurv.from_linear_operator`
            accepts (a matrix, a scipy or curvlinops operator).
        k: number of eigenpairs, ``1 <= k < n``.
        which: 'LA' largest algebraic (default: the top of a Hessian's spectrum),
            'SA' smallest algebraic, 'LM'/'SM' largest/smallest magnitude, 'BE' half
            from each end. Backends serve subsets (:data:`BACKENDS`): arpack all;
            lanczos and block all but SM; cupy LA, SA, LM; lobpcg LA, SA; power LM.
            Default 'LA', and 'LM' with ``sigma``.
        backend: "arpack" (default), "lobpcg", "cupy", or the torch backends
            "lanczos", "block", "power" where installed (:func:`available_backends`).
        tol: relative residual asked for, ``||A v - lambda v|| <= tol * |lambda|``; the
            result's ``converged`` flags check exactly this after the solve. ``0`` means
            machine precision (scipy's convention) of the precision the solve works in:
            the operator's dtype (or a coarser ``basis_dtype``); ``result.tol`` is the
            number used.
        maxiter: the backend's iteration limit (its own default when ``None``).
        seed: seed of the random start vector(s); the same seed gives the same run.
            ``None`` means 0 for every backend, so the start is the same on every rank
            of a distributed operator without any communication.
        return_eigenvectors: ``False`` returns eigenvalues only; residuals NaN except for
            the torch Lanczos backends (``lanczos``, ``block``), whose convergence check
            computes the true residuals anyway, one vector at a time.
        sigma: shift-invert: the eigenvalues nearest ``sigma`` (``which='LM'``), through
            inner MINRES solves of ``A - sigma I``; ``which`` then refers to
            ``1 / (lambda - sigma)`` as in scipy's sigma mode; backends arpack, lanczos,
            block; options ``solve_tol``, ``solve_maxiter``
            (:func:`~torchcurv.algorithms.shift_invert.shift_invert_eigsh`).
        **backend_options: passed to the backend (e.g. ``ncv``, ``v0`` for arpack;
            ``block_size`` for lobpcg); unknown names are an error. ``checkpoint=PATH``
            (lanczos, block): write the restart state to ``PATH`` after every restart
            and resume from it if it exists
            (:func:`~torchcurv.algorithms.lanczos.lanczos_eigsh`).

    Returns:
        :class:`~torchcurv.algorithms.result.EigshResult` with eigenvalues ascending
        (scipy's order) for every backend and every ``which``.

    Backends grown from one start vector (arpack, cupy) see one direction per distinct
    eigenvalue, so an exactly repeated eigenvalue may be returned fewer times than its
    multiplicity (its place taken by the next eigenvalue; every pair returned is still
    a true eigenpair). Block backends (lobpcg) do not have this limitation.

    Raises:
        ValueError: bad ``k``/``which``/``tol``/``maxiter``/``backend``, a ``which`` the
            backend does not serve, or ``sigma=`` with another backend.
        TypeError: an option the backend does not take.
    """
    if not isinstance(op, LinearOperator):
        op = from_linear_operator(op)
    fn = backend_function(backend)
    which = ("LA" if sigma is None else "LM") if which is None else which
    check_arguments(op, k, which, tol, maxiter, seed)
    if backend_options.get("checkpoint") is not None and (
            backend not in CHECKPOINT_BACKENDS or sigma is not None):
        raise ValueError(
            f"checkpoint= resumes solves of the backends {', '.join(CHECKPOINT_BACKENDS)} "
            f"without sigma; got backend={backend!r}"
            + ("" if sigma is None else f" with sigma={sigma!r}")
        )
    if sigma is not None:
        from torchcurv.algorithms.shift_invert import shift_invert_eigsh

        return shift_invert_eigsh(
            op, sigma=sigma, backend=backend, k=k, which=which, tol=tol, maxiter=maxiter,
            seed=seed, return_eigenvectors=return_eigenvectors, **backend_options)
    check_backend_serves(backend, which)
    check_backend_options(backend, backend_options)
    return fn(op, k=k, which=which, tol=tol, maxiter=maxiter, seed=seed,
              return_eigenvectors=return_eigenvectors, **backend_options)


def check_arguments(
    op: LinearOperator, k: int, which: str, tol: float, maxiter: int | None, seed: int | None
) -> None:
    """Raise a clear error for arguments no backend could accept (the checks of
    :mod:`~torchcurv.algorithms.arguments`, which every backend also runs)."""
    check_k(k, op.n)
    check_which(which)
    check_tol(tol, op.dtype)
    check_maxiter(maxiter, 1)
    check_seed(seed)


def check_backend_serves(backend: str, which: str) -> Which:
    """``which`` if backend ``backend`` finds it, else an error naming the ones that do
    (the check every backend runs, also when called directly)."""
    which = check_which(which)
    served = BACKENDS[backend].which
    if served is not None and which not in served:
        others = [b for b, s in BACKENDS.items() if s.which and which in s.which]
        raise ValueError(
            f"backend {backend!r} finds which in {served}, not {which!r}; "
            f"backends for {which!r}: {', '.join(others)}"
        )
    return which


def check_backend_options(backend: str, options: dict[str, Any]) -> None:
    """Raise a clear error for options backend ``backend`` does not take, naming those it
    does."""
    params = inspect.signature(backend_function(backend)).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [p for p in params if p not in SHARED_ARGUMENTS and p != "op"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise TypeError(
            f"backend {backend!r} takes no option(s) {unknown}; its options: "
            f"{', '.join(accepted) or 'none'}"
        )
