"""Closed-form loss Hessians in output space equal autograd's Hessian of the criterion."""

import pytest
import torch
from torch import nn

from torchcurv.errors import OperatorInputError
from torchcurv.kernels import ce_hessian_matmat
from torchcurv.losses import (
    AutogradHessian,
    CrossEntropyHessian,
    DiagonalHessian,
    loss_hessian,
)

DT = torch.float64


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _autograd(criterion, output, target):
    H = torch.autograd.functional.hessian(lambda f: criterion(f, target), output)
    return H.reshape(output.numel(), output.numel())


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _class_targets(shape, classes, g, ignore=()):
    y = torch.randint(0, classes, shape, generator=g)
    for idx in ignore:
        y[idx] = -100
    return y


WEIGHT = torch.tensor([0.5, 2.0, 1.0, 1.5], dtype=DT)
CE_CASES = {
    "plain": (dict(), (6, 4), ()),
    "ignore_index": (dict(), (6, 4), [(1,), (4,)]),
    "class_weights": (dict(weight=WEIGHT), (6, 4), [(2,)]),
    "label_smoothing": (dict(label_smoothing=0.2), (6, 4), [(0,)]),
    "smoothing_and_weights": (dict(weight=WEIGHT, label_smoothing=0.3), (6, 4), [(3,)]),
    "sequence_layout_NCT": (dict(weight=WEIGHT, label_smoothing=0.1), (3, 4, 5), [(0, 1)]),
    "image_layout_NCHW": (dict(), (2, 4, 3, 2), [(1, 0, 1)]),
}


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("name", list(CE_CASES))
def test_cross_entropy_hessian_equals_autograd(name, reduction):
    kwargs, shape, ignore = CE_CASES[name]
    g = _gen()
    output = torch.randn(shape, generator=g, dtype=DT)
    target_shape = (shape[0], *shape[2:])
    target = _class_targets(target_shape, shape[1], g, ignore)
    criterion = nn.CrossEntropyLoss(reduction=reduction, **kwargs)
    H = loss_hessian(criterion, output, target)
    assert isinstance(H, CrossEntropyHessian)
    assert _rel(H.to_dense(), _autograd(criterion, output, target)) < 1e-13


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cross_entropy_with_probability_targets_equals_autograd(reduction):
    g = _gen(1)
    output = torch.randn(5, 4, generator=g, dtype=DT)
    target = torch.softmax(torch.randn(5, 4, generator=g, dtype=DT), dim=1)
    criterion = nn.CrossEntropyLoss(weight=WEIGHT, label_smoothing=0.1, reduction=reduction)
    assert _rel(loss_hessian(criterion, output, target).to_dense(),
                _autograd(criterion, output, target)) < 1e-13


def test_unbatched_logits_equal_autograd():
    output = torch.randn(4, generator=_gen(2), dtype=DT)
    target = torch.tensor(1)
    criterion = nn.CrossEntropyLoss()
    assert _rel(loss_hessian(criterion, output, target).to_dense(),
                _autograd(criterion, output, target)) < 1e-13


def test_label_smoothing_leaves_the_softmax_hessian_unchanged():
    g = _gen(3)
    output = torch.randn(6, 4, generator=g, dtype=DT)
    target = _class_targets((6,), 4, g)
    plain = loss_hessian(nn.CrossEntropyLoss(), output, target).to_dense()
    smoothed = loss_hessian(nn.CrossEntropyLoss(label_smoothing=0.4), output, target)
    assert _rel(smoothed.to_dense(), plain) < 1e-14
    smoothed_autograd = _autograd(nn.CrossEntropyLoss(label_smoothing=0.4), output, target)
    assert _rel(smoothed_autograd, plain) < 1e-13


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_mse_hessian_is_two_over_the_entry_count(reduction):
    g = _gen(4)
    output, target = torch.randn(5, 3, generator=g, dtype=DT), torch.randn(5, 3, generator=g,
                                                                          dtype=DT)
    criterion = nn.MSELoss(reduction=reduction)
    H = loss_hessian(criterion, output, target)
    assert isinstance(H, DiagonalHessian)
    assert _rel(H.to_dense(), _autograd(criterion, output, target)) < 1e-14


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("weighted", [False, True])
def test_bce_with_logits_hessian_equals_autograd(reduction, weighted):
    g = _gen(5)
    output = torch.randn(5, 3, generator=g, dtype=DT)
    target = torch.rand(5, 3, generator=g, dtype=DT)
    kwargs = {}
    if weighted:
        kwargs = dict(weight=torch.rand(3, generator=g, dtype=DT),
                      pos_weight=1 + torch.rand(3, generator=g, dtype=DT))
    criterion = nn.BCEWithLogitsLoss(reduction=reduction, **kwargs)
    H = loss_hessian(criterion, output, target)
    assert isinstance(H, DiagonalHessian)
    assert _rel(H.to_dense(), _autograd(criterion, output, target)) < 1e-13


@pytest.mark.parametrize("criterion", [nn.HuberLoss(delta=0.5), nn.SmoothL1Loss(),
                                       nn.PoissonNLLLoss(), nn.SoftMarginLoss(reduction="sum")])
def test_other_criteria_fall_back_to_autograd(criterion):
    g = _gen(6)
    output = torch.randn(4, 3, generator=g, dtype=DT)
    target = torch.randn(4, 3, generator=g, dtype=DT)
    H = loss_hessian(criterion, output, target)
    assert isinstance(H, AutogradHessian)
    assert _rel(H.to_dense(), _autograd(criterion, output, target)) < 1e-13


