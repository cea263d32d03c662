"""The one result type every eigensolver backend returns."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Literal

import torch

if TYPE_CHECKING:  # arguments imports this module (through assemble)
    from torchcurv.algorithms.arguments import Which

StopReason = Literal["converged", "maxiter", "stagnated"]


@dataclass(frozen=True, eq=False)
class EigshInfo:
    """What a backend reports beside the eigenpairs; ``None`` where it reports nothing.

    Attributes:
        check_matvecs: products spent checking residuals after or between solves, not
            counted in ``num_matvecs`` (every backend that checked).
        ncv: basis size (lanczos, block; arpack and cupy: as asked, ``None`` for the
            solver's own default).
        block_size: vectors per product (lanczos 1, block ``p``; lobpcg: the block it
            iterates).
        restarts: thick restarts (lanczos, block).
        stop_reason: ``"converged"``, ``"maxiter"`` or ``"stagnated"`` (lanczos, block).
        residual_estimates: ``(k,)`` float64 Ritz residual estimates of the returned
            pairs, in their (ascending) order (lanczos, block).
        basis_shape, basis_dtype, basis_device, basis_bytes: the stored Krylov basis
            (lanczos, block).
        iterations: LOBPCG iterations over all rounds (lobpcg).
        iterations_per_pair: power iterations of each pair, in the order found (power).
        rounds: solver runs, each with a tightened absolute tolerance (lobpcg, cupy).
        final_abs_tol: the absolute tolerance of the last run (lobpcg, cupy).
        solver_dtype: NumPy name of the precision the SciPy/CuPy solver worked in
            (arpack, lobpcg, cupy).
        arpack_no_convergence: ARPACK's message when it converged fewer than ``k``
            pairs (arpack).
    """

    check_matvecs: int | None = None
    ncv: int | None = None
    block_size: int | None = None
    restarts: int | None = None
    stop_reason: StopReason | None = None
    residual_estimates: torch.Tensor | None = None
    basis_shape: tuple[int, int] | None = None
    basis_dtype: torch.dtype | None = None
    basis_device: torch.device | None = None
    basis_bytes: int | None = None
    iterations: int | None = None
    iterations_per_pair: tuple[int, ...] | None = None
    rounds: int | None = None
    final_abs_tol: float | None = None
    solver_dtype: str | None = None
    arpack_no_convergence: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The fields the backend reported (not ``None``), e.g. for a JSON record."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return {name: v for name, v in values.items() if v is not None}


@dataclass(frozen=True, eq=False)
class EigshResult:
    """Eigenpairs from any backend of :func:`torchcurv.eigsh`.

    Order: ascending eigenvalues, as ``scipy.sparse.linalg.eigsh`` returns them, for every
    backend and every ``which`` (``result.eigenvalues[-1]`` is the largest found).

    Attributes:
        eigenvalues: ``(k,)`` float64 tensor on the CPU, ascending.
        eigenvectors: ``(n, k)`` tensor on the operator's device; column ``i`` belongs to
            ``eigenvalues[i]``. ``None`` if the caller asked for values only.
        residuals: ``(k,)`` float64, ``||A v_i - lambda_i v_i||_2`` computed after the solve
            with one extra ``matmat`` (not counted in ``num_matvecs``); NaN without vectors.
        converged: ``(k,)`` bool, ``residuals <= tol * max(|lambda_i|, tiny)`` (the backend's
            own verdict where no vectors exist).
        num_matvecs: operator-vector products the solve used (a block of m counts m).
        wall_time: seconds, synchronised with the device.
        backend: the backend's name.
        which: the ``which`` asked for.
        tol: the relative tolerance asked for.
        info: :class:`EigshInfo`, the backend's extras (iterations, restarts, basis
            size, ...).

    Frozen, like every torchcurv result; compared by identity (its fields are tensors).
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor | None
    residuals: torch.Tensor
    converged: torch.Tensor
    num_matvecs: int
    wall_time: float
    backend: str
    which: Which
    tol: float
    info: EigshInfo = EigshInfo()

    @property
    def all_converged(self) -> bool:
        return bool(self.converged.all())

    def __repr__(self) -> str:
        vals = ", ".join(f"{v:.6g}" for v in self.eigenvalues.tolist())
        return (
            f"EigshResult(backend={self.backend!r}, which={self.which!r}, "
            f"eigenvalues=[{vals}], converged={int(self.converged.sum())}/"
            f"{len(self.converged)}, num_matvecs={self.num_matvecs}, "
            f"wall_time={self.wall_time:.3g}s)"
        )


def residual_norms(
    op, eigenvalues: torch.Tensor, eigenvectors: torch.Tensor
) -> torch.Tensor:
    """``||A v_i - lambda_i v_i||_2`` for each column, with one ``matmat``.

    The product is not counted in ``op.num_matvecs`` (it checks the answer, it is not
    part of the solve). Returns ``(k,)`` float64 on the CPU.
    """
    V = eigenvectors.to(op.dtype)
    lam = eigenvalues.to(device=V.device, dtype=V.dtype)
    with op.uncounted():
        R = op.matmat(V) - V * lam
    return R.double().norm(dim=0).cpu()


def converged_mask(
    eigenvalues: torch.Tensor, residuals: torch.Tensor, tol: float
) -> torch.Tensor:
    """``residual_i <= tol * |lambda_i|`` (with ``|lambda_i|`` floored at machine tiny)."""
    scale = eigenvalues.double().abs().clamp_min(torch.finfo(torch.float64).tiny)
    return residuals.double() <= tol * scale


def start_block(
    n: int,
    m: int,
    dtype: torch.dtype,
    device: torch.device,
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``m`` standard-normal columns, reproducible for a fixed ``seed`` on a device.

    Drawn in float64 on the CPU and then moved, so the same seed gives the same start on
    every device and dtype.
    """
    if generator is None:
        generator = torch.Generator()
        generator.manual_seed(0 if seed is None else seed)
    return torch.randn(n, m, dtype=torch.float64, generator=generator).to(device, dtype)
