"""Blocks bounded by memory: ``max_memory=`` splits a block product into sub-blocks that
fit, ``memory_estimate(m)`` predicts a product's peak from measured products, and
neither changes a single number of the product."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from zoo import DT, assert_unchanged, case, explicit_hessian, rel, snapshot

import torchcurv
from torchcurv.operators.memory import MemoryEstimate, MicrobatchMemory, PeakMeter, basis_bytes


def _sub_blocks(op) -> list[int]:
    """Record the width of every single product ``op`` runs from now on."""
    widths: list[int] = []
    product = op._product

    def counted(V, *inputs):
        widths.append(V.shape[1])
        return product(V, *inputs)

    op._product = counted
    return widths


def _wide_mlp_case():
    """A model whose per-vector memory is large next to its parameters (wide hidden
    layer, many examples), so that the line of a block's peak is steep."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 64), nn.Tanh(), nn.Linear(64, 3)).to(DT)
    data = [(torch.randn(200, 6, dtype=DT), torch.randint(0, 3, (200,))) for _ in range(2)]
    return model, nn.CrossEntropyLoss(), data


@pytest.mark.parametrize("method", ["autograd", "finite_difference"])
def test_a_budgeted_block_is_the_same_product_in_sub_blocks(method):
    model, criterion, data = case("mlp_tanh")
    H = torchcurv.HessianOperator(model, criterion, data, method=method)
    tight = H.replace(max_memory=1)  # one byte: every sub-block a single vector
    V = torch.randn(H.n, 9, dtype=DT, generator=torch.Generator().manual_seed(3))
    whole = H.replace(max_memory=None).matmat(V)
    widths = _sub_blocks(tight)
    split = tight.matmat(V)
    tol = 1e-12 if method == "autograd" else 1e-7
    assert rel(split, whole) < tol
    assert rel(split, explicit_hessian(model, criterion, data) @ V) < max(tol, 1e-12)
    # 9 columns: calibration sub-blocks of 1, 2 and 4, then single vectors (2)
    assert widths == [1, 2, 4, 1, 1]
    assert tight.num_calls == 1 and tight.num_matvecs == 9  # one call of the user's
    assert [size for size, _ in tight.memory_estimate().measured] == [1, 2, 4]


def test_without_a_budget_a_block_is_one_product():
    model, criterion, data = case("mlp_tanh")
    H = torchcurv.HessianOperator(model, criterion, data, max_memory=None)
    widths = _sub_blocks(H)
    H.matmat(torch.randn(H.n, 6, dtype=DT))
    # off CUDA, "auto" has no device memory to read and does not split either
    auto = torchcurv.HessianOperator(model, criterion, data)
    assert auto.config.max_memory == "auto"
    widths_auto = _sub_blocks(auto)
    auto.matmat(torch.randn(H.n, 6, dtype=DT))
    assert widths == widths_auto == [6]


def test_a_budget_picks_sub_blocks_from_the_measured_line():
    model, criterion, data = _wide_mlp_case()
    # a loss without a loss-term count: batches cannot be split, blocks go in columns
    unweighted = torchcurv.Objective.from_loss_fn(lambda m, b: criterion(m(b[0]), b[1]))
    H = torchcurv.HessianOperator(model, unweighted, data, max_memory=None)
    V = torch.randn(H.n, 14, dtype=DT)
    # the line that a budgeted product learns from its own first columns
    probe = H.replace(max_memory=1)
    probe.matmat(V)
    line = probe.memory_estimate()
    assert line.per_vector_bytes > 0
    budget = line.fixed_bytes + 3 * line.per_vector_bytes + line.per_vector_bytes // 2
    assert line.max_vectors(budget) == 3
    B = H.replace(max_memory=budget)
    assert not B.batch_splitting
    widths = _sub_blocks(B)
    out = B.matmat(V)
    assert widths == [1, 2, 4, 3, 3, 1]  # learning on 1 + 2 + 4 columns, then 3 at most
    assert B.block_plan is not None and B.block_plan.split == "columns"
    assert B.block_plan.vectors == 3
    assert rel(out, H.matmat(V)) < 1e-12


