"""Loss landscapes: the data set's loss on a line or a plane through the weights, beside
the second-order model the curvature predicts there.

A spectrum says which directions the curvature singles out; the landscape shows how the
loss actually changes along them (PyHessian's loss along the top Hessian eigenvector; the
1-D and 2-D surfaces of Li et al. 2018 along filter-normalised random directions), and
the quadratic model ``L0 + t g.d + t^2 d^T A d / 2`` drawn over it shows how far the
curvature describes the loss.

Everything a curvature operator defines is reused from one: the selected parameters,
the data walk with its batch weighting (``"mean"`` over unequal batches, ``"sum"``), the
data-change checks, microbatching and the distributed reductions.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from torchcurv.algorithms.arguments import check_start
from torchcurv.algorithms.assemble import as_tensor
from torchcurv.algorithms.plotting import finish_plot, plot_axes
from torchcurv.algorithms.probing import ProbeSource, check_choice
from torchcurv.distributed.reduce import all_reduce_sum, common_seed, guarded
from torchcurv.errors import NonFiniteLossError, OperatorInputError
from torchcurv.objectives import Objective
from torchcurv.operators.curvature import CurvatureOperator
from torchcurv.operators.fisher import EmpiricalFisherOperator, MCFisherOperator
from torchcurv.operators.functional import loss_and_grads
from torchcurv.operators.ggn import GGNOperator
from torchcurv.operators.hessian import HessianOperator
from torchcurv.operators.model_guard import preserved

NORMALIZATIONS = ("filter", "layer")
CURVATURES: dict[str, type[CurvatureOperator]] = {
    "hessian": HessianOperator,
    "ggn": GGNOperator,
    "ef": EmpiricalFisherOperator,
    "fisher": MCFisherOperator,
}
RANDOM = "random"

Directions = Any  # a tensor/array (n,), (n, 1), (n, 2), "random", or a sequence of those


@dataclass(frozen=True)
class LossLandscape:
    """Result of :func:`torchcurv.loss_landscape`.

    With ``k`` directions (1: a line, 2: a plane) and ``s`` steps per axis:

    Attributes:
        coordinates: ``(s,)`` float64, the step ``t`` along every direction (the same on
            both axes of a plane).
        losses: ``(s,)`` or ``(s, s)`` float64, the data set's loss at
            ``theta0 + t_i d_1`` (line) or ``theta0 + t_i d_1 + t_j d_2`` at ``[i, j]``
            (plane; ``i`` runs along the first direction).
        quadratic: the second-order model on the same grid,
            ``L0 + sum_a t_a slopes[a] + sum_ab t_a t_b curvatures[a, b] / 2``.
        loss0: ``L0``, the loss at ``theta0`` (float).
        slopes: ``(k,)`` float64, the directional derivatives ``g . d_a`` of the loss.
        curvatures: ``(k, k)`` float64, ``D^T A D`` with ``A`` the curvature operator
            (``d_a^T A d_a`` on the diagonal: the eigenvalue, for a unit eigenvector).
        directions: ``(n, k)``, the directions actually stepped along (after
            normalisation), in the parameters' dtype on their device.
        normalization: ``"filter"``, ``"layer"`` or ``None``.
        curvature: the operator's class name (``"HessianOperator"``, ...).
        num_points: grid points evaluated (``s`` or ``s^2``).
        num_passes: passes over the data the grid took (each evaluates up to
            ``points_per_pass`` points per batch).
    """

    coordinates: torch.Tensor
    losses: torch.Tensor
    quadratic: torch.Tensor
    loss0: float
    slopes: torch.Tensor
    curvatures: torch.Tensor
    directions: torch.Tensor
    normalization: str | None
    curvature: str
    num_points: int
    num_passes: int

    @property
    def ndim(self) -> int:
        """1 for a line, 2 for a plane."""
        return self.losses.ndim

    def plot(self, path_or_ax: Any = None, *, title: str | None = None) -> Any:
        """Draw the loss with the quadratic model over it.

        A line: the loss curve and the quadratic model (dashed); the y-axis covers the
        loss curve, so a quadratic that leaves it is cut off where it stops describing
        the loss. A plane: filled loss contours with the quadratic model's contours at the
        same levels (dashed) and ``theta0`` marked.

        Args:
            path_or_ax: a file path (the figure is written there and the path returned),
                a matplotlib ``Axes`` to draw into (returned), or ``None`` for a new
                figure (its ``Axes`` returned).
            title: optional axes title.
        """
        ax = plot_axes(path_or_ax, "LossLandscape.plot",
                       figsize=(6.0, 3.6) if self.ndim == 1 else (5.4, 4.4))
        t = self.coordinates.numpy()
        if self.ndim == 1:
            loss = self.losses.numpy()
            ax.plot(t, loss, color="C0", lw=1.6, label="loss")
            ax.plot(t, self.quadratic.numpy(), color="C3", lw=1.2, ls="--",
                    label="quadratic model")
            low, high = float(loss.min()), float(loss.max())
            margin = 0.15 * (high - low) if high > low else max(abs(high), 1.0) * 0.05
            ax.set_ylim(low - margin, high + margin)
            ax.axvline(0.0, color="0.6", lw=0.8)
            ax.set_xlabel("step $t$ along the direction")
            ax.set_ylabel("loss")
            ax.legend(frameon=False, fontsize="small")
        else:
            loss = self.losses.T.numpy()  # contour wants [row = y, column = x]
            levels = np.linspace(float(loss.min()), float(loss.max()), 16)
            if levels[0] == levels[-1]:
                levels = levels[:1] + np.array([-0.5, 0.5])
            filled = ax.contourf(t, t, loss, levels=levels, cmap="viridis")
            ax.contour(t, t, self.quadratic.T.numpy(), levels=levels, colors="white",
                       linewidths=0.8, linestyles="--")
            ax.plot([0.0], [0.0], "+", color="C3", ms=10, mew=1.5)
            ax.figure.colorbar(filled, ax=ax, label="loss")
            ax.set_xlabel("step along direction 1")
            ax.set_ylabel("step along direction 2")
            ax.set_aspect("equal")
        ax.grid(True, alpha=0.3)
        norm = f", {self.normalization} normalised" if self.normalization else ""
        ax.set_title(title if title is not None else
                     f"loss and {self.curvature.removesuffix('Operator')} quadratic "
                     f"model{norm}", fontsize="medium")
        return finish_plot(ax, path_or_ax)

    def __repr__(self) -> str:
        kind = "line" if self.ndim == 1 else "plane"
        t = self.coordinates
        return (
            f"LossLandscape({kind}, {len(t)} steps over [{float(t[0]):.4g}, "
            f"{float(t[-1]):.4g}], loss0={self.loss0:.6g}, loss in "
            f"[{float(self.losses.min()):.6g}, {float(self.losses.max()):.6g}], "
            f"curvature={self.curvature}, normalization={self.normalization!r})"
        )


def loss_landscape(
    model: nn.Module,
    criterion: nn.Module | Objective,
    data: Iterable[Any],
    directions: Directions,
    *,
    span: tuple[float, float] = (-1.0, 1.0),
    steps: int = 21,
    normalization: str | None = None,
    seed: int | None = None,
    curvature: str | CurvatureOperator = "hessian",
    params: Iterable[torch.Tensor] | None = None,
    param_filter: str | Sequence[str] | None = None,
    points_per_pass: int | None = None,
    **operator_options: Any,
) -> LossLandscape:
    """The data set's loss on a line or a plane through the weights, and its quadratic model.

    For directions ``d_1`` (and ``d_2``) over the selected parameters and steps ``t`` on
    ``linspace(*span, steps)``, evaluates the loss of the whole data set, weighted exactly
    as the curvature operators weigh it, at ``theta0 + t_i d_1`` (``s`` points) or
    ``theta0 + t_i d_1 + t_j d_2`` (``s^2`` points), and the second-order model from the
    gradient ``g`` and the curvature ``A`` at ``theta0``.

    Cost: one gradient and one block product ``A D`` for the quadratic model, then one
    no-grad forward per batch per grid point: the data is walked once per
    ``points_per_pass`` points (once by default) and every batch, loaded once per walk,
    is evaluated at each of those points in turn. The weights are perturbed in place and
    restored bit for bit afterwards, also on an error or ``KeyboardInterrupt``; memory is
    a copy of the selected weights plus the directions.

    Args:
        model: the network, as for :class:`~torchcurv.HessianOperator` (also a
            ``DistributedDataParallel`` model).
        criterion: a torch loss module or an :class:`~torchcurv.Objective`.
        data: a re-iterable of batches (list, ``DataLoader``); under DDP this rank's shard.
        directions: one direction (a line) or two (a plane) over the selected
            parameters: an ``(n,)``, ``(n, 1)`` or ``(n, 2)`` tensor or NumPy/CuPy array
            (eigenvectors: ``torchcurv.eigsh(H, k=1).eigenvectors``), ``"random"``, or a
            sequence of one or two of these (``[top_eigenvector, "random"]``). Random
            directions are Gaussian, scaled to unit norm (then normalised as asked).
            Used as given otherwise: ``t`` is in units of the direction's length.
            Distributed, every rank must pass the same directions.
        span: ``(low, high)``, the range of ``t`` on every axis.
        steps: grid points per axis (at least 2; an odd count around 0 contains
            ``theta0``).
        normalization: ``None`` (the directions as given), ``"filter"`` (Li et al.
            2018: in every parameter with two or more dimensions, each filter -- a slice
            along dim 0, a conv filter or a linear layer's output row -- is scaled to the
            norm of the same filter of the weights; parameters of one dimension, biases and
            normalisation scales, get a zero direction and stay fixed, as in Li et al.'s
            recommended setting) or ``"layer"`` (every parameter tensor scaled to the norm
            of its weights). The scale-invariant picture of random directions; it changes
            an eigenvector's direction, and the quadratic model then uses the normalised
            direction.
        seed: seeds the random directions: the same seed gives the same directions on
            every device. ``None``: torch's global CPU generator (``torch.manual_seed``);
            on a distributed operator rank 0's draw is broadcast.
        curvature: the ``A`` of the quadratic model: ``"hessian"`` (default), ``"ggn"``,
            ``"ef"`` (empirical Fisher), ``"fisher"`` (Monte-Carlo Fisher), or an operator
            already built on this ``model``, ``criterion`` and ``data`` (its parameter
            selection and options are used; ``params``, ``param_filter`` and
            ``operator_options`` must then be left out).
        params: the parameters the directions move (default: all that require grad),
            as for the operators; the others stay fixed.
        param_filter: glob(s) on parameter names selecting a subset of them.
        points_per_pass: grid points evaluated per walk over the data (default: all).
            Distributed, each walk ends in one all-reduce of its points' losses.
        **operator_options: passed to the operator ``curvature`` names
            (``check_deterministic``, ``microbatch_size``, ``distributed``,
            ``process_group``, ``method``, ...).

    Returns:
        :class:`LossLandscape`.

    Raises:
        OperatorInputError: a direction of the wrong shape, with NaN/inf entries, or zero
            (also after normalisation).
        NonFiniteLossError: the loss is NaN or infinite at some grid point (the message
            names it; a smaller ``span`` avoids it).

    Example::

        H = torchcurv.HessianOperator(model, criterion, data)
        top = torchcurv.eigsh(H, k=1).eigenvectors[:, 0]
        scape = torchcurv.loss_landscape(model, criterion, data, top, curvature=H,
                                         span=(-0.5, 0.5))
        scape.plot("top-eigenvector.png")
    """
    coordinates = _coordinates(span, steps)
    chunk = _points_per_pass(points_per_pass)
    if normalization is not None:
        check_choice(normalization, NORMALIZATIONS, "normalization")
    op = _curvature_operator(model, criterion, data, curvature, params, param_filter,
                             operator_options)
    if op.fsdp:
        raise ValueError(
            "loss_landscape perturbs the weights in place and cannot do so on an FSDP2-"
            "sharded model; compute the landscape on an unsharded (e.g. DDP) copy"
        )
    with guarded(op):
        D = _directions(directions, op, normalization, seed)
        k = D.shape[1]
        grid = _grid_points(coordinates, k)
        loss0, slopes = _loss_and_slopes(op, D)
        AD = op.matmat(D)
        curv = D.double().T @ AD.double()
        curv = ((curv + curv.T) / 2).cpu()
        losses, passes = _grid_losses(op, D, grid, chunk)
    quadratic = loss0 + grid @ slopes + 0.5 * ((grid @ curv) * grid).sum(dim=1)
    shape = (len(coordinates),) * k
    return LossLandscape(
        coordinates=coordinates,
        losses=losses.reshape(shape),
        quadratic=quadratic.reshape(shape),
        loss0=loss0,
        slopes=slopes,
        curvatures=curv,
        directions=D,
        normalization=normalization,
        curvature=type(op).__name__,
        num_points=grid.shape[0],
        num_passes=passes,
    )


# -- arguments -----------------------------------------------------------------------
def _coordinates(span: tuple[float, float], steps: int) -> torch.Tensor:
    try:
        low, high = (float(x) for x in span)
    except (TypeError, ValueError) as err:
        raise ValueError(f"span must be a pair (low, high) of numbers, got {span!r}") from err
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(f"span must be finite with low < high, got {span!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ValueError(f"steps must be an int >= 2, got {steps!r}")
    return torch.linspace(low, high, steps, dtype=torch.float64)


def _points_per_pass(points_per_pass: int | None) -> int | None:
    if points_per_pass is not None and (
            isinstance(points_per_pass, bool) or not isinstance(points_per_pass, int)
            or points_per_pass < 1):
        raise ValueError(f"points_per_pass must be a positive int or None, got "
                         f"{points_per_pass!r}")
    return points_per_pass


def _curvature_operator(model, criterion, data, curvature, params, param_filter,
                        options) -> CurvatureOperator:
    """The operator of the quadratic model; its data walk and selection serve the grid."""
    if isinstance(curvature, CurvatureOperator):
        given = [name for name, value in (("params", params), ("param_filter", param_filter))
                 if value is not None] + sorted(options)
        if given:
            raise ValueError(
                f"curvature is an operator, which brings its own parameter selection and "
                f"options; leave out {', '.join(given)}"
            )
        inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) \
            else model
        same_criterion = curvature.objective is criterion or \
            curvature.objective.criterion is criterion
        if curvature.model is not inner or curvature.data is not data or not same_criterion:
            raise ValueError(
                "curvature is an operator built on another model, criterion or data than "
                "the ones passed; build it on the same objects (or pass its name, e.g. "
                "curvature='hessian')"
            )
        return curvature
    if not isinstance(curvature, str):
        raise TypeError(
            f"curvature must be one of {', '.join(CURVATURES)} or a torchcurv curvature "
            f"operator, got {type(curvature).__name__}"
        )
    check_choice(curvature, tuple(CURVATURES), "curvature")
    return CURVATURES[curvature](model, criterion, data, params=params,
                                 param_filter=param_filter, **options)


def _directions(directions: Directions, op: CurvatureOperator, normalization: str | None,
                seed: int | None) -> torch.Tensor:
    """The ``(n, k)`` directions, normalised, in the operator's dtype on its device."""
    if isinstance(directions, str):
        entries = [directions]
    elif isinstance(directions, (torch.Tensor, np.ndarray)) or hasattr(directions,
                                                                       "__dlpack__"):
        t = as_tensor(directions)
        columns = t.shape[1] if t.ndim == 2 else 1
        if columns not in (1, 2):
            raise OperatorInputError(
                f"directions has shape {tuple(t.shape)}: give one direction (a line) or two "
                f"(a plane), of shape ({op.n},) or ({op.n}, 2); for eigenvectors pick "
                "columns, e.g. result.eigenvectors[:, -1] (the largest eigenvalue's)"
            )
        entries = list(check_start(t, op.n, columns, "directions").T)
    elif isinstance(directions, Sequence):
        entries = list(directions)
    else:
        raise TypeError(
            "directions must be a tensor or array of shape (n,), (n, 1) or (n, 2), "
            f"'random', or a sequence of one or two of those; got {type(directions).__name__}"
        )
    if not 1 <= len(entries) <= 2:
        raise OperatorInputError(
            f"got {len(entries)} directions: give one (a line) or two (a plane)")
    if any(isinstance(e, str) for e in entries):
        source = ProbeSource(op.n, "gaussian", torch.float64, op.device,
                             seed=common_seed(op, seed))
    vectors = []
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            if entry != RANDOM:
                raise ValueError(f"directions[{i}] is {entry!r}; the only named direction "
                                 f"is {RANDOM!r}")
            d = source.draw(1)[:, 0]
            d = d / d.norm()
        else:
            d = check_start(entry, op.n, 1, f"directions[{i}]")[:, 0].to(op.device)
        if normalization is not None:
            d = _normalized(d, op.params, normalization)
            if not bool(d.any()):
                raise OperatorInputError(
                    f"directions[{i}] is zero after {normalization} normalisation: it moves "
                    "only parameters that normalisation leaves fixed (biases and other 1-D "
                    "parameters, for 'filter') or weights that are zero"
                )
        vectors.append(d)
    return torch.stack(vectors, dim=1).to(op.dtype)


