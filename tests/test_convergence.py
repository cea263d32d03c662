"""Convergence history: residuals against products, recorded by every backend for free,
and the plot by which backends are compared."""

import dataclasses
import math
import sys

import pytest
import torch
from spectra import rotated

import torchcurv
from torchcurv import ConvergenceHistory, MatrixOperator, MissingExtraError

DT = torch.float64
N = 300
EPS = torch.finfo(DT).eps
# where each backend's history comes from (ConvergenceHistory.source)
SOURCES = {"arpack": "final", "lobpcg": "iterates", "lanczos": "ritz_estimates",
           "block": "ritz_estimates", "power": "checks"}


@pytest.fixture(scope="module")
def spectrum():
    # 0 .. 1 evenly: the top pairs are close, so the torch Lanczos runs restart often
    ev = torch.linspace(0, 1, N, dtype=DT)
    return ev, rotated(ev)


@pytest.fixture(scope="module")
def gapped():
    # two outliers above the same bulk: what power iteration converges on
    ev = torch.cat([torch.linspace(0, 1, N - 2, dtype=DT), torch.tensor([2.0, 3.0], dtype=DT)])
    return ev, rotated(ev)


def _solve(A, backend, k=4, tol=1e-10, **options):
    which = "LM" if backend == "power" else "LA"
    if backend == "power":
        k = 2
    return torchcurv.eigsh(MatrixOperator(A), k=k, which=which, backend=backend, tol=tol,
                           seed=0, **options)


@pytest.mark.parametrize("backend", list(SOURCES))
def test_every_backend_records_a_history_that_ends_at_its_products(spectrum, gapped, backend):
    _, A = gapped if backend == "power" else spectrum
    r = _solve(A, backend)
    k = len(r.eigenvalues)
    h = r.info.history
    assert isinstance(h, ConvergenceHistory) and h.source == SOURCES[backend]
    assert len(h.matvecs) == len(h.residuals) >= 1
    assert all(b >= a for a, b in zip(h.matvecs, h.matvecs[1:])), "monotone in products"
    assert h.matvecs[-1] == r.num_matvecs, "the last point is after all counted products"
    assert h.matvecs[0] > 0
    assert all(len(point) == k for point in h.residuals)
    assert h.max_residuals() == tuple(max(point) for point in h.residuals)
    if backend in ("lanczos", "block", "lobpcg"):
        assert len(h.matvecs) > 3, "one point per restart or iteration"


@pytest.mark.parametrize("backend", list(SOURCES))
def test_the_final_point_agrees_with_the_true_residual_verdict(spectrum, gapped, backend):
    ev, A = gapped if backend == "power" else spectrum
    r = _solve(A, backend)
    assert r.all_converged
    final = torch.tensor(r.info.history.residuals[-1], dtype=DT)
    true = r.residuals / r.eigenvalues.abs()
    norm_a = float(ev.abs().max())
    if backend == "arpack":
        assert torch.equal(final, true), "ARPACK's one point is the result's residuals"
    elif backend == "power":
        # deflated residuals of the iterates, before the final Rayleigh-Ritz, in the
        # order found (largest first); they bound the verdict
        assert bool((final <= r.tol).all())
        assert bool((true <= r.tol).all())
    else:
        # Ritz estimates (lanczos, block) and LOBPCG's iterate residuals equal the true
        # residuals up to rounding: the bound ConvergenceHistory documents
        bound = 10 * math.sqrt(N) * EPS * norm_a / r.eigenvalues.abs()
        assert bool(((final - true).abs() <= bound).all()), (final, true)
        assert bool((final <= r.tol).all())


def test_lanczos_history_is_what_its_callback_saw(spectrum):
    _, A = spectrum
    seen = []
    r = _solve(A, "lanczos", callback=seen.append)
    h = r.info.history
    assert h.matvecs == tuple(d["num_matvecs"] for d in seen)
    for point, d in zip(h.residuals, seen):
        order = torch.argsort(d["ritz_values"])
        want = d["residual_estimates"][order] / d["ritz_values"][order].abs()
        assert point == tuple(want.tolist())


def test_recording_changes_no_eigenvalue_or_product_count(spectrum):
    # LOBPCG runs through a recording front: the same answer as the products counted
    # on the operator itself, and the same across two runs
    _, A = spectrum
    op = MatrixOperator(A)
    a = torchcurv.eigsh(op, k=4, backend="lobpcg", tol=1e-10, seed=0)
    assert a.num_matvecs == op.num_matvecs
    b = torchcurv.eigsh(MatrixOperator(A), k=4, backend="lobpcg", tol=1e-10, seed=0)
    assert torch.equal(a.eigenvalues, b.eigenvalues)
    assert a.info.history == b.info.history


