"""Small float64 models, data and explicit oracles shared by the tests.

Each case is ``(model, criterion, data)`` with unequal batch sizes; the oracle builds the
loss of the concatenated data as one batch and differentiates it with plain autograd
(``torch.autograd.functional``, no ``torch.func`` transform with a vmap inside, which is
wrong through LayerNorm in torch 2.13).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

DT = torch.float64


class SequenceTagger(nn.Module):
    """Token-level classifier with logits of shape ``(B*T, C)``."""

    def __init__(self, vocab: int = 5, dim: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.norm(torch.tanh(self.mix(self.embed(tokens))))
        return self.head(h).flatten(0, 1)


def _cnn_bn() -> nn.Module:
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)
    )
    bn = model[1]
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


def make_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    act = {"mlp_tanh": nn.Tanh, "mlp_silu": nn.SiLU, "mlp_gelu": nn.GELU}
    if name in act:
        model = nn.Sequential(nn.Linear(4, 5), act[name](), nn.Linear(5, 3))
    elif name == "layernorm":
        model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3))
    elif name == "cnn_bn":
        model = _cnn_bn()
    elif name == "sequence":
        model = SequenceTagger()
    else:
        raise KeyError(name)
    return model.to(DT)


MODELS = ["mlp_tanh", "mlp_silu", "mlp_gelu", "layernorm", "cnn_bn", "sequence"]
LOSSES = ["ce", "mse", "bce"]


def make_criterion(loss: str, reduction: str = "mean") -> nn.Module:
    return {
        "ce": nn.CrossEntropyLoss,
        "mse": nn.MSELoss,
        "bce": nn.BCEWithLogitsLoss,
    }[loss](reduction=reduction)


def make_data(model_name: str, loss: str, sizes=(5, 3, 2), seed: int = 1) -> list:
    """Batches of unequal size for ``model_name`` with targets fitting ``loss``."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for b in sizes:
        if model_name == "cnn_bn":
            x = torch.randn(b, 1, 6, 6, generator=g, dtype=DT)
            rows = b
        elif model_name == "sequence":
            x = torch.randint(0, 5, (b, 2), generator=g)
            rows = 2 * b
        else:
            x = torch.randn(b, 4, generator=g, dtype=DT)
            rows = b
        if loss == "ce":
            y = torch.randint(0, 3, (rows,), generator=g)
        elif loss == "mse":
            y = torch.randn(rows, 3, generator=g, dtype=DT)
        else:
            y = torch.rand(rows, 3, generator=g, dtype=DT)
        batches.append((x, y))
    return batches


def case(model_name: str, loss: str = "ce", reduction: str = "mean", sizes=(5, 3, 2)):
    return make_model(model_name), make_criterion(loss, reduction), make_data(
        model_name, loss, sizes
    )


def full_loss_fn(model: nn.Module, criterion: nn.Module, data: list, params=None):
    """``theta -> criterion(model(cat X), cat y)`` on a flat vector of ``params``."""
    named = dict(model.named_parameters())
    chosen = list(params) if params is not None else [p for p in named.values()]
    names = [n for n, p in named.items() if any(p is q for q in chosen)]
    shapes = [named[n].shape for n in names]
    sizes = [named[n].numel() for n in names]
    X = torch.cat([x for x, _ in data])
    y = torch.cat([t for _, t in data])

    def f(theta: torch.Tensor) -> torch.Tensor:
        d = {n: t.view(s) for n, t, s in zip(names, theta.split(sizes), shapes)}
        return criterion(functional_call(model, d, (X,)), y)

    theta0 = torch.cat([named[n].detach().reshape(-1) for n in names])
    return f, theta0


def explicit_hessian(model, criterion, data, params=None) -> torch.Tensor:
    f, theta = full_loss_fn(model, criterion, data, params)
    return torch.autograd.functional.hessian(f, theta)


def explicit_gradient(model, criterion, data, params=None) -> tuple:
    f, theta = full_loss_fn(model, criterion, data, params)
    return f, theta


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def snapshot(model: nn.Module) -> dict:
    """Everything that must come back bit-identical after any torchcurv call."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "grads": {n: (None if p.grad is None else p.grad.clone()) for n, p in
                  model.named_parameters()},
        "grad_ids": {n: id(p.grad) for n, p in model.named_parameters()},
        "modes": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), f"{k} changed"
    for n, g in before["grads"].items():
        assert (g is None) == (after["grads"][n] is None), f"{n}.grad appeared/vanished"
        if g is not None:
            assert torch.equal(after["grads"][n], g), f"{n}.grad changed"
    assert after["grad_ids"] == before["grad_ids"], ".grad objects were replaced"
    assert after["modes"] == before["modes"], "train/eval modes changed"
    assert after["requires_grad"] == before["requires_grad"]