def test_loss_linear_in_the_output_has_zero_hessian():
    output = torch.randn(4, 3, dtype=DT)
    H = loss_hessian(nn.NLLLoss(), output, torch.tensor([0, 1, 2, 0]))
    assert torch.equal(H.to_dense(), torch.zeros(12, 12, dtype=DT))


def test_scale_is_folded_into_every_closed_form():
    g = _gen(7)
    output = torch.randn(5, 3, generator=g, dtype=DT)
    for criterion, target in [(nn.CrossEntropyLoss(), _class_targets((5,), 3, g)),
                              (nn.MSELoss(), torch.randn(5, 3, generator=g, dtype=DT)),
                              (nn.HuberLoss(), torch.randn(5, 3, generator=g, dtype=DT))]:
        base = loss_hessian(criterion, output, target).to_dense()
        scaled = loss_hessian(criterion, output, target,
                              scale=torch.tensor(0.25, dtype=DT)).to_dense()
        assert _rel(scaled, 0.25 * base) < 1e-15


def test_ce_kernel_contract_block_and_single_vector():
    g = _gen(8)
    logits = torch.randn(6, 5, generator=g, dtype=DT)
    U = torch.randn(3, 6, 5, generator=g, dtype=DT)
    w = torch.rand(6, generator=g, dtype=DT)
    out = ce_hessian_matmat(logits, U, w)
    assert out.shape == U.shape and out.dtype == U.dtype
    single = ce_hessian_matmat(logits, U[1], w)
    assert single.shape == (6, 5)
    assert torch.allclose(out[1], single, rtol=0, atol=1e-15)
    p = torch.softmax(logits, -1)
    expected = w[2] * (torch.diag(p[2]) - torch.outer(p[2], p[2])) @ U[0, 2]
    assert torch.allclose(out[0, 2], expected, rtol=1e-14, atol=1e-16)


def test_ce_kernel_computes_half_precision_in_float32():
    g = _gen(9)
    logits = (4 * torch.randn(8, 50, generator=g)).to(torch.bfloat16)
    U = torch.randn(8, 50, generator=g).to(torch.bfloat16)
    out = ce_hessian_matmat(logits, U, torch.ones(8))
    ref = ce_hessian_matmat(logits.double(), U.double(), torch.ones(8, dtype=DT))
    assert out.dtype == torch.bfloat16
    assert _rel(out.double(), ref) < 1e-2


def test_block_of_wrong_shape_is_named():
    H = loss_hessian(nn.MSELoss(), torch.zeros(4, 3, dtype=DT), torch.zeros(4, 3, dtype=DT))
    with pytest.raises(OperatorInputError, match=r"expected \(4, 3\)"):
        H.matmat(torch.zeros(2, 3, 4, dtype=DT))


def test_reduction_none_is_refused():
    with pytest.raises(ValueError, match="reduction='none'"):
        loss_hessian(nn.MSELoss(reduction="none"), torch.zeros(2, dtype=DT),
                     torch.zeros(2, dtype=DT))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("name", [*CE_CASES, "probability_targets"])
def test_row_weights_with_a_normaliser_are_those_of_the_data_sets_loss(name, reduction):
    # two batches; the data set's loss is (w_1 L_1 + w_2 L_2) / (w_1 + w_2) for a mean
    # (w_b the loss terms supervised() counts), L_1 + L_2 for a sum. Its Hessian in the
    # first batch's logits is blockdiag_r w_r (diag p_r - p_r p_rᵀ) with the weights
    # criterion_row_weights gives for the data set's normaliser
    from torchcurv.losses import criterion_row_weights
    from torchcurv.losses.layout import sample_layout
    from torchcurv.objectives import supervised

    kwargs, shape, ignore = CE_CASES.get(name, (dict(weight=WEIGHT), (5, 4), ()))
    criterion = nn.CrossEntropyLoss(reduction=reduction, **kwargs)
    g = _gen(3)
    outputs = [torch.randn(shape, generator=g, dtype=DT) for _ in range(2)]
    if name == "probability_targets":
        targets = [torch.softmax(torch.randn(shape, generator=g, dtype=DT), 1) for _ in range(2)]
    else:
        targets = [_class_targets((shape[0], *shape[2:]), shape[1], g, ignore) for _ in range(2)]
    if reduction == "mean":
        count = supervised(criterion).weight
        w = [float(count((o, t))) for o, t in zip(outputs, targets)]
        normaliser = sum(w)

        def data_loss(first):
            return (w[0] * criterion(first, targets[0])
                    + w[1] * criterion(outputs[1], targets[1])) / normaliser
    else:
        normaliser = 1.0

        def data_loss(first):
            return criterion(first, targets[0]) + criterion(outputs[1], targets[1])
    rows = criterion_row_weights(criterion, outputs[0], targets[0], normaliser)
    layout = sample_layout(criterion, outputs[0])
    p = torch.softmax(layout.rows_of(outputs[0]), dim=1)
    blocks = rows[:, None, None] * (torch.diag_embed(p) - p[:, :, None] * p[:, None, :])
    # the oracle in the layout's row order
    n = outputs[0].numel()
    H = torch.autograd.functional.hessian(data_loss, outputs[0]).reshape(n, n)
    order = layout.to_rows(torch.arange(n).reshape(1, *shape))[0]  # (R, K) entry indices
    expected = torch.stack([H[idx][:, idx] for idx in order])
    assert _rel(blocks, expected) < 1e-13
