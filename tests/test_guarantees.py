"""On one process: data that changes after construction is noticed, and the model comes
back bit-identical, module attributes included."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from zoo import case

import torchcurv

DT = torch.float64
OPERATORS = [
    lambda m, c, d, **kw: torchcurv.HessianOperator(m, c, d, **kw),
    lambda m, c, d, **kw: torchcurv.HessianOperator(m, c, d, method="finite_difference", **kw),
    lambda m, c, d, **kw: torchcurv.GGNOperator(m, c, d, **kw),
    lambda m, c, d, **kw: torchcurv.EmpiricalFisherOperator(m, c, d, **kw),
    lambda m, c, d, **kw: torchcurv.MCFisherOperator(m, c, d, seed=0, **kw),
]


class Exhausting:
    """A loader that yields its batches for ``passes`` calls of ``iter`` (construction
    calls it once to refuse one-shot iterators), then nothing."""

    def __init__(self, batches, passes):
        self.batches, self.passes = batches, passes

    def __iter__(self):
        self.passes -= 1
        return iter(self.batches if self.passes >= 0 else [])


@pytest.mark.parametrize("make", OPERATORS)
@pytest.mark.parametrize("check", [True, False])
def test_exhausted_or_shortened_loader_raises(make, check):
    model, criterion, data = case("mlp_tanh", "ce")
    batches = list(data)
    op = make(model, criterion, batches, check_deterministic=check)
    v = torch.ones(op.n, dtype=DT)
    batches.pop()  # a loader that drops a batch
    with pytest.raises(torchcurv.DataChangedError, match="batches, not"):
        op @ v
    batches.clear()  # an exhausted loader: the product would be all zero
    with pytest.raises(torchcurv.DataChangedError, match="0 batches"):
        op @ v


@pytest.mark.parametrize("check", [True, False])
def test_changed_batch_sizes_or_loss_terms_raise(check):
    model, criterion, data = case("mlp_tanh", "ce")
    batches = list(data)
    op = torchcurv.GGNOperator(model, criterion, batches, check_deterministic=check)
    x, y = batches[0]
    batches[0] = (x[:-1], y[:-1])
    with pytest.raises(torchcurv.DataChangedError, match="batch 0 with shapes"):
        op @ torch.ones(op.n, dtype=DT)
    # same shapes, fewer loss terms (targets now ignored): seen where counts are computed
    batches[0] = (x, torch.full_like(y, -100))
    unchecked = torchcurv.GGNOperator(model, criterion, list(data), check_deterministic=False)
    unchecked.data[0] = batches[0]
    with pytest.raises(torchcurv.DataChangedError, match="loss terms"):
        unchecked @ torch.ones(op.n, dtype=DT)


def test_loader_empty_on_a_later_construction_pass_is_named():
    model, criterion, data = case("mlp_tanh", "ce")
    with pytest.raises(torchcurv.DataChangedError, match="no batch on a later pass"):
        torchcurv.HessianOperator(model, criterion, Exhausting(list(data), passes=3))


class Counting(nn.Module):
    """Rebinds a buffer, registers a new one and sets attributes in ``forward``."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))
        self.cache = torch.zeros(2)
        self.calls = 0

    def forward(self, x):
        self.steps = self.steps + 1  # rebinds the buffer (a new tensor)
        self.cache = self.cache + 1  # a plain tensor attribute rebound
        self.calls += 1
        self.last = x.shape[0]
        if "seen" not in self._buffers:
            self.register_buffer("seen", torch.ones(()))
        return self.net(x)


@pytest.mark.parametrize("make", OPERATORS)
def test_module_attributes_restored(make):
    torch.manual_seed(0)
    model = Counting().double()
    data = [(torch.randn(5, 4, dtype=DT), torch.randint(0, 3, (5,))) for _ in range(2)]
    steps, cache = model.steps, model.cache
    op = make(model, nn.CrossEntropyLoss(), data)
    op @ torch.ones(op.n, dtype=DT)
    assert model.steps is steps and int(steps) == 0
    assert model.cache is cache and torch.equal(cache, torch.zeros(2, dtype=cache.dtype))
    assert model.calls == 0 and not hasattr(model, "last")
    assert list(model._buffers) == ["steps"]


def test_tensor_attribute_changed_in_place_is_restored():
    # torch.func refuses in-place writes to captured tensors (a clear error), so this is a
    # reverse-mode path's guarantee
    torch.manual_seed(0)
    data = [(torch.randn(5, 4, dtype=DT), torch.randint(0, 3, (5,)))]

    class InPlace(Counting):
        def forward(self, x):
            self.cache.add_(1.0)
            return self.net(x)

    model = InPlace().double()
    cache = model.cache
    op = torchcurv.HessianOperator(model, nn.CrossEntropyLoss(), data)
    op @ torch.ones(op.n, dtype=DT)
    assert model.cache is cache and torch.equal(cache, torch.zeros(2, dtype=cache.dtype))