def test_the_estimate_predicts_a_measured_block_peak_within_a_quarter():
    model, criterion, data = _wide_mlp_case()
    H = torchcurv.HessianOperator(model, criterion, data)
    predicted = H.memory_estimate(12)
    V = torch.randn(H.n, 12, dtype=DT)
    with PeakMeter(H.device) as meter:
        H.matmat(V)
    assert abs(predicted.bytes - meter.peak) <= 0.25 * meter.peak
    # one-vector products are answered by their own measurement
    assert H.memory_estimate(1).bytes == dict(predicted.measured)[1]


def test_estimating_costs_uncounted_products_once_and_leaves_the_model_untouched():
    model, criterion, data = case("layernorm")
    H = torchcurv.HessianOperator(model, criterion, data)
    before = snapshot(model)
    first = H.memory_estimate(3)
    assert H.num_matvecs == 0 and H.num_calls == 0
    again = H.memory_estimate(3)
    assert again == first  # nothing measured twice
    assert_unchanged(model, before)
    assert "KiB" in str(first) and first.m == 3


def test_the_peak_meter_counts_what_is_alive_at_the_peak():
    with PeakMeter(torch.device("cpu")) as meter:
        a = torch.empty(1000, dtype=torch.float64)  # 8000 bytes
        b = torch.empty(500, dtype=torch.float64)  # 4000 more, both alive
        del a, b
        c = torch.empty(100, dtype=torch.float64)
        del c
    assert meter.peak == 12000


def test_a_fit_through_two_batched_sizes():
    e = MemoryEstimate.fit([(1, 150), (2, 300), (4, 500)], 10, "test")
    assert (e.fixed_bytes, e.per_vector_bytes, e.bytes) == (100, 100, 1100)
    assert e.at(1).bytes == 150 and e.max_vectors(1100) == 10 and e.max_vectors(10) == 1
    lone = MemoryEstimate.fit([(1, 150)], 4, "test")
    assert lone.bytes == 600  # through the origin: an upper bound
    with pytest.raises(ValueError, match="no measured product"):
        MemoryEstimate.fit([], 1, "test")


def test_a_microbatch_fit_from_lines_on_whole_and_half_batches():
    # peak(m, b) = (100 + 10 b) + m (20 + 5 b), measured at b = 8 and b = 4
    whole = MemoryEstimate.fit([(2, 300), (4, 420)], 1, "test")
    half = MemoryEstimate.fit([(2, 220), (4, 300)], 1, "test")
    fit = MicrobatchMemory(whole=whole, examples=8, split=half, split_examples=4)
    assert fit.bytes(16, 2) == 120 + 16 * 30 and fit.bytes(3, 8) == 180 + 3 * 60
    assert fit.per_example_vector_bytes == 5
    assert fit.max_examples(16, 600) == 2  # b = 3 would take 690
    assert fit.max_examples(16, 689) == 2 and fit.max_examples(16, 800) == 4  # 4 + 4
    assert fit.max_examples(16, 100) == 0


def test_basis_bytes():
    assert basis_bytes(1000, 20, torch.bfloat16) == 40_000


@pytest.mark.parametrize("bad", [0, -5, "big", True, float("nan"), [1]])
def test_bad_budgets_are_refused_at_construction(bad):
    model, criterion, data = case("mlp_tanh")
    with pytest.raises(ValueError, match="max_memory must be"):
        torchcurv.HessianOperator(model, criterion, data, max_memory=bad)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_bad_block_sizes_are_refused(bad):
    model, criterion, data = case("mlp_tanh")
    H = torchcurv.HessianOperator(model, criterion, data)
    with pytest.raises(ValueError, match="positive number of vectors"):
        H.memory_estimate(bad)


