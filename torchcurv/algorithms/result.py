"""The one result type every eigensolver backend returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
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
        info: backend-specific extras (iterations, restarts, basis size, ...).
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor | None
    residuals: torch.Tensor
    converged: torch.Tensor
    num_matvecs: int
    wall_time: float
    backend: str
    which: str
    tol: float
    info: dict = field(default_factory=dict)

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
    before = (op.num_matvecs, op.num_calls)
    V = eigenvectors.to(op.dtype)
    lam = eigenvalues.to(device=V.device, dtype=V.dtype)
    R = op.matmat(V) - V * lam
    op.num_matvecs, op.num_calls = before
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
