"""Spectral density by stochastic Lanczos quadrature (Ubaru, Chen & Saad 2017;
Ghorbani, Krishnan & Xiao 2019).

For a unit probe ``v``, ``m`` Lanczos steps from ``v`` give ``T = S diag(theta) S^T``;
the Ritz values ``theta_i`` (nodes) and the squared first components ``S[0, i]^2``
(weights, summing to 1) form the Gauss quadrature rule of the measure
``sum_j (v . u_j)^2 delta(x - lambda_j)``, exact for polynomials of degree ``< 2m``.
Probes drawn uniformly on the sphere (normalized Gaussian) or normalized Rademacher have
``E[(v . u_j)^2] = 1/n``, so the average rule estimates the spectral density
``(1/n) sum_j delta(x - lambda_j)`` and its moments ``tr(A^q) / n`` without bias for
``q < 2m``.

The smooth density replaces every node by a Gaussian of width ``sigma``. All probes run
together: each Lanczos step is one ``matmat`` of ``probes_per_matmat`` vectors, through
the recurrence shared with the eigensolvers
(:class:`~torchcurv.algorithms.krylov.KrylovBasis`, full reorthogonalization).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from torchcurv.algorithms.arguments import synchronized_clock
from torchcurv.algorithms.krylov import KrylovBasis, noise_margin
from torchcurv.algorithms.plotting import finish_plot, plot_axes
from torchcurv.algorithms.probing import (
    DISTRIBUTIONS,
    Distribution,
    ProbeSource,
    check_choice,
    check_operator,
)
from torchcurv.distributed.reduce import common_seed, reports_failures

GRID_POINTS = 2001
SIGMA_FRACTION = 0.005
"""Default broadening: ``sigma = SIGMA_FRACTION * (largest node - smallest node)`` in the
density's coordinate (Ghorbani et al. use ``sigma^2 = 1e-5`` on a spectrum scaled to
``[-1, 1]``, i.e. about 0.16 % of the range; 0.5 % keeps few-probe estimates smooth)."""
LINEAR_WIDTH_FRACTION = 1e-4
"""Default ``linear_width`` of the log-scale coordinate, relative to the largest |node|."""
NEGLIGIBLE_EPS = 1e3
"""Lanczos couplings below ``NEGLIGIBLE_EPS * eps * ||A||`` end a probe's rule (breakdown);
in half precision below ``eps * ||A||`` (:func:`~torchcurv.algorithms.krylov.noise_margin`)."""
TAIL_SIGMAS = 6.0
"""The default grid extends this many widths beyond the extreme nodes (mass lost < 1e-9)."""


@dataclass
class SpectralDensity:
    """Stochastic Lanczos quadrature estimate of an operator's spectral density.

    Attributes:
        nodes: ``(num_probes, lanczos_steps)`` float64, Ritz values per probe (units of
            the operator's eigenvalues).
        weights: ``(num_probes, lanczos_steps)`` float64, squared first components of
            the Ritz vectors; every row sums to 1.
        grid: ``(G,)`` float64, ascending eigenvalue positions of :attr:`density`.
        density: ``(G,)`` float64, the Gaussian-broadened density on ``grid``, per unit
            of :attr:`coordinate`; ``torch.trapezoid(density, coordinate)`` is 1 on the
            default grid.
        sigma: the Gaussian width, in units of :attr:`coordinate`.
        log_scale: ``False``: the coordinate is the eigenvalue itself. ``True``: the
            coordinate is ``asinh(lambda / linear_width)`` (like ``log(2 |lambda| /
            linear_width)`` with the sign kept for ``|lambda| >> linear_width``, linear
            near 0), for spectra spanning orders of magnitude (Papyan 2019).
        linear_width: scale of the log-scale coordinate (``None`` if linear).
        n: the operator's size.
        num_matvecs: operator products used.
        wall_time: seconds.
    """

    nodes: torch.Tensor
    weights: torch.Tensor
    grid: torch.Tensor
    density: torch.Tensor
    sigma: float
    log_scale: bool
    linear_width: float | None
    n: int
    num_matvecs: int
    wall_time: float
    info: dict = field(default_factory=dict)

    @property
    def coordinate(self) -> torch.Tensor:
        """The grid in the coordinate the density is per unit of."""
        return _to_coordinate(self.grid, self.linear_width)

    @property
    def num_probes(self) -> int:
        return self.nodes.shape[0]

    def moment(self, order: int) -> tuple[float, float]:
        """Estimate of ``tr(A^order) / n`` and its standard error over the probes.

        Exact per probe for ``order < 2 * lanczos_steps`` (Gauss quadrature), so the only
        error is the probes' sampling error; the standard error is ``std / sqrt(probes)``
        (NaN for a single probe).
        """
        per_probe = (self.weights * self.nodes**order).sum(dim=1)
        mean = float(per_probe.mean())
        if self.num_probes < 2:
            return mean, float("nan")
        return mean, float(per_probe.std() / math.sqrt(self.num_probes))

    def plot(self, path_or_ax=None, *, title: str | None = None, show_nodes: bool = True,
             eigenvalues=None, eigenvalue_label: str = "eigenvalues found by eigsh",
             model: str | None = None):
        """Draw the density with a logarithmic y-axis (outliers stay visible).

        Below ``1e-8`` of the peak, or a hundredth of one eigenvalue's bump
        (``1 / (n sigma sqrt(2 pi))``) if that is lower (large ``n``), the curve is not
        drawn: there the Gaussian tails of distant nodes, not the spectrum, set the
        value, and a line resting on the axis floor would read as measured density.

        Args:
            path_or_ax: a file path (the figure is written there, e.g. ``.png``/``.pdf``,
                and the path returned), a matplotlib ``Axes`` to draw into (returned), or
                ``None`` for a new figure (its ``Axes`` returned).
            title: optional axes title.
            show_nodes: mark the quadrature nodes carrying weight (at least a hundredth of
                one eigenvalue's ``1 / n``) as a rug at the bottom.
            eigenvalues: optional ``(k,)`` eigenvalues (e.g. ``EigshResult.eigenvalues``)
                drawn as dashed vertical lines, so the density's outliers can be checked
                against the solvers.
            eigenvalue_label: legend entry of those lines.
            model: named first in the caption under the title, which also states ``n``,
                probes x steps and the smoothing width ``sigma`` (what a reader needs to
                judge the picture).
        """
        ax = plot_axes(path_or_ax, "SpectralDensity.plot")
        peak = float(self.density.max())
        # One eigenvalue carries weight about 1/n, a bump of height ~1/(n sigma sqrt(2 pi)):
        # at n ~ 1e9 far below 1e-8 of the bulk's peak, so a floor fixed relative to the
        # peak hid exactly the outliers (the 1.1B Hessian's picture showed the bulk only).
        single = 1.0 / (self.n * self.sigma * math.sqrt(2 * math.pi))
        floor = min(peak * 1e-8, 1e-2 * single) if peak > 0 else 1e-12
        shown = torch.where(self.density >= floor, self.density, torch.nan).numpy()
        ax.plot(self.grid.numpy(), shown, color="C0", lw=1.4, label="SLQ density")
        ax.fill_between(self.grid.numpy(), floor, shown, where=self.density.numpy() >= floor,
                        color="C0", alpha=0.15, lw=0)
        if eigenvalues is not None:
            for i, lam in enumerate(torch.as_tensor(eigenvalues).double().flatten().tolist()):
                ax.axvline(lam, color="C2", ls="--", lw=1.0, alpha=0.8,
                           label=eigenvalue_label if i == 0 else None)
        ax.set_yscale("log")
        ax.set_ylim(floor, peak * 3 if peak > 0 else 1.0)
        if self.log_scale:
            ax.set_xscale("asinh", linear_width=self.linear_width)
        if show_nodes:
            heavy = self.weights > 1e-2 / self.n  # a hundredth of one eigenvalue's share
            nodes = self.nodes[heavy].numpy()
            ax.plot(nodes, [floor * 2] * len(nodes), "|", color="C3", ms=8, alpha=0.6,
                    label="quadrature nodes")
            # After a breakdown the later Ritz values still mark where the recurrence
            # reached (at language-model sizes, the outliers a solver finds), but the
            # probe's weight on them is not known: drawn apart, so neither is read as
            # density nor lost.
            unweighted = self.nodes[self.weights == 0].numpy()
            if len(unweighted):
                ax.plot(unweighted, [floor * 2] * len(unweighted), "|", color="0.5", ms=5,
                        alpha=0.6, label="Ritz values after breakdown (no weight)")
        ax.legend(loc="upper right", frameon=False, fontsize="small")
        ax.set_xlabel("eigenvalue $\\lambda$" + (" (asinh scale)" if self.log_scale else ""))
        unit = "$d\\,\\mathrm{asinh}(\\lambda/w)$" if self.log_scale else "$d\\lambda$"
        ax.set_ylabel(f"spectral density (per {unit})")
        ax.grid(True, which="major", alpha=0.3)
        caption = self.caption(model)
        ax.set_title(caption if title is None else f"{title}\n{caption}", fontsize="small")
        return finish_plot(ax, path_or_ax)

    def caption(self, model: str | None = None) -> str:
        """What the picture shows: model and ``n``; probes x steps, width; and, when a
        probe's rule ended early (a Lanczos breakdown: an invariant subspace, or
        couplings below the product's rounding noise), how many nodes carry weight."""
        unit = " (asinh units)" if self.log_scale else ""
        head = f"{model}, " if model else ""
        steps = self.nodes.shape[1]
        text = (f"{head}n = {self.n}\nSLQ {self.num_probes} probes x "
                f"{steps} steps, Gaussian width sigma = {self.sigma:.3g}{unit}")
        weighted = (self.weights != 0).sum(dim=1)
        if int(weighted.min()) < steps:
            lo, hi = int(weighted.min()), int(weighted.max())
            count = f"{lo}" if lo == hi else f"{lo}-{hi}"
            text += f"\nweight on {count} of {steps} nodes per probe (Lanczos breakdown)"
        return text

    def __repr__(self) -> str:
        mean, err = self.moment(1)
        return (
            f"SpectralDensity(n={self.n}, probes={self.num_probes}, "
            f"steps={self.nodes.shape[1]}, range=[{float(self.nodes.min()):.4g}, "
            f"{float(self.nodes.max()):.4g}], trace/n={mean:.4g}±{err:.2g}, "
            f"log_scale={self.log_scale})"
        )


@reports_failures
def spectral_density(
    op,
    *,
    num_probes: int = 16,
    lanczos_steps: int = 80,
    seed: int | None = None,
    grid: torch.Tensor | int | None = None,
    sigma: float | None = None,
    log_scale: bool = False,
    linear_width: float | None = None,
    probe: Distribution = "rademacher",
    probes_per_matmat: int | None = None,
) -> SpectralDensity:
    """Spectral density of a symmetric operator by stochastic Lanczos quadrature.

    Args:
        op: a torchcurv ``LinearOperator``.
        num_probes: random probes; the estimate's sampling error shrinks as
            ``1/sqrt(num_probes)``.
        lanczos_steps: Lanczos steps per probe (quadrature nodes), capped at ``n``;
            moments up to order ``2 * lanczos_steps - 1`` are exact per probe.
        seed: seeds the probes; same seed, same result on the same device. ``None``
            draws from torch's global generator (``torch.manual_seed``), like
            :func:`torchcurv.trace`; on a distributed operator rank 0's draw is
            broadcast so that every rank uses the same probes.
        grid: eigenvalue positions ``(G,)`` for the density, or a number of points; by
            default ``2001`` points, uniform in the coordinate, covering the nodes plus
            ``6 sigma`` on each side.
        sigma: Gaussian width in the coordinate's units; default ``0.005`` times the
            coordinate's node range.
        log_scale: broaden in ``asinh(lambda / linear_width)`` instead of ``lambda`` (see
            :class:`SpectralDensity`).
        linear_width: the log-scale coordinate's linear region; default ``1e-4`` times
            the largest ``|node|``.
        probe: ``"rademacher"`` (+-1 entries) or ``"gaussian"``, normalized to unit norm.
        probes_per_matmat: probes advanced together (one ``matmat`` of that many vectors
            per step); default all. The basis holds ``probes_per_matmat * lanczos_steps``
            vectors of length ``n``.
    """
    check_operator(op, "spectral_density")
    for name, value in (("num_probes", num_probes), ("lanczos_steps", lanczos_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    check_choice(probe, DISTRIBUTIONS, "probe")
    group = num_probes if probes_per_matmat is None else probes_per_matmat
    if isinstance(group, bool) or not isinstance(group, int) or group < 1:
        raise ValueError(f"probes_per_matmat must be a positive int, got {group!r}")
    if sigma is not None and not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    if linear_width is not None and not linear_width > 0:
        raise ValueError(f"linear_width must be positive, got {linear_width}")
    steps = min(lanczos_steps, op.n)

    seed = common_seed(op, seed)
    source = ProbeSource(op.n, probe, torch.float64, torch.device("cpu"), seed=seed)
    # Breakdown replacements (rare) get their own stream, so they never shift the probes.
    replacement_seed = int(torch.randint(2**62, ())) if seed is None else seed
    generator = torch.Generator().manual_seed(replacement_seed)
    begin = synchronized_clock(op.device)
    matvecs_before = op.num_matvecs
    node_list: list[torch.Tensor] = []
    weight_list: list[torch.Tensor] = []
    for first in range(0, num_probes, group):
        b = min(group, num_probes - first)
        probes = source.draw(b).T
        probes = probes / probes.norm(dim=1, keepdim=True)
        kb = KrylovBasis(op, b, steps, generator=generator)
        kb.set_rows(0, probes[:, None, :])
        kb.extend(0, steps, 1)
        negligible = noise_margin(kb.working_eps, NEGLIGIBLE_EPS) * kb.working_eps * kb.anorm
        for T in kb.T:
            theta, weight = gauss_rule(T, negligible)
            node_list.append(theta)
            weight_list.append(weight)
    nodes, weights = torch.stack(node_list), torch.stack(weight_list)
    num_matvecs = op.num_matvecs - matvecs_before
    wall_time = synchronized_clock(op.device) - begin

    if log_scale and linear_width is None:
        linear_width = LINEAR_WIDTH_FRACTION * float(nodes.abs().max())
        linear_width = linear_width if linear_width > 0 else 1.0
    width = linear_width if log_scale else None
    grid, density, sigma = broaden(nodes, weights, grid=grid, sigma=sigma, linear_width=width)
    return SpectralDensity(
        nodes=nodes, weights=weights, grid=grid, density=density, sigma=sigma,
        log_scale=log_scale, linear_width=width, n=op.n, num_matvecs=num_matvecs,
        wall_time=wall_time, info={"probe": probe, "lanczos_steps": steps,
                                   "probes_per_matmat": group},
    )


def gauss_rule(T: torch.Tensor, negligible: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes and weights of one probe's ``(m, m)`` Lanczos matrix.

    After a breakdown (a coupling ``<= negligible``: the probe's Krylov space is
    invariant and the recurrence went on with a rounding-noise or fresh direction) only
    the leading block belongs to the probe: its Ritz values carry the weights, the
    trailing block's get weight exactly 0. Splitting first keeps eigenvalues that both
    blocks share from mixing their eigenvectors (and splitting weights) in ``eigh``;
    it changes the rule by ``O(negligible)``.
    """
    couplings = torch.diagonal(T, offset=-1).abs()
    zero = (couplings <= negligible).nonzero()
    size = int(zero[0]) + 1 if zero.numel() else T.shape[0]
    theta, S = torch.linalg.eigh(T[:size, :size])
    rest = torch.linalg.eigvalsh(T[size:, size:])
    weights = torch.cat([S[0] ** 2, torch.zeros_like(rest)])
    return torch.cat([theta, rest]), weights


def broaden(
    nodes: torch.Tensor,
    weights: torch.Tensor,
    *,
    grid: torch.Tensor | int | None = None,
    sigma: float | None = None,
    linear_width: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Average of per-probe Gaussian-broadened quadrature rules on a grid.

    ``density(t) = mean_probes sum_i w_i N(t; t_i, sigma^2)`` with ``t`` the eigenvalue
    (``linear_width=None``) or ``asinh(lambda / linear_width)``. Returns the grid in
    eigenvalue units, the density per unit ``t``, and ``sigma``.
    """
    t_nodes = _to_coordinate(nodes, linear_width)
    lo, hi = float(t_nodes.min()), float(t_nodes.max())
    if sigma is None:
        sigma = SIGMA_FRACTION * (hi - lo) if hi > lo else SIGMA_FRACTION * max(abs(hi), 1.0)
    if grid is None or isinstance(grid, int):
        points = GRID_POINTS if grid is None else grid
        if points < 2:
            raise ValueError(f"grid needs at least 2 points, got {points}")
        t_grid = torch.linspace(lo - TAIL_SIGMAS * sigma, hi + TAIL_SIGMAS * sigma, points,
                                dtype=torch.float64)
        grid = _from_coordinate(t_grid, linear_width)
    else:
        grid = torch.as_tensor(grid, dtype=torch.float64).cpu()
        if grid.ndim != 1 or grid.numel() < 2 or not bool((grid[1:] > grid[:-1]).all()):
            raise ValueError("grid must be a 1-D ascending tensor of at least 2 points")
        t_grid = _to_coordinate(grid, linear_width)
    z = (t_grid[:, None] - t_nodes.reshape(1, -1)) / sigma
    kernel = torch.exp(-0.5 * z**2) / (sigma * math.sqrt(2 * math.pi))
    density = kernel @ weights.reshape(-1) / nodes.shape[0]
    return grid, density, float(sigma)


def _to_coordinate(x: torch.Tensor, linear_width: float | None) -> torch.Tensor:
    return x if linear_width is None else torch.asinh(x / linear_width)


def _from_coordinate(t: torch.Tensor, linear_width: float | None) -> torch.Tensor:
    return t if linear_width is None else linear_width * torch.sinh(t)
