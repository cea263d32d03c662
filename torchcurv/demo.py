"""The embedded default problem of ``torchcurv demo``: no downloads, seconds on a CPU.

A small MLP (20-32-32-5, tanh, ~2k parameters) trained briefly on a synthetic
five-class Gaussian mixture, so its Hessian has the outlier structure of real networks
(a few large eigenvalues, about one per class, above a bulk near zero).
"""

from __future__ import annotations

import torch
from torch import nn

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