def test_shift_invert_history_counts_the_products_of_a(spectrum):
    _, A = spectrum
    r = torchcurv.eigsh(MatrixOperator(A), k=2, sigma=0.5, backend="lanczos", tol=1e-8)
    assert r.info.history.source == "final"
    assert r.info.history.matvecs == (r.num_matvecs,)


def test_history_is_frozen_and_refuses_inconsistent_points():
    h = ConvergenceHistory((3, 5), ((1.0,), (0.1,)), "iterates")
    with pytest.raises(dataclasses.FrozenInstanceError):
        h.matvecs = (1,)  # type: ignore[misc]
    with pytest.raises(ValueError, match="must not decrease"):
        ConvergenceHistory((5, 3), ((1.0,), (0.1,)), "iterates")
    with pytest.raises(ValueError, match="one residual tuple per point"):
        ConvergenceHistory((5,), ((1.0,), (0.1,)), "iterates")
    assert ConvergenceHistory((1,), ((math.nan, 0.5),), "final").max_residuals() == (math.inf,)
    assert h.as_dict() == {"matvecs": [3, 5], "residuals": [[1.0], [0.1]],
                           "source": "iterates"}
    assert torchcurv.EigshInfo(history=h).as_dict() == {"history": h.as_dict()}


def _lines(ax):
    return {line.get_label(): line for line in ax.get_lines()}


def test_plot_convergence_draws_each_backends_history_against_products(spectrum):
    pytest.importorskip("matplotlib")
    _, A = spectrum
    table = torchcurv.compare_backends(MatrixOperator(A), k=4, tol=1e-10,
                                       backends=["arpack", "lobpcg", "lanczos", "power"])
    assert table["power"].result is None  # 'LA' is not power iteration's
    ax = table.plot_convergence()
    lines = _lines(ax)
    assert ax.get_yscale() == "log"
    assert "products" in ax.get_xlabel() and "relative residual" in ax.get_ylabel()
    for backend in ("arpack", "lobpcg", "lanczos"):
        h = table[backend].result.info.history
        (label,) = [name for name in lines if name.startswith(f"{backend} (")]
        assert tuple(lines[label].get_xdata()) == h.matvecs
        assert tuple(lines[label].get_ydata()) == h.max_residuals()
    tol_line = lines["tol = 1e-10"]
    assert tuple(tol_line.get_ydata()) == (1e-10, 1e-10)
    (missing,) = [name for name in lines if name.startswith("power: did not run")]
    assert "LM" in missing and len(lines["arpack (final residual only)"].get_xdata()) == 1
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert set(legend) == set(lines)


def test_plot_convergence_draws_into_given_axes_or_writes_a_file(spectrum, tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    _, A = spectrum
    r = _solve(A, "lanczos")
    ax = Figure().add_subplot()
    assert torchcurv.plot_convergence([r], ax, title="mine") is ax
    assert ax.get_title() == "mine"
    out = torchcurv.plot_convergence([r], tmp_path / "c.png")
    assert out == tmp_path / "c.png" and out.stat().st_size > 0


def test_plot_convergence_without_matplotlib_names_the_extra(spectrum, monkeypatch):
    _, A = spectrum
    r = _solve(A, "lanczos")
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(MissingExtraError, match="plot"):
        torchcurv.plot_convergence([r])


def test_demo_convergence_compares_every_cpu_backend(tmp_path):
    pytest.importorskip("matplotlib")
    from torchcurv.demo import demo_convergence

    table, ax = demo_convergence(None, k=2, tol=1e-6, num_samples=128, batch_size=128)
    ran = [row.backend for row in table.rows]
    assert {"arpack", "lobpcg", "lanczos", "block"} <= set(ran)
    assert all(row.result.all_converged for row in table.rows)
    labels = list(_lines(ax))
    assert any(name.startswith("cupy: did not run") for name in labels)
    assert any(name.startswith("power: did not run") for name in labels)
    assert "Hessian" in ax.get_title()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cupy", "lanczos"])
def test_gpu_histories_end_at_the_products_and_meet_tol(spectrum, backend):
    if backend == "cupy":
        pytest.importorskip("cupy")
    _, A = spectrum
    op = MatrixOperator(A.cuda())
    r = torchcurv.eigsh(op, k=4, backend=backend, tol=1e-8, seed=0)
    h = r.info.history
    assert h.source == SOURCES.get(backend, "checks")
    assert h.matvecs[-1] == r.num_matvecs and r.all_converged
    assert max(h.residuals[-1]) <= 1e-8
