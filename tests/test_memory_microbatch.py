"""A block over ``max_memory`` walked in microbatches: the whole block in one product per
call, every batch split along dim 0 and each piece weighted by its own loss terms; the
same matrix as the unsplit product, within the budget, and column sub-blocks where the
model couples the examples of a batch."""

from __future__ import annotations

import pytest
import torch
from curvature_oracles import explicit_empirical_fisher, explicit_ggn
from torch import nn
from zoo import DT, assert_unchanged, explicit_hessian, rel, snapshot

import torchcurv
from torchcurv.operators import curvature
from torchcurv.operators.memory import PeakMeter

SIZES = (240, 180, 120)  # uneven batches; the largest, 240 examples, sets a product's peak
OPERATORS = {
    "hessian/autograd": (torchcurv.HessianOperator, {"method": "autograd"}, explicit_hessian),
    "hessian/forward_over_reverse": (torchcurv.HessianOperator,
                                     {"method": "forward_over_reverse"}, explicit_hessian),
    "ggn": (torchcurv.GGNOperator, {}, explicit_ggn),
    "empirical_fisher": (torchcurv.EmpiricalFisherOperator, {}, explicit_empirical_fisher),
}


def _wide_case(reduction: str = "mean", batch_norm: bool = False):
    """Many examples through a wide hidden layer: the activations, which microbatches
    shrink, dominate a product's peak. 'mean' batches hold ignored targets, so that
    the microbatches of a batch have unequal loss-term counts."""
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(6, 64)]
    if batch_norm:
        layers.append(nn.BatchNorm1d(64))
    model = nn.Sequential(*layers, nn.Tanh(), nn.Linear(64, 3)).to(DT)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(b, 6, dtype=DT, generator=g), torch.randint(0, 3, (b,), generator=g))
            for b in SIZES]
    if reduction == "mean":
        data[0][1][:7] = -100
        data[2][1][-4:] = -100
    return model, nn.CrossEntropyLoss(reduction=reduction), data


def _peak(op, V) -> int:
    with PeakMeter(op.device) as meter:
        op.matmat(V)
    return meter.peak


