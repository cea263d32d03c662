"""Run several eigsh backends on one operator and set their answers side by side."""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from torchcurv.algorithms.arguments import Which
from torchcurv.algorithms.eigsh import (
    BACKENDS,
    SHARED_ARGUMENTS,
    EigshBackend,
    available_backends,
    backend_function,
    check_arguments,
    check_backend_options,
    eigsh,
)
from torchcurv.algorithms.plotting import finish_plot, plot_axes
from torchcurv.algorithms.result import EigshResult, HistorySource
from torchcurv.errors import MissingExtraError
from torchcurv.interop.reverse import from_linear_operator
from torchcurv.operators.base import LinearOperator


@dataclass
class BackendRow:
    """One backend's run.

    Attributes:
        backend: the backend's name.
        result: its :class:`EigshResult`, or ``None`` if it could not run here.
        error: why it could not run (``None`` if it ran).
        eigenvalue_agreement: ``max_i |lambda_i - lambda_i^ref| / max_i |lambda_i^ref|``
            against the reference row (0 for the reference itself; NaN if either has
            NaN eigenvalues or the row failed).
        max_relative_residual: ``max_i ||A v_i - lambda_i v_i|| / |lambda_i|`` (NaN
            without vectors).
    """

    backend: str
    result: EigshResult | None
    error: str | None
    eigenvalue_agreement: float
    max_relative_residual: float

    def as_dict(self) -> dict[str, Any]:
        r = self.result
        return {
            "backend": self.backend,
            "error": self.error,
            "eigenvalues": None if r is None else r.eigenvalues.tolist(),
            "eigenvalue_agreement": self.eigenvalue_agreement,
            "max_relative_residual": self.max_relative_residual,
            "converged": None if r is None else int(r.converged.sum()),
            "k": None if r is None else len(r.eigenvalues),
            "num_matvecs": None if r is None else r.num_matvecs,
            "wall_time": None if r is None else r.wall_time,
            "history": None if r is None or r.info.history is None
            else r.info.history.as_dict(),
        }


@dataclass
class BackendComparison:
    """Rows of :func:`compare_backends`, in the order run; ``str()`` is a table.

    Attributes:
        rows: one :class:`BackendRow` per backend.
        reference: the backend the others are compared with (the first that ran).
    """

    rows: list[BackendRow]
    reference: str | None

    def __getitem__(self, backend: str) -> BackendRow:
        for row in self.rows:
            if row.backend == backend:
                return row
        raise KeyError(backend)

    def as_dicts(self) -> list[dict[str, Any]]:
        return [row.as_dict() for row in self.rows]

    def plot_convergence(self, path_or_ax: Any = None, title: str | None = None) -> Any:
        """Max relative residual of the wanted pairs against products, one line per
        backend that ran, ``tol`` as a horizontal line, the others named in the legend
        (:func:`plot_convergence`). Returns the ``Axes`` (or the ``Path`` written)."""
        return plot_convergence(
            [row.result for row in self.rows if row.result is not None], path_or_ax,
            not_run={row.backend: row.error or "" for row in self.rows if row.result is None},
            title=title)

    def __str__(self) -> str:
        head = f"{'backend':<10} {'conv':>6} {'eig. agreement':>15} {'max res/|l|':>12} " \
               f"{'matvecs':>8} {'time [s]':>9}"
        lines = [head, "-" * len(head)]
        for row in self.rows:
            r = row.result
            if r is None:
                lines.append(f"{row.backend:<10} did not run: {row.error}")
                continue
            agree = "(reference)" if row.backend == self.reference else \
                f"{row.eigenvalue_agreement:.2e}"
            conv = f"{int(r.converged.sum())}/{len(r.converged)}"
            lines.append(f"{row.backend:<10} {conv:>6} {agree:>15} "
                         f"{row.max_relative_residual:>12.2e} {r.num_matvecs:>8} "
                         f"{r.wall_time:>9.3f}")
        ran = [(row.backend, row.result) for row in self.rows if row.result is not None]
        if ran:
            lines += ["", "eigenvalues (ascending):",
                      "  i " + "".join(f"{backend:>22}" for backend, _ in ran)]
            for i in range(max(len(result.eigenvalues) for _, result in ran)):
                cells = "".join(
                    f"{result.eigenvalues[i].item():>22.14g}"
                    if i < len(result.eigenvalues) else f"{'':>22}" for _, result in ran)
                lines.append(f"{i:>3} {cells}")
        return "\n".join(lines)


