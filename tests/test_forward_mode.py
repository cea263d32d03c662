"""HessianOperator(method="forward_over_reverse") equals method="autograd" for every loss.

Covers the built-in criteria whose fused backward breaks forward-mode AD in torch 2.13
(``MSELoss`` with ``reduction="mean"``: "ZeroTensors are immutable"; ``HuberLoss`` and
``SoftMarginLoss``: no forward-mode rule) and the others the GGN takes, with their
options, in float64, for single vectors and blocks.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from zoo import DT, case, make_model, rel

import torchcurv
from torchcurv.losses.forward_mode import forward_mode_objective
from torchcurv.objectives import Objective, supervised


class _Then(nn.Module):
    """``post(model(x))``: probabilities or log-probabilities for NLL, BCE, KL."""

    def __init__(self, model: nn.Module, post) -> None:
        super().__init__()
        self.model = model
        self.post = post

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.post(self.model(x))


def _targets(kind: str, rows: int, g: torch.Generator) -> torch.Tensor:
    if kind == "class":
        return torch.randint(0, 3, (rows,), generator=g)
    if kind == "class_ignored":
        y = torch.randint(0, 3, (rows,), generator=g)
        y[0] = -100
        return y
    if kind == "probs":
        p = torch.rand(rows, 3, generator=g, dtype=DT) + 0.1
        return p / p.sum(1, keepdim=True)
    if kind == "unit":
        return torch.rand(rows, 3, generator=g, dtype=DT)
    if kind == "sign":
        return torch.randn(rows, 3, generator=g, dtype=DT).sign()
    if kind == "positive":
        return torch.rand(rows, 3, generator=g, dtype=DT) + 0.1
    return torch.randn(rows, 3, generator=g, dtype=DT)


W = torch.tensor([0.5, 2.0, 1.0], dtype=DT)

# name: (criterion class, options, target kind, what follows the model)
CRITERIA = {
    "ce": (nn.CrossEntropyLoss, {}, "class", None),
    "ce_weight_ignore_smoothing": (
        nn.CrossEntropyLoss, dict(weight=W, ignore_index=-100, label_smoothing=0.1),
        "class_ignored", None),
    "ce_probabilities": (nn.CrossEntropyLoss, {}, "probs", None),
    "nll_weight_ignore": (nn.NLLLoss, dict(weight=W), "class_ignored",
                          lambda f: f.log_softmax(-1)),
    "mse": (nn.MSELoss, {}, "real", None),
    "l1": (nn.L1Loss, {}, "real", None),
    "smooth_l1": (nn.SmoothL1Loss, dict(beta=0.5), "real", None),
    "huber": (nn.HuberLoss, dict(delta=0.5), "real", None),
    "bce_with_logits": (nn.BCEWithLogitsLoss, {}, "unit", None),
    "bce_with_logits_weight_pos_weight": (
        nn.BCEWithLogitsLoss, dict(weight=W, pos_weight=torch.tensor([1.0, 2.0, 3.0], dtype=DT)),
        "unit", None),
    "bce": (nn.BCELoss, dict(weight=W), "unit", torch.sigmoid),
    "soft_margin": (nn.SoftMarginLoss, {}, "sign", None),
    "poisson_nll": (nn.PoissonNLLLoss, {}, "positive", None),
    "kl_div": (nn.KLDivLoss, {}, "probs", lambda f: f.log_softmax(-1)),
}


def _operators(model, criterion, data):
    auto = torchcurv.HessianOperator(model, criterion, data)
    fwd = torchcurv.HessianOperator(model, criterion, data, method="forward_over_reverse")
    return auto, fwd


@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides the total loss")
@pytest.mark.parametrize("name", CRITERIA)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_forward_over_reverse_equals_autograd_for_builtin_losses(name, reduction):
    cls, options, kind, post = CRITERIA[name]
    model = make_model("mlp_tanh")
    if post is not None:
        model = _Then(model, post)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(b, 4, generator=g, dtype=DT), _targets(kind, b, g)) for b in (5, 3)]
    auto, fwd = _operators(model, cls(reduction=reduction, **options), data)
    V = torch.randn(auto.n, 3, dtype=DT, generator=torch.Generator().manual_seed(2))
    expected = auto.matmat(V)
    assert rel(fwd.matmat(V), expected) < 1e-12
    assert rel(fwd.matvec(V[:, 0]), expected[:, 0]) < 1e-12


@pytest.mark.parametrize("loss", ["ce", "mse", "bce"])
def test_forward_over_reverse_equals_autograd_on_token_logits(loss):
    # (N, C, d) class logits: the classification criterion's sample axis is dim 1
    model, criterion, data = case("sequence", loss)
    auto, fwd = _operators(model, criterion, data)
    V = torch.randn(auto.n, 2, dtype=DT, generator=torch.Generator().manual_seed(4))
    assert rel(fwd.matmat(V), auto.matmat(V)) < 1e-12


def test_forward_over_reverse_takes_functional_mse_in_a_custom_objective():
    # no criterion to rewrite: the fix must not depend on knowing the loss
    model = make_model("mlp_tanh")
    g = torch.Generator().manual_seed(5)
    data = [{"x": torch.randn(b, 4, generator=g, dtype=DT),
             "y": torch.randn(b, 3, generator=g, dtype=DT)} for b in (4, 2)]
    objective = Objective.from_loss_fn(lambda m, b: nn.functional.mse_loss(m(b["x"]), b["y"]),
                                       weight=lambda b: float(b["y"].numel()))
    auto, fwd = _operators(model, objective, data)
    V = torch.randn(auto.n, 2, dtype=DT, generator=torch.Generator().manual_seed(6))
    assert rel(fwd.matmat(V), auto.matmat(V)) < 1e-12


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_rewritten_losses_match_the_fused_ops_at_their_kinks(reduction):
    # at |f - y| == delta the branches meet: value, gradient and second derivative must
    # be the ones torch's own kernels give
    f = torch.tensor([0.5, -0.5, 0.2, 1.0, -2.0, 30.0, -40.0], dtype=DT)
    y = torch.tensor([0.0, 0.0, 0.1, -1.0, 0.0, 1.0, -1.0], dtype=DT)
    for criterion, target in [(nn.HuberLoss(reduction=reduction, delta=0.5), y),
                              (nn.SoftMarginLoss(reduction=reduction), y.sign() + (y == 0))]:
        ours = forward_mode_objective(supervised(criterion)).loss
        assert ours is not supervised(criterion).loss

        def fused(v, criterion=criterion, target=target):
            return criterion(v, target)

        def mine(v, ours=ours, target=target):
            return ours(v, (None, target))

        assert torch.equal(mine(f), fused(f))
        grads = [torch.autograd.functional.jacobian(fn, f) for fn in (mine, fused)]
        assert torch.allclose(grads[0], grads[1], rtol=1e-15, atol=0)
        hessians = [torch.autograd.functional.hessian(fn, f) for fn in (mine, fused)]
        assert torch.allclose(hessians[0], hessians[1], rtol=1e-14, atol=0)


def test_losses_with_forward_mode_rules_are_not_rewritten():
    objective = supervised(nn.MSELoss())
    assert forward_mode_objective(objective) is objective