def _microbatch_budget(op, V) -> int:
    """A budget that the whole block meets when walked in microbatches of a quarter of
    the largest batch, measured on an operator built with that ``microbatch_size``."""
    return int(1.1 * _peak(op.replace(max_memory=None, microbatch_size=SIZES[0] // 4), V))


def _walks(op) -> list[tuple[int, int | None]]:
    """Record ``(width, microbatch size)`` of every single product ``op`` runs."""
    seen: list[tuple[int, int | None]] = []
    product = op._product

    def recorded(V):
        planned = curvature._PLANNED_WALK.get()
        seen.append((V.shape[1], planned[1] if planned is not None else None))
        return product(V)

    op._product = recorded
    return seen


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("name", list(OPERATORS))
def test_a_block_over_budget_in_microbatches_is_the_explicit_product(name, reduction):
    cls, kw, explicit = OPERATORS[name]
    model, criterion, data = _wide_case(reduction)
    unbudgeted = cls(model, criterion, data, max_memory=None, **kw)
    V = torch.randn(unbudgeted.n, 16, dtype=DT, generator=torch.Generator().manual_seed(2))
    budget = _microbatch_budget(unbudgeted, V)
    op = unbudgeted.replace(max_memory=budget)
    assert op.batch_splitting and not unbudgeted.batch_splitting
    before = snapshot(model)
    walks = _walks(op)
    first, second = op.matmat(V), op.matmat(V)
    # the first call measures 1, 2, 4 columns on whole batches and 2, 4 on microbatches
    # of 120, then its last 3 columns; the second is one product in microbatches
    assert [w for w, _ in walks[:5]] == [1, 2, 4, 2, 4]
    assert [b for _, b in walks[:5]] == [None, None, None, 120, 120]
    plan = op.block_plan
    assert plan is not None and plan.split == "microbatches" and plan.vectors == 16
    assert walks[5][0] == 3 and walks[6:] == [(16, plan.microbatch_size)]
    assert 1 <= plan.microbatch_size < SIZES[0]
    oracle = explicit(model, criterion, data) @ V
    assert rel(first, oracle) < 1e-10 and rel(second, oracle) < 1e-10
    assert rel(second, unbudgeted.matmat(V)) < 1e-10
    assert_unchanged(model, before)


@pytest.mark.parametrize("name", ["hessian/forward_over_reverse", "ggn"])
def test_the_microbatched_peak_stays_within_the_budget_where_columns_would_fit_too(name):
    cls, kw, _ = OPERATORS[name]
    model, criterion, data = _wide_case()
    op = cls(model, criterion, data, max_memory=None, **kw)
    V = torch.randn(op.n, 16, dtype=DT, generator=torch.Generator().manual_seed(2))
    budget = _microbatch_budget(op, V)
    assert _peak(op, V) > budget  # the block does not fit as one product
    assert _peak(op, V[:, :2]) <= budget  # sub-blocks of two columns would
    B = op.replace(max_memory=budget)
    B.matmat(V)  # measures the peaks
    with PeakMeter(B.device) as meter:
        B.matmat(V)
    plan = B.block_plan
    assert plan is not None and plan.split == "microbatches" and plan.vectors == 16
    assert plan.predicted_bytes <= budget
    # the budget counts above what a product finds allocated: here the result
    assert meter.peak <= budget + V.numel() * V.element_size()


@pytest.mark.parametrize("check", [True, False])
def test_train_mode_batch_norm_keeps_column_sub_blocks_and_the_right_product(check):
    """Refused by the module check alone (``check_deterministic=False``) as well."""
    model, criterion, data = _wide_case(batch_norm=True)
    model.train()
    with pytest.warns(UserWarning, match="BatchNorm"):
        H = torchcurv.HessianOperator(model, criterion, data, max_memory=None,
                                      check_deterministic=check)
    V = torch.randn(H.n, 12, dtype=DT, generator=torch.Generator().manual_seed(2))
    whole = H.matmat(V)
    with pytest.warns(UserWarning, match="BatchNorm"):
        probe = H.replace(max_memory=1)  # learns the line from its own first columns
    probe.matmat(V)
    line = probe.memory_estimate()
    budget = line.fixed_bytes + 3 * line.per_vector_bytes
    with pytest.warns(UserWarning, match="BatchNorm"):
        B = H.replace(max_memory=budget)
    assert not B.batch_splitting
    walks = _walks(B)
    out = B.matmat(V)
    assert all(b is None for _, b in walks)  # every product on whole batches
    assert B.block_plan is not None and B.block_plan.split == "columns"
    assert B.block_plan.vectors == 3
    # the train-mode Hessian: each batch normalised with its own statistics
    per_batch = sum(explicit_hessian(model, criterion, [batch]) * (batch[1] != -100).sum()
                    for batch in data) / sum((y != -100).sum() for _, y in data)
    assert rel(out, whole) < 1e-12 and rel(out, per_batch @ V) < 1e-10


def test_coupling_that_only_the_loss_check_sees_keeps_column_sub_blocks():
    class InBatchCentering(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x - x.mean(dim=0, keepdim=True)

    _, criterion, data = _wide_case()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 64), InBatchCentering(), nn.Tanh(),
                          nn.Linear(64, 3)).to(DT)
    assert not torchcurv.GGNOperator(model, criterion, data, max_memory=10**9).batch_splitting
    unchecked = torchcurv.GGNOperator(model, criterion, data, max_memory=10**9,
                                      check_deterministic=False)
    assert unchecked.batch_splitting  # without the check, only the module checks remain


def test_the_monte_carlo_fisher_keeps_column_sub_blocks():
    """Its labels are drawn per microbatch: splitting batches would change the matrix."""
    model, criterion, data = _wide_case()
    F = torchcurv.MCFisherOperator(model, criterion, data, max_memory=1, mc_samples=2)
    assert not F.batch_splitting
    V = torch.randn(F.n, 9, dtype=DT, generator=torch.Generator().manual_seed(2))
    walks = _walks(F)
    out = F.matmat(V)
    assert all(b is None for _, b in walks)
    assert rel(out, F.replace(max_memory=None).matmat(V)) < 1e-12


def test_a_budget_below_one_example_keeps_single_column_sub_blocks():
    model, criterion, data = _wide_case()
    H = torchcurv.HessianOperator(model, criterion, data, max_memory=1,
                                  method="forward_over_reverse")
    assert H.batch_splitting
    V = torch.randn(H.n, 9, dtype=DT, generator=torch.Generator().manual_seed(2))
    walks = _walks(H)
    out = H.matmat(V)
    assert walks == [(1, None), (2, None), (4, None), (1, None), (1, None)]
    assert H.block_plan is not None and H.block_plan.split == "columns"
    assert rel(out, H.replace(max_memory=None).matmat(V)) < 1e-12


def test_a_microbatched_product_out_of_memory_halves_its_microbatch_then_gives_up():
    model, criterion, data = _wide_case()
    G = torchcurv.GGNOperator(model, criterion, data, max_memory=None)
    V = torch.randn(G.n, 16, dtype=DT, generator=torch.Generator().manual_seed(2))
    expected = G.matmat(V)
    B = G.replace(max_memory=_microbatch_budget(G, V))
    B.matmat(V)  # measures the peaks
    B.matmat(V)
    planned = B.block_plan.microbatch_size
    assert planned is not None and planned >= 2
    product = B._product

    def tight(W):  # a device on which no microbatch of `planned` examples fits
        walk = curvature._PLANNED_WALK.get()
        if walk is not None and walk[1] >= planned:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return product(W)

    def none_fits(W):  # nor any microbatch
        if curvature._PLANNED_WALK.get() is not None:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return product(W)

    before = snapshot(model)
    B._product = tight
    walks = _walks(B)
    assert rel(B.matmat(V), expected) < 1e-10
    assert [b for _, b in walks] == [planned, planned // 2]
    assert B.block_plan.microbatch_size == planned // 2
    B._product = none_fits
    walks = _walks(B)
    assert rel(B.matmat(V), expected) < 1e-10
    # halved down to one example, then sub-blocks of columns on whole batches
    assert [b for _, b in walks if b is not None] == [planned // 2 >> k for k in range(
        (planned // 2).bit_length())]
    assert B.block_plan.split == "columns"
    assert sum(w for w, b in walks if b is None) == 16
    assert_unchanged(model, before)


def test_the_microbatches_loss_term_counts_are_counted_once():
    """The first product walked in a microbatch size counts its pieces' loss terms (the
    data proven repeatable at construction); later ones reuse the counts."""
    model, criterion, data = _wide_case()
    calls = {"n": 0}

    def weight(batch):
        calls["n"] += 1
        return (batch[1] != -100).sum()

    objective = torchcurv.Objective(forward=lambda m, b: m(b[0]),
                                    loss=lambda out, b: criterion(out, b[1]), weight=weight)
    G = torchcurv.GGNOperator(model, objective, data, max_memory=None)
    V = torch.randn(G.n, 16, dtype=DT, generator=torch.Generator().manual_seed(2))
    B = G.replace(max_memory=_microbatch_budget(G, V))
    B.matmat(V)
    B.matmat(V)  # the first product in the planned microbatches: counts them
    assert B.block_plan is not None and B.block_plan.split == "microbatches"
    before = calls["n"]
    out = B.matmat(V)
    assert calls["n"] == before
    assert rel(out, explicit_ggn(model, criterion, data) @ V) < 1e-10