HISTORY_WORDS: dict[HistorySource, str] = {
    "ritz_estimates": "Ritz estimates per restart",
    "iterates": "per iteration",
    "checks": "checked",
    "final": "final residual only",
}
"""How a convergence plot's legend names each backend's kind of history."""


def plot_convergence(
    results: Sequence[EigshResult],
    path_or_ax: Any = None,
    *,
    not_run: dict[str, str] | None = None,
    title: str | None = None,
) -> Any:
    """The convergence plot by which solver backends are compared: for each result, the
    largest relative residual of its wanted pairs (log scale) against the products spent
    (:class:`~torchcurv.algorithms.result.ConvergenceHistory`), and the ``tol`` asked
    for as a dashed horizontal line.

    Args:
        results: eigsh results of one problem (e.g. a comparison's rows that ran); each
            becomes one line labelled by its backend and what its history holds
            (ARPACK, which shows nothing while it runs, is a single final marker).
        path_or_ax: ``None`` (new figure), a file path (written, ``Path`` returned) or
            a matplotlib ``Axes`` to draw into.
        not_run: ``{backend: why}`` for backends that did not run; named in the legend
            so that a missing line is explained.
        title: default ``"eigsh convergence (k=..., which=...)"``.

    Needs matplotlib (``pip install 'torchcurv[plot]'``,
    :class:`~torchcurv.MissingExtraError` otherwise). Returns the ``Axes`` or ``Path``.
    """
    ax = plot_axes(path_or_ax, "plot_convergence", figsize=(6.4, 5.2))
    for r in results:
        h = r.info.history
        if h is None:
            continue
        single = len(h.matvecs) == 1
        ax.plot(h.matvecs, h.max_residuals(), marker="D" if single else ".",
                markersize=7 if single else 4, linewidth=1.4,
                label=f"{r.backend} ({HISTORY_WORDS[h.source]})")
    if results:
        ax.axhline(results[0].tol, color="0.3", linestyle="--", linewidth=1,
                   label=f"tol = {results[0].tol:g}")
    for backend, why in (not_run or {}).items():
        ax.plot([], [], linestyle="none", label=f"{backend}: did not run ({why})")
    ax.set_yscale("log")
    ax.set_xlabel("operator-vector products (num_matvecs)")
    ax.set_ylabel("max relative residual of the wanted pairs")
    if title is None and results:
        title = (f"eigsh convergence (k={len(results[0].eigenvalues)}, "
                 f"which={results[0].which})")
    if title:
        ax.set_title(title)
    ax.grid(True, which="major", alpha=0.3)
    # below the axes: the curves of fast backends crowd the upper left, where a legend
    # inside would sit
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(0.0, -0.16),
              frameon=False)
    return finish_plot(ax, path_or_ax)


def _agreement(values: torch.Tensor, reference: torch.Tensor) -> float:
    if values.shape != reference.shape:
        return math.nan
    scale = float(reference.abs().max())
    return float((values - reference).abs().max()) / (scale if scale > 0 else 1.0)


def _max_relative_residual(r: EigshResult) -> float:
    tiny = torch.finfo(torch.float64).tiny
    return float((r.residuals / r.eigenvalues.abs().clamp_min(tiny)).max())


def _check_comparison_options(
    op: LinearOperator, backend: str, options: dict[str, Any], k: int, which: str, tol: float,
    seed: int | None,
) -> None:
    """Refuse, before anything runs, a backend option that is unknown or would make the
    comparison unfair (a shared argument other than ``maxiter``)."""
    fixed = sorted((set(options) & set(SHARED_ARGUMENTS)) - {"maxiter"})
    if fixed:
        raise ValueError(
            f"options for {backend!r} set {fixed}, which compare_backends gives every "
            f"backend alike; pass them as compare_backends({fixed[0]}=...)"
        )
    check_backend_options(backend, {o: v for o, v in options.items() if o != "maxiter"})
    if "maxiter" in options:
        check_arguments(op, k, which, tol, options["maxiter"], seed)


