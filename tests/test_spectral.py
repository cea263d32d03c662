"""Stochastic Lanczos quadrature: exact moments per probe, unbiased averages, a density."""

import sys

import pytest
import torch
from spectra import indefinite, rotated
from zoo import case, explicit_hessian

import torchcurv
from torchcurv.algorithms.probing import ProbeSource
from torchcurv.algorithms.spectral import SpectralDensity, spectral_density

DT = torch.float64


def outlier_spectrum(n: int = 300) -> torch.Tensor:
    """A bulk in [0, 1] and two outliers (50 and -3), like a trained network's Hessian."""
    g = torch.Generator().manual_seed(0)
    ev = torch.rand(n, dtype=DT, generator=g)
    ev[0], ev[1] = 50.0, -3.0
    return ev


def test_weights_are_probability_vectors_and_nodes_lie_in_the_spectrum():
    ev = outlier_spectrum()
    sd = spectral_density(torchcurv.MatrixOperator(rotated(ev)), num_probes=6,
                          lanczos_steps=30, seed=0)
    assert isinstance(sd, SpectralDensity)
    assert sd.nodes.shape == sd.weights.shape == (6, 30)
    assert torch.allclose(sd.weights.sum(dim=1), torch.ones(6, dtype=DT), atol=1e-12)
    assert bool((sd.weights >= 0).all())
    assert float(sd.nodes.min()) >= -3.0 - 1e-9 and float(sd.nodes.max()) <= 50.0 + 1e-9
    assert sd.num_matvecs == 6 * 30


@pytest.mark.parametrize("log_scale", [False, True])
def test_density_integrates_to_one(log_scale):
    sd = spectral_density(torchcurv.MatrixOperator(indefinite(200)), num_probes=4,
                          lanczos_steps=25, seed=1, log_scale=log_scale)
    assert abs(float(torch.trapezoid(sd.density, sd.coordinate)) - 1) < 1e-6
    assert bool((sd.grid[1:] > sd.grid[:-1]).all())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_moments_match_trace_and_frobenius_within_sampling_error(seed):
    A = rotated(outlier_spectrum())
    sd = spectral_density(torchcurv.MatrixOperator(A), num_probes=30, lanczos_steps=20,
                          seed=seed, probe="gaussian")
    n = A.shape[0]
    first, err1 = sd.moment(1)
    second, err2 = sd.moment(2)
    assert abs(first - float(A.trace()) / n) < 4 * err1
    assert abs(second - float((A * A).sum()) / n) < 4 * err2
    # The broadened density has the same mean (the Gaussian kernel is symmetric).
    assert abs(float(torch.trapezoid(sd.grid * sd.density, sd.grid)) - first) < 1e-6


def test_bfloat16_operator_keeps_every_node_and_its_second_moment():
    # bfloat16 couplings are above the noise floor eps ||A|| but below 1e3 eps ||A||
    # (7.8 ||A||): cutting there left one node per probe, a density of spikes.
    ev = torch.linspace(-1, 10, 300, dtype=DT)
    A = rotated(ev)
    kw = dict(num_probes=2, lanczos_steps=20, seed=0)
    exact = spectral_density(torchcurv.MatrixOperator(A), **kw)
    half = spectral_density(torchcurv.MatrixOperator(A.to(torch.bfloat16)), **kw)
    assert (half.weights > 0).sum(1).tolist() == [20, 20]
    second = (half.weights * half.nodes ** 2).sum(1)
    assert torch.allclose(second, (exact.weights * exact.nodes ** 2).sum(1), rtol=3e-2)


def test_quadrature_is_exact_per_probe_even_after_breakdown():
    # Five distinct eigenvalues: the probe's Krylov space is invariant after 5 steps, the
    # rule then has exactly those 5 nodes and reproduces v^T A^q v for every q.
    ev = torch.tensor([-2.0, 0.5, 1.0, 3.0, 7.0], dtype=DT).repeat_interleave(20)
    A = rotated(ev)
    sd = spectral_density(torchcurv.MatrixOperator(A), num_probes=1, lanczos_steps=12,
                          seed=3)
    heavy = sd.nodes[sd.weights > 0]
    assert torch.allclose(torch.sort(heavy).values, ev.unique(), atol=1e-10)
    v = ProbeSource(100, "rademacher", DT, torch.device("cpu"), seed=3).draw(1)[:, 0]
    v = v / v.norm()
    for q in range(1, 9):
        exact = float(v @ torch.linalg.matrix_power(A, q) @ v)
        assert sd.moment(q)[0] == pytest.approx(exact, rel=1e-10, abs=1e-10)


def test_hessian_density_moment_matches_exact_trace():
    model, criterion, data = case("mlp_tanh", "ce")
    H = torchcurv.HessianOperator(model, criterion, data)
    exact = explicit_hessian(model, criterion, data)
    sd = spectral_density(H, num_probes=20, lanczos_steps=15, seed=0)
    mean, err = sd.moment(1)
    assert abs(mean - float(exact.trace()) / H.n) < 4 * err


def test_same_seed_same_density_and_grouping_does_not_change_the_probes():
    op = torchcurv.MatrixOperator(indefinite(100))
    a = spectral_density(op, num_probes=5, lanczos_steps=10, seed=9)
    b = spectral_density(op, num_probes=5, lanczos_steps=10, seed=9, probes_per_matmat=2)
    assert torch.allclose(a.nodes, b.nodes, rtol=1e-12, atol=1e-14)
    assert torch.allclose(a.density, b.density, rtol=1e-10, atol=1e-14)
    c = spectral_density(op, num_probes=5, lanczos_steps=10, seed=9)
    assert torch.equal(a.density, c.density)


