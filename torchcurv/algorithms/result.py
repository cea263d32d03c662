"""The one result type every eigensolver backend returns."""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Literal

import torch

if TYPE_CHECKING:  # arguments imports this module (through assemble)
    from torchcurv.algorithms.arguments import Which

StopReason = Literal["converged", "maxiter", "stagnated"]

HistorySource = Literal["ritz_estimates", "iterates", "checks", "final"]
"""Where a :class:`ConvergenceHistory`'s residuals come from (see its docstring)."""


@dataclass(frozen=True)
class ConvergenceHistory:
    """How a solve approached its answer: the wanted pairs' relative residuals against
    the products spent, at every point the backend could observe for free.

    Attributes:
        matvecs: ``(points,)`` products counted in ``num_matvecs`` so far at each point,
            non-decreasing (the uncounted check products are not in it).
        residuals: per point, ``k`` relative residuals ``||A v - theta v|| / |theta|`` of
            the ``k`` wanted approximations at that point, in ascending order of
            ``theta`` (power: in the order found, ``inf`` for a pair not started).
        source: what the residuals are; each backend records what it can see without
            spending a product or changing its results:

            - ``"ritz_estimates"`` (lanczos, block): at each thick restart, the Ritz
              residual estimates from the projected matrix. They equal the true
              residuals up to the rounding of products and Ritz vectors (sums of ``n``
              terms): ``|estimate - true| <= 10 * sqrt(n) * eps * ||A||`` (``eps`` of the
              working dtype; the tolerance the tests hold), so at the last point a
              converged solve's estimates are below ``tol`` and the result's true
              residuals agree with them to that bound.
            - ``"iterates"`` (lobpcg): LOBPCG's own residual norms of its iterates at
              every iteration (``retResidualNormsHistory``), which are true residuals;
              product counts as recorded at each block product (approximate when LOBPCG
              restarts internally), rounds concatenated.
            - ``"checks"`` (cupy, power): cupy: the true residuals checked after each
              round (CuPy shows nothing inside a run); power: at every iteration the
              deflated residual of the pair being iterated and the last ones of the
              pairs found before it.
            - ``"final"`` (arpack): ARPACK shows no residuals while it runs, so the one
              point is the result's true residuals after all products.
    """

    matvecs: tuple[int, ...]
    residuals: tuple[tuple[float, ...], ...]
    source: HistorySource

    def __post_init__(self) -> None:
        if len(self.matvecs) != len(self.residuals):
            raise ValueError(
                f"a history needs one residual tuple per point: {len(self.matvecs)} "
                f"product counts, {len(self.residuals)} residual tuples"
            )
        if any(b < a for a, b in zip(self.matvecs, self.matvecs[1:])):
            raise ValueError(f"product counts must not decrease, got {self.matvecs}")

    def max_residuals(self) -> tuple[float, ...]:
        """The largest relative residual of the wanted pairs at each point (what a
        convergence plot draws); NaN residuals (no vector) count as ``inf``."""
        return tuple(max((math.inf if math.isnan(r) else r for r in rs), default=math.nan)
                     for rs in self.residuals)

    def as_dict(self) -> dict[str, Any]:
        """Plain lists, e.g. for a JSON record."""
        return {"matvecs": list(self.matvecs), "residuals": [list(r) for r in self.residuals],
                "source": self.source}


