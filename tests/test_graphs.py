"""``cuda_graphs=True``: every batch's product recorded once and replayed, giving the
eager products exactly (same kernels), seeing in-place weight changes, recording again
when a parameter or a batch cannot be replayed, and refused where nothing is recorded."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from zoo import DT, assert_unchanged, case, rel, snapshot

import torchcurv

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize(("build", "message"), [
    (lambda m, c, d: torchcurv.HessianOperator(m, c, d, cuda_graphs=True), "operator is on cpu"),
    (lambda m, c, d: torchcurv.HessianOperator(m, c, d, method="finite_difference",
                                               cuda_graphs=True), "'finite_difference'"),
    (lambda m, c, d: torchcurv.MCFisherOperator(m, c, d, cuda_graphs=True), "MCFisherOperator"),
    (lambda m, c, d: torchcurv.GGNOperator(m, c, d, jvp="finite_difference", cuda_graphs=True),
     "'finite_difference'"),
    (lambda m, c, d: torchcurv.HessianOperator(m, c, d, method="forward_over_reverse",
                                               compile=True, cuda_graphs=True),
     "Choose one of them"),
])
def test_refused_where_nothing_can_be_recorded(build, message):
    model, criterion, data = case("mlp_tanh")
    with pytest.raises(ValueError, match=message):
        build(model, criterion, data)


def _cuda_case(dtype=DT):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.LayerNorm(16),
                          nn.Linear(16, 3)).to("cuda", dtype)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(b, 5, generator=g, dtype=dtype).cuda(),
             torch.randint(0, 3, (b,), generator=g).cuda()) for b in (7, 4, 7)]
    return model, nn.CrossEntropyLoss(), data


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("kind", ["hessian", "hessian_for", "ggn", "ggn_vjp", "ef"])
def test_replayed_products_equal_eager_ones(kind):
    model, criterion, data = _cuda_case()
    build = {"hessian": lambda **o: torchcurv.HessianOperator(model, criterion, data, **o),
             "hessian_for": lambda **o: torchcurv.HessianOperator(
                 model, criterion, data, method="forward_over_reverse", **o),
             "ggn": lambda **o: torchcurv.GGNOperator(model, criterion, data, **o),
             "ggn_vjp": lambda **o: torchcurv.GGNOperator(model, criterion, data,
                                                          jvp="double_vjp", **o),
             "ef": lambda **o: torchcurv.EmpiricalFisherOperator(model, criterion, data, **o),
             }[kind]
    eager, graphed = build(), build(cuda_graphs=True)
    before = snapshot(model)
    for m in (1, 3, 1, 3):  # recorded at the first product of each width, then replayed
        V = torch.randn(eager.n, m, dtype=DT, device="cuda")
        assert rel(graphed.matmat(V), eager.matmat(V)) < 1e-12
    assert_unchanged(model, before)


def _recorded():
    """A CUDA case, its Hessian with cuda_graphs=True recorded by one matvec, and v."""
    model, criterion, data = _cuda_case()
    H = torchcurv.HessianOperator(model, criterion, data, cuda_graphs=True)
    v = torch.randn(H.n, dtype=DT, device="cuda")
    H.matvec(v)
    return model, criterion, data, H, v


@pytest.mark.gpu
@cuda
def test_in_place_weight_changes_are_seen_and_new_storage_is_recorded_again():
    model, criterion, data, H, v = _recorded()
    with torch.no_grad():
        model[0].weight.mul_(1.5)  # same storage: the recorded graph reads the new values
    assert rel(H.matvec(v), torchcurv.HessianOperator(model, criterion, data).matvec(v)) < 1e-12
    model[3].weight.data = model[3].weight.data.clone() * 0.5  # new storage
    assert rel(H.matvec(v), torchcurv.HessianOperator(model, criterion, data).matvec(v)) < 1e-12


@pytest.mark.gpu
@cuda
def test_batches_that_are_new_tensors_each_pass_are_copied_in():
    model, criterion, data = _cuda_case()

    class Fresh:
        """Like a DataLoader: new tensors (equal values) on every pass."""

        def __iter__(self):
            return ((x.clone(), y.clone()) for x, y in data)

        def __len__(self):
            return len(data)

    H = torchcurv.HessianOperator(model, criterion, Fresh(), cuda_graphs=True)
    V = torch.randn(H.n, 2, dtype=DT, device="cuda")
    expected = torchcurv.HessianOperator(model, criterion, data).matmat(V)
    for _ in range(3):
        assert rel(H.matmat(V), expected) < 1e-12


@pytest.mark.gpu
@cuda
def test_a_nan_loss_is_still_reported_through_a_replay():
    model, _, _, H, v = _recorded()
    with torch.no_grad():
        model[0].bias.fill_(float("nan"))
    with pytest.raises(torchcurv.NonFiniteLossError):
        H.matvec(v)