def test_all_probes_share_each_operator_call():
    op = torchcurv.MatrixOperator(indefinite(100))
    spectral_density(op, num_probes=8, lanczos_steps=10, seed=0)
    assert op.num_calls == 10 and op.num_matvecs == 80


def test_outlier_is_visible_as_a_separate_peak():
    ev = outlier_spectrum()
    sd = spectral_density(torchcurv.MatrixOperator(rotated(ev)), num_probes=10,
                          lanczos_steps=30, seed=0)
    near = (sd.grid - 50.0).abs() < 3 * sd.sigma
    gap = (sd.grid > 10) & (sd.grid < 40)
    assert float(sd.density[near].max()) > 1e6 * float(sd.density[gap].max())


def test_plot_writes_a_png(tmp_path):
    sd = spectral_density(torchcurv.MatrixOperator(rotated(outlier_spectrum())),
                          num_probes=4, lanczos_steps=20, seed=0, log_scale=True)
    path = sd.plot(tmp_path / "density.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ax = sd.plot()
    assert ax.get_yscale() == "log" and ax.get_xscale() == "asinh"
    assert "eigenvalue" in ax.get_xlabel()


def test_plot_without_matplotlib_names_the_extra(monkeypatch):
    sd = spectral_density(torchcurv.MatrixOperator(indefinite(30)), num_probes=2,
                          lanczos_steps=5, seed=0)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(torchcurv.MissingExtraError, match=r"torchcurv\[plot\]"):
        sd.plot()


@pytest.mark.parametrize("kwargs, match", [
    ({"num_probes": 0}, "num_probes"),
    ({"lanczos_steps": 1.5}, "lanczos_steps"),
    ({"probe": "cauchy"}, "probe"),
    ({"sigma": -1.0}, "sigma"),
    ({"grid": torch.tensor([1.0, 0.0])}, "ascending"),
])
def test_bad_arguments_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        spectral_density(torchcurv.MatrixOperator(torch.eye(10, dtype=DT)), seed=0, **kwargs)


def test_plot_shows_outliers_of_weight_one_over_n_at_language_model_sizes():
    # At n ~ 1e9 an outlier eigenvalue's node weight is ~1/n: its bump is ~1e-9 of the
    # bulk's peak. The 1.1B Hessian's picture showed the bulk alone (a floor of 1e-8 of
    # the peak, a rug of weights above 1e-6); the outlier must be drawn and marked.
    from torchcurv.algorithms.spectral import SpectralDensity, broaden

    n = 10**9
    nodes = torch.tensor([[-1.0, 0.0, 1.0, 200.0]], dtype=torch.float64)
    weights = torch.tensor([[0.25, 0.5, 0.25 - 1 / n, 1 / n]], dtype=torch.float64)
    grid, density, sigma = broaden(nodes, weights, sigma=2.0, linear_width=None)
    sd = SpectralDensity(nodes=nodes, weights=weights, grid=grid, density=density,
                         sigma=sigma, log_scale=False, linear_width=None, n=n,
                         num_matvecs=0, wall_time=0.0)
    ax = sd.plot()
    x, y = (torch.as_tensor(a, dtype=torch.float64) for a in ax.lines[0].get_data())
    near = (x - 200.0).abs() < sigma
    assert bool(torch.isfinite(y[near]).any())
    assert ax.get_xlim()[1] > 200.0
    rug = next(line for line in ax.lines if line.get_label() == "quadrature nodes")
    assert 200.0 in rug.get_xdata().tolist()


def test_plot_and_caption_say_when_probes_broke_down():
    # The 1.1B Hessian's bfloat16 probes broke down after one step: all weight on one
    # node, 23 Ritz values (reaching the outliers eigsh found) with none. The caption
    # must say so and the rug must show those values apart from the weighted nodes.
    from torchcurv.algorithms.spectral import SpectralDensity, broaden

    nodes = torch.tensor([[0.0, -200.0, 190.0], [0.1, 1.0, 2.0]], dtype=torch.float64)
    weights = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.25, 0.25]], dtype=torch.float64)
    grid, density, sigma = broaden(nodes, weights, sigma=2.0, linear_width=None)
    sd = SpectralDensity(nodes=nodes, weights=weights, grid=grid, density=density,
                         sigma=sigma, log_scale=False, linear_width=None, n=10**9,
                         num_matvecs=0, wall_time=0.0)
    assert "weight on 1-3 of 3 nodes per probe" in sd.caption()
    ax = sd.plot()
    labels = {line.get_label(): line.get_xdata().tolist() for line in ax.lines}
    assert sorted(labels["Ritz values after breakdown (no weight)"]) == [-200.0, 190.0]
    assert 190.0 not in labels["quadrature nodes"]
    full = SpectralDensity(nodes=nodes[1:], weights=weights[1:], grid=grid, density=density,
                           sigma=sigma, log_scale=False, linear_width=None, n=10**9,
                           num_matvecs=0, wall_time=0.0)
    assert "breakdown" not in full.caption()
    assert not any("breakdown" in line.get_label() for line in full.plot().lines)
