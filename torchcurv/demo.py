"""The embedded default problem of ``torchcurv demo``: no downloads, seconds on a CPU.

A small MLP (20-32-32-5, tanh, ~2k parameters) trained briefly on a synthetic
five-class Gaussian mixture, so its Hessian has the outlier structure of real networks
(a few large eigenvalues, about one per class, above a bulk near zero).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, cast

import torch
from torch import nn

if TYPE_CHECKING:
    from torchcurv.algorithms.compare import BackendComparison
    from torchcurv.algorithms.eigsh import EigshBackend

NUM_CLASSES = 5


def synthetic_classification(
    num_samples: int = 1024, dim: int = 20, seed: int = 0, dtype=torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Five overlapping Gaussian clusters in ``dim`` dimensions: ``X (N, dim)``, ``y (N,)``."""
    g = torch.Generator().manual_seed(seed)
    centres = 0.6 * torch.randn(NUM_CLASSES, dim, generator=g)  # overlapping: loss stays > 0
    y = torch.randint(0, NUM_CLASSES, (num_samples,), generator=g)
    X = centres[y] + torch.randn(num_samples, dim, generator=g)
    return X.to(dtype), y


def trained_mlp(
    X: torch.Tensor, y: torch.Tensor, steps: int = 40, seed: int = 0
) -> nn.Module:
    """A 20-32-32-5 tanh MLP after ``steps`` full-batch Adam steps (float32), in eval mode."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(X.shape[1], 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
        nn.Linear(32, NUM_CLASSES),
    )
    X = X.float()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model(X), y).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return model.eval()


def demo_problem(
    batch_size: int = 256, seed: int = 0, dtype=torch.float64, device: str = "cpu",
    num_samples: int = 1024,
) -> tuple[nn.Module, nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    """``(model, criterion, data)`` of the demo, on ``device`` in ``dtype``: ``num_samples``
    samples in batches of ``batch_size``."""
    X, y = synthetic_classification(num_samples=num_samples, seed=seed, dtype=dtype)
    model = trained_mlp(X, y, seed=seed).to(device, dtype)
    data = [
        (X[i : i + batch_size].to(device), y[i : i + batch_size].to(device))
        for i in range(0, len(X), batch_size)
    ]
    return model, nn.CrossEntropyLoss(), data


def demo_convergence(
    path_or_ax: Any = None,
    *,
    matrix: Literal["Hessian", "GGN"] = "Hessian",
    k: int = 5,
    tol: float = 1e-8,
    seed: int = 0,
    device: str = "cpu",
    num_samples: int = 1024,
    batch_size: int = 256,
) -> tuple[BackendComparison, Any]:
    """Every backend that can run here on the demo's ``matrix`` (top ``k``, ``which='LA'``)
    and the convergence plot of their residuals against products (docs/img's
    ``demo-convergence.png``): :func:`~torchcurv.compare_backends` over
    :func:`~torchcurv.runnable_backends`, the others named in the legend.

    ``tol`` defaults to 1e-8, tighter than the demo's eigenvalue tables, so that the
    curves show several restarts. Cost: one solve per backend, a few seconds on a CPU.
    Returns ``(comparison, what plot_convergence returned)``; needs matplotlib.
    """
    from torchcurv.algorithms.compare import (
        compare_backends,
        plot_convergence,
        runnable_backends,
    )
    from torchcurv.algorithms.plotting import plot_axes
    from torchcurv.operators.ggn import GGNOperator
    from torchcurv.operators.hessian import HessianOperator

    plot_axes(path_or_ax, "demo_convergence")  # no matplotlib: fail before the solves
    cls = {"Hessian": HessianOperator, "GGN": GGNOperator}.get(matrix)
    if cls is None:
        raise ValueError(f"matrix must be 'Hessian' or 'GGN', got {matrix!r}")
    model, criterion, data = demo_problem(batch_size=batch_size, seed=seed, device=device,
                                          num_samples=num_samples)
    op = cls(model, criterion, data)
    names, reasons = runnable_backends(op, "LA")
    comparison = compare_backends(op, k=k, which="LA", tol=tol, seed=seed,
                                  backends=cast("list[EigshBackend]", names))
    not_run = {row.backend: row.error or "" for row in comparison.rows if row.result is None}
    title = f"demo MLP 20-32-32-5 {matrix} (n = {op.n}): top {k} eigenpairs"
    picture = plot_convergence([row.result for row in comparison.rows if row.result],
                               path_or_ax, not_run={**not_run, **reasons}, title=title)
    return comparison, picture