def _normalized(d: torch.Tensor, params: Sequence[torch.Tensor], how: str) -> torch.Tensor:
    """``d`` (float64 ``(n,)``) rescaled per filter or per parameter to the weights' norms.

    A filter or parameter where ``d`` is zero stays zero (nothing to rescale).
    """
    pieces = []
    for piece, p in zip(d.split([p.numel() for p in params]), params):
        w = p.detach().to(torch.float64)
        if how == "filter" and p.ndim <= 1:
            pieces.append(torch.zeros_like(piece))
            continue
        rows = 1 if how == "layer" else p.shape[0]
        dn = piece.reshape(rows, -1).norm(dim=1, keepdim=True)
        wn = w.reshape(rows, -1).norm(dim=1, keepdim=True)
        scale = torch.where(dn > 0, wn / dn.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
        pieces.append((piece.reshape(rows, -1) * scale).reshape(-1))
    return torch.cat(pieces)


def _grid_points(coordinates: torch.Tensor, k: int) -> torch.Tensor:
    """``(s^k, k)`` float64 steps, the last axis varying fastest (row-major ``(s, s)``)."""
    if k == 1:
        return coordinates[:, None]
    a, b = torch.meshgrid(coordinates, coordinates, indexing="ij")
    return torch.stack([a.reshape(-1), b.reshape(-1)], dim=1)


# -- passes over the data --------------------------------------------------------------
def _direction_pieces(D: torch.Tensor, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``D`` (n, k) per parameter as ``(k, *shape)``."""
    k = D.shape[1]
    return [c.T.reshape(k, *p.shape) for c, p in
            zip(D.split([p.numel() for p in params], dim=0), params)]


def _loss_and_slopes(op: CurvatureOperator, D: torch.Tensor) -> tuple[float, torch.Tensor]:
    """``L0`` and ``g . d_a`` from one gradient pass (one all-reduce of ``k + 1`` numbers)."""
    pieces = _direction_pieces(D, op.params)
    local = torch.zeros(1 + D.shape[1], dtype=torch.float64, device=op.device)
    with preserved(op.model):
        for _, batch, scale in op._batches():
            loss, grads = loss_and_grads(op.model, op.objective, batch, scale, op.params)
            local[0] += scale * loss.detach().double()
            for g, d in zip(grads, pieces):
                local[1:] += (d.double() * g.double()).reshape(D.shape[1], -1).sum(dim=1)
    total = all_reduce_sum(local, op.process_group) if op.distributed else local
    total = total.cpu()
    if not bool(torch.isfinite(total[0])):
        raise NonFiniteLossError(f"the loss at theta0 is {float(total[0])}")
    return float(total[0]), total[1:]


def _grid_losses(op: CurvatureOperator, D: torch.Tensor, grid: torch.Tensor,
                 chunk: int | None) -> tuple[torch.Tensor, int]:
    """The data set's loss at ``theta0 + D c`` for every row ``c`` of ``grid``.

    Batches outside, points inside: each walk over the data loads a batch once and
    evaluates it at ``chunk`` points, setting the weights to each point in place
    (``theta0 + sum_a c_a d_a``, from a copy of ``theta0``, so no rounding accumulates
    from point to point). Returns ``(P,)`` float64 on the CPU and the number of walks.
    """
    P = grid.shape[0]
    chunk = P if chunk is None else chunk
    pieces = _direction_pieces(D, op.params)
    along = [[d[a] for d in pieces] for a in range(D.shape[1])]  # per direction
    params: list[torch.Tensor] = list(op.params)
    losses, passes = [], 0
    with preserved(op.model, params), torch.no_grad():
        origin = [p.detach().clone() for p in params]
        for start in range(0, P, chunk):
            points = grid[start:start + chunk].tolist()
            local = torch.zeros(len(points), dtype=torch.float64, device=op.device)
            for _, batch, scale in op._batches():
                values = []
                for c in points:
                    # multi-tensor kernels: a few launches per point, not a few per
                    # parameter tensor (hundreds in a transformer)
                    torch._foreach_copy_(params, origin)
                    for a, direction in zip(c, along):
                        torch._foreach_add_(params, direction, alpha=a)
                    values.append(op.objective(op.model, batch).detach().reshape(()))
                local += scale * torch.stack(values).double()
            passes += 1
            total = all_reduce_sum(local, op.process_group) if op.distributed else local
            losses.append(total.cpu())
            _check_finite(losses[-1], grid[start:start + chunk])
    return torch.cat(losses), passes


def _check_finite(losses: torch.Tensor, points: torch.Tensor) -> None:
    bad = (~torch.isfinite(losses)).nonzero().flatten().tolist()
    if bad:
        where = ", ".join(f"{x:.4g}" for x in points[bad[0]].tolist())
        raise NonFiniteLossError(
            f"the loss is {float(losses[bad[0]])} at step ({where}) "
            f"({len(bad)} such grid point(s) in this pass); the landscape is undefined "
            "there: use a smaller span"
        )
