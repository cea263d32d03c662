"""Explicit GGN / empirical-Fisher matrices by plain autograd on the whole data set.

The data set is concatenated into one batch, ``J`` is built with
``torch.autograd.functional.jacobian`` and the loss Hessian with
``torch.autograd.functional.hessian`` (no ``torch.func`` transform, which is wrong
through LayerNorm in torch 2.13).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call


def _flat(model: nn.Module, params=None):
    named = dict(model.named_parameters())
    chosen = list(params) if params is not None else list(named.values())
    names = [n for n, p in named.items() if any(p is q for q in chosen)]
    return names, [named[n] for n in names]


def explicit_jacobian(model: nn.Module, X: torch.Tensor, params=None):
    """``(output, J)`` with ``J`` of shape ``(output.numel(), n)``."""
    names, ps = _flat(model, params)
    shapes = [p.shape for p in ps]
    sizes = [p.numel() for p in ps]
    theta = torch.cat([p.detach().reshape(-1) for p in ps])

    def f(t):
        d = {n: c.view(s) for n, c, s in zip(names, t.split(sizes), shapes)}
        return functional_call(model, d, (X,))

    output = f(theta).detach()
    J = torch.autograd.functional.jacobian(f, theta)
    return output, J.reshape(output.numel(), -1)


def concatenated(data):
    return torch.cat([x for x, _ in data]), torch.cat([y for _, y in data])


def explicit_ggn(model, criterion, data, params=None) -> torch.Tensor:
    X, y = concatenated(data)
    output, J = explicit_jacobian(model, X, params)
    H = torch.autograd.functional.hessian(lambda f: criterion(f, y), output)
    d = output.numel()
    return J.T @ H.reshape(d, d) @ J


def sample_rows(criterion, output: torch.Tensor) -> torch.Tensor:
    """Index ``(R, K)`` of output entries per sample (class axis 1 for CE, else last)."""
    idx = torch.arange(output.numel()).reshape(output.shape)
    if isinstance(criterion, nn.CrossEntropyLoss):
        idx = idx.movedim(1, -1)
    return idx.reshape(-1, idx.shape[-1])


def explicit_empirical_fisher(model, criterion, data, params=None) -> torch.Tensor:
    """``c sum_r ∇s_r ∇s_rᵀ`` with ``s_r`` the summed loss of sample ``r``.

    ``∇s_r`` is computed one sample at a time from the ``sum``-reduced criterion on that
    sample alone; ``c`` is 1 / (loss terms) for ``mean``.
    """
    X, y = concatenated(data)
    output, J = explicit_jacobian(model, X, params)
    summed = type(criterion)(**_criterion_kwargs(criterion, "sum"))
    rows = sample_rows(criterion, output)
    point = output.detach().requires_grad_(True)
    grads = []
    for r in range(rows.shape[0]):
        # the loss restricted to one sample: every other sample's terms masked out
        mask = torch.zeros(output.numel(), dtype=output.dtype)
        mask[rows[r]] = 1
        masked = point.reshape(-1) * mask + (point.reshape(-1) * (1 - mask)).detach()
        loss = _sample_loss(summed, masked.reshape(output.shape), y, rows, r, criterion)
        (g,) = torch.autograd.grad(loss, point)
        grads.append(J.T @ g.reshape(-1))
    G = torch.stack(grads, dim=1)
    c = 1.0 if criterion.reduction == "sum" else 1.0 / _num_terms(criterion, y)
    return c * G @ G.T


def _criterion_kwargs(criterion, reduction):
    keys = {
        nn.CrossEntropyLoss: ("weight", "ignore_index", "label_smoothing"),
        nn.MSELoss: (),
        nn.BCEWithLogitsLoss: ("weight", "pos_weight"),
    }[type(criterion)]
    kwargs = {k: getattr(criterion, k) for k in keys}
    return {**kwargs, "reduction": reduction}


def _sample_loss(summed, output, y, rows, r, criterion):
    if isinstance(criterion, nn.CrossEntropyLoss):
        keep = torch.zeros(rows.shape[0], dtype=torch.bool)
        keep[r] = True
        t = y.reshape(-1).clone()
        t[~keep] = criterion.ignore_index
        return summed(output, t.reshape(y.shape))
    return summed(output, y) * 1.0  # gradient of other samples' terms is cut by the mask


def _num_terms(criterion, y):
    if isinstance(criterion, nn.CrossEntropyLoss):
        keep = y != criterion.ignore_index
        if criterion.weight is None:
            return float(keep.sum())
        return float(criterion.weight[y[keep]].sum())
    return float(y.numel())