def relative_residuals(values: torch.Tensor, residuals: torch.Tensor) -> tuple[float, ...]:
    """``residual_i / |value_i|`` (with ``|value_i|`` floored at machine tiny, as
    :func:`converged_mask` does) as a tuple, in the given order: one history point."""
    scale = values.double().abs().clamp_min(torch.finfo(torch.float64).tiny)
    return tuple((residuals.double().cpu() / scale.cpu()).tolist())


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
        history: :class:`ConvergenceHistory`, residuals against products (every
            built-in backend; ``ConvergenceHistory.source`` says what each sees).
        resumed_matvecs: products of an interrupted run that this solve resumed from a
            checkpoint (lanczos, block with ``checkpoint=``); they are part of
            ``num_matvecs`` but were not spent again.
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
    history: ConvergenceHistory | None = None
    resumed_matvecs: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """The fields the backend reported (not ``None``), e.g. for a JSON record (the
        history as :meth:`ConvergenceHistory.as_dict`)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return {name: v.as_dict() if isinstance(v, ConvergenceHistory) else v
                for name, v in values.items() if v is not None}


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


RESIDUAL_GROUP_BYTES = 2**30
"""Largest product output :func:`residual_norms` holds at once."""


def residual_norms(
    op, eigenvalues: torch.Tensor, eigenvectors: torch.Tensor
) -> torch.Tensor:
    """``||A v_i - lambda_i v_i||_2`` for each column.

    One ``matmat`` for all columns when their products take at most
    :data:`RESIDUAL_GROUP_BYTES`, else one per group of columns that does: at ``n ~ 1e9``
    the products of ``k`` Ritz vectors are gigabytes each, and holding them all beside the
    Krylov basis, the vectors and one product's own memory did not fit on the device.
    The products are not counted in ``op.num_matvecs`` (they check the answer, they are
    not part of the solve). Returns ``(k,)`` float64 on the CPU.
    """
    V = eigenvectors.to(op.dtype)
    lam = eigenvalues.to(torch.float64).cpu().tolist()
    n, k = V.shape
    group = max(1, min(k, RESIDUAL_GROUP_BYTES // max(1, n * V.element_size())))
    norms = []
    with op.uncounted():
        for start in range(0, k, group):
            AV = op.matmat(V[:, start:start + group])
            # column by column, out of place: one column's temporary, and no write into
            # what an operator may have returned (an identity returns its input)
            norms += [norms64(torch.sub(AV[:, j], V[:, start + j], alpha=lam[start + j]))
                      for j in range(AV.shape[1])]
            del AV
    return torch.stack(norms).cpu()


def norms64(X: torch.Tensor, dim: int = -1, piece_bytes: int = 2**28) -> torch.Tensor:
    """2-norms of ``X`` along ``dim``, summed in float64 piece by piece, on ``X``'s device.

    Why pieces: ``vector_norm(X, dtype=torch.float64)`` casts all of ``X`` first, and at
    ``n ~ 1e9`` that copy of ``k`` columns is ``8 k n`` bytes (it ran the device out of
    memory); pieces of ``piece_bytes`` cost only that much.
    """
    X = X.movedim(dim, -1)
    n = X.shape[-1]
    lanes = max(1, X[..., :1].numel())
    width = max(1, piece_bytes // (8 * lanes))
    total = torch.zeros(X.shape[:-1], dtype=torch.float64, device=X.device)
    for start in range(0, n, width):
        total += X[..., start:start + width].to(torch.float64).square().sum(-1)
    return total.sqrt()


def converged_mask(
    eigenvalues: torch.Tensor, residuals: torch.Tensor, tol: float
) -> torch.Tensor:
    """``residual_i <= tol * |lambda_i|`` (with ``|lambda_i|`` floored at machine tiny)."""
    scale = eigenvalues.double().abs().clamp_min(torch.finfo(torch.float64).tiny)
    return residuals.double() <= tol * scale


DRAW_PIECE = 2**24
"""Entries per independently seeded piece of a large start block (:func:`start_block`)."""


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
    every device and dtype. Blocks of more than four :data:`DRAW_PIECE` entries are
    drawn in pieces of that size, each from its own generator seeded from ``generator``,
    on all CPU cores: one generator draws normals on one core, which at ``n ~ 1e9`` takes
    tens of seconds. The pieces are fixed by the size alone, so the start does not depend
    on the number of cores.
    """
    if generator is None:
        generator = torch.Generator()
        generator.manual_seed(0 if seed is None else seed)
    if n * m <= 4 * DRAW_PIECE:
        return torch.randn(n, m, dtype=torch.float64, generator=generator).to(device, dtype)
    base = int(torch.randint(2**62, (), generator=generator))
    out = torch.empty(n, m, dtype=torch.float64)
    flat = out.view(-1)

    def draw(i: int) -> None:  # torch releases the GIL inside normal_
        piece = flat[i * DRAW_PIECE:(i + 1) * DRAW_PIECE]
        piece.normal_(generator=torch.Generator().manual_seed(base + i))

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(pool.map(draw, range(math.ceil(n * m / DRAW_PIECE))))
    return out.to(device, dtype)