def test_a_block_that_fits_at_one_product_per_vector_goes_at_once_after_one_vector():
    model, criterion, data = _wide_mlp_case()
    H = torchcurv.HessianOperator(model, criterion, data, max_memory=10**12)
    widths = _sub_blocks(H)
    V = torch.randn(H.n, 9, dtype=DT)
    out = H.matmat(V)
    assert widths == [1, 8]
    assert rel(out, H.replace(max_memory=None).matmat(V)) < 1e-12


def test_a_sub_block_that_runs_out_of_memory_is_tried_again_at_half_its_size():
    model, criterion, data = case("mlp_tanh")
    H = torchcurv.HessianOperator(model, criterion, data, max_memory=1)
    widths: list[int] = []
    product = H._product

    def tight(V):  # a device on which 3 or more vectors at once do not fit
        widths.append(V.shape[1])
        if V.shape[1] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return product(V)

    H._product = tight
    before = snapshot(model)
    V = torch.randn(H.n, 6, dtype=DT)
    out = H.matmat(V)
    assert widths == [1, 2, 3, 1, 1, 1]  # 3 failed: halved (to 1), and no later block larger
    assert rel(out, H.replace(max_memory=None).matmat(V)) < 1e-12
    assert_unchanged(model, before)


def test_ggn_blocks_are_budgeted_too():
    model, criterion, data = case("mlp_tanh")
    G = torchcurv.GGNOperator(model, criterion, data, max_memory=1)
    widths = _sub_blocks(G)
    V = torch.randn(G.n, 4, dtype=DT)
    assert rel(G.matmat(V), G.replace(max_memory=None).matmat(V)) < 1e-12
    assert widths == [1, 2, 1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_auto_budget_and_estimate_match_the_allocator():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 1024), nn.Tanh(), nn.Linear(1024, 10)).cuda()
    data = [(torch.randn(4096, 64, device="cuda"), torch.randint(0, 10, (4096,), device="cuda"))]
    H = torchcurv.HessianOperator(model, nn.CrossEntropyLoss(), data)
    predicted = H.memory_estimate(8)
    V = torch.randn(H.n, 8, device="cuda")
    with PeakMeter(H.device) as meter:
        out = H.replace(max_memory=None).matmat(V)
    assert abs(predicted.bytes - meter.peak) <= 0.25 * meter.peak
    tight = H.replace(max_memory=predicted.fixed_bytes + 2 * predicted.per_vector_bytes)
    assert rel(tight.matmat(V), out) < 1e-5


class _FakeCudaOperator:
    """Only what ``basis_device`` reads of an operator on a CUDA device."""

    device = torch.device("cuda")
    n = 1000

    def __init__(self, product_bytes: int) -> None:
        self.product_bytes = product_bytes

    def memory_estimate(self, m: int) -> MemoryEstimate:
        return MemoryEstimate.fit([(1, self.product_bytes)], m, "test")


@pytest.mark.parametrize(("product", "where"), [(10_000, "cuda"), (200_000, "cpu")])
def test_auto_basis_lives_on_the_device_only_beside_one_product(monkeypatch, product, where):
    from torchcurv.operators import memory

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (250_000, 10**9))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    # basis 20 x 1000 float64 = 160 kB; free 250 kB, of which 85 % may be used
    assert memory.basis_device(_FakeCudaOperator(product), 20, torch.float64).type == where


def test_auto_basis_on_the_cpu_is_the_operator_s_device():
    model, criterion, data = case("mlp_tanh")
    H = torchcurv.HessianOperator(model, criterion, data)
    a = torchcurv.eigsh(H, k=2, backend="lanczos", basis_device="auto", seed=0, tol=1e-10)
    b = torchcurv.eigsh(H, k=2, backend="lanczos", seed=0, tol=1e-10)
    assert torch.equal(a.eigenvalues, b.eigenvalues)
    assert a.info.basis_device == torch.device("cpu")