def runnable_backends(op: Any, which: Which = "LA") -> tuple[list[str], dict[str, str]]:
    """The backends that can run on ``op`` for ``which`` here, and why each other cannot.

    :func:`~torchcurv.algorithms.eigsh.available_backends` lists what is installed; this
    also asks for what a backend needs at call time (CuPy and a CUDA operator for
    ``cupy``) and whether it serves ``which``, so a list for :func:`compare_backends`
    holds no row that can only fail.

    Returns:
        ``(names, reasons)``: runnable names in :data:`BACKENDS` order, and
        ``{name: why it cannot run}`` for every other known backend.
    """
    if not isinstance(op, LinearOperator):
        op = from_linear_operator(op)
    installed = available_backends()
    names, reasons = [], {}
    for name, spec in BACKENDS.items():
        if name not in installed:
            reasons[name] = f"not part of this installation (no module {spec.module})"
        elif spec.which is not None and which not in spec.which:
            reasons[name] = f"finds which in {spec.which}, not {which!r}"
        elif name == "cupy" and op.device.type != "cuda":
            reasons[name] = f"needs an operator on a CUDA device, this one is on {op.device}"
        elif name == "cupy" and importlib.util.find_spec("cupy") is None:
            reasons[name] = "needs CuPy: pip install 'torchcurv[cupy]'"
        else:
            names.append(name)
    return names, reasons


def compare_backends(
    op: Any,
    k: int = 6,
    which: Which = "LA",
    backends: Sequence[EigshBackend] = ("arpack", "lobpcg"),
    tol: float = 1e-6,
    maxiter: int | None = None,
    seed: int | None = 0,
    options: dict[str, dict[str, Any]] | None = None,
) -> BackendComparison:
    """Run :func:`torchcurv.eigsh` with each backend on ``op`` and compare the answers.

    ``op``, ``k``, ``which``, ``tol``, ``maxiter``, ``seed``: as in
    :func:`torchcurv.eigsh`, the same for every backend.

    Args:
        backends: backend names, run in this order; the first that runs is the
            reference for eigenvalue agreement.
        options: per-backend extra options, e.g. ``{"arpack": {"ncv": 40}}``. A
            backend's ``maxiter`` here overrides the shared one (each backend counts its
            own iterations); ``k``, ``which``, ``tol`` and ``seed`` are the same for all,
            and an option a backend does not take is an error naming the ones it does,
            both before anything runs.

    A backend that cannot run here (CuPy not installed, an operator not on a GPU, a
    ``which`` it does not serve) gets a row with its ``error`` instead of stopping the
    comparison. Unknown backend names and arguments no backend accepts (``k >= n``,
    ``tol <= 0``, ...) are an error before anything runs.

    Returns:
        A :class:`BackendComparison`; ``print(comparison)`` shows the table.
    """
    if not isinstance(op, LinearOperator):
        op = from_linear_operator(op)
    check_arguments(op, k, which, tol, maxiter, seed)
    for name in backends:
        backend_function(name)  # fail fast on unknown names
    options = options or {}
    unknown = set(options) - set(backends)
    if unknown:
        raise ValueError(f"options given for backends not compared: {sorted(unknown)}")
    for given, opts in options.items():
        _check_comparison_options(op, given, opts, k, which, tol, seed)
    results: dict[str, EigshResult | str] = {}
    for name in backends:
        # maxiter counts different things per backend (ARPACK restarts, LOBPCG
        # iterations, ...), so a backend's own maxiter overrides the shared one
        run = {"maxiter": maxiter, **options.get(name, {})}
        try:
            results[name] = eigsh(op, k=k, which=which, backend=name, tol=tol, seed=seed,
                                  **run)
        except (MissingExtraError, ValueError) as e:
            results[name] = f"{type(e).__name__}: {e}"
    reference = next((n for n in backends if isinstance(results[n], EigshResult)), None)
    ref = None if reference is None else results[reference]
    rows = []
    for name in backends:
        r = results[name]
        if isinstance(r, str):
            rows.append(BackendRow(name, None, r, math.nan, math.nan))
            continue
        assert isinstance(ref, EigshResult)  # r ran, so the reference did
        rows.append(BackendRow(name, r, None, _agreement(r.eigenvalues, ref.eigenvalues),
                               _max_relative_residual(r)))
    return BackendComparison(rows, reference)
