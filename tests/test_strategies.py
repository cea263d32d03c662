"""Derivative strategies and shardings: picked once at construction, stating what they need.

The SDPA restriction (math backend only) is entered exactly by the strategies that
differentiate the model's backward or push tangents through it; first-order strategies
(finite differences) run attention with the default backends.
"""

import warnings
from typing import ClassVar

import pytest
import torch
from curvature_oracles import explicit_ggn
from torch import nn
from zoo import DT, case, explicit_hessian, rel

import torchcurv
from torchcurv.derivatives import strategy_for
from torchcurv.derivatives.hessian import FiniteDifferenceHessian
from torchcurv.distributed.sharding import Local, sharding_for
from torchcurv.operators.attention import differentiable_attention

HESSIAN = ["autograd", "forward_over_reverse", "finite_difference"]
JVP = ["forward", "double_vjp", "finite_difference"]


def test_the_factory_refuses_unknown_methods_listing_the_choices():
    with pytest.raises(ValueError, match=r"method must be one of \('autograd', "
                                         r"'forward_over_reverse', 'finite_difference'\)"):
        strategy_for("method", "double_backward")
    with pytest.raises(ValueError, match=r"jvp must be one of \('forward', 'double_vjp', "
                                         r"'finite_difference'\), got 'reverse'"):
        strategy_for("jvp", "reverse")
    model, criterion, data = case("mlp_tanh", "ce")
    with pytest.raises(ValueError, match="method must be one of"):
        torchcurv.HessianOperator(model, criterion, data, method="exact")
    with pytest.raises(ValueError, match="jvp must be one of"):
        torchcurv.GGNOperator(model, criterion, data, jvp="exact")


@pytest.mark.parametrize("name", HESSIAN)
def test_a_hessian_strategy_states_what_it_needs(name):
    s = strategy_for("method", name)
    assert s.name == name
    assert s.needs_second_order == (name != "finite_difference")
    assert s.needs_forward_mode == (name == "forward_over_reverse")
    assert s.supports_fsdp == s.walks_data_per_vector == s.perturbs_params == (
        name == "finite_difference")
    assert s.restricts_attention == (name != "finite_difference")


@pytest.mark.parametrize("name", JVP)
def test_a_jvp_strategy_states_what_it_needs(name):
    s = strategy_for("jvp", name)
    assert s.name == name
    assert s.needs_second_order == (name == "double_vjp")
    assert s.needs_forward_mode == (name == "forward")
    assert s.perturbs_params == (name == "finite_difference")
    assert not s.supports_fsdp
    assert s.restricts_attention == (name != "finite_difference")


def test_the_strategy_and_sharding_are_chosen_once_and_kept():
    model, criterion, data = case("mlp_tanh", "ce")
    H = torchcurv.HessianOperator(model, criterion, data, method="finite_difference")
    s = H.derivative
    assert isinstance(s, FiniteDifferenceHessian)
    H.matvec(torch.ones(H.n, dtype=DT))
    assert H.derivative is s
    assert isinstance(H.sharding, Local)
    assert (H.distributed, H.fsdp, H.process_group) == (False, False, None)
    unwrapped, sharding = sharding_for(model)
    assert unwrapped is model and isinstance(sharding, Local)
    with pytest.raises(RuntimeError, match="distributed=True needs torch.distributed"):
        sharding_for(model, distributed=True)


class Attention(nn.Module):
    """One self-attention layer through SDPA; records whether the fused flash backend was
    allowed at each forward (the flag differentiable_attention turns off)."""

    seen: ClassVar[list[bool]] = []

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.qkv = nn.Linear(4, 12)
        self.out = nn.Linear(4, 3)

    def forward(self, x):  # x: (B, T, 4)
        Attention.seen.append(torch.backends.cuda.flash_sdp_enabled())
        q, k, v = self.qkv(x).unsqueeze(1).chunk(3, dim=-1)
        return self.out(nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
                        .squeeze(1)).mean(dim=1)


def _attention_case():
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(3, 5, 4, generator=g, dtype=DT), torch.randint(0, 3, (3,), generator=g))
            for _ in range(2)]
    return Attention().to(DT), nn.CrossEntropyLoss(), data


def _flags_during(product) -> set[bool]:
    Attention.seen.clear()
    product()
    return set(Attention.seen)


@pytest.mark.parametrize("name", HESSIAN)
def test_only_second_order_hessian_products_restrict_attention(name):
    model, criterion, data = _attention_case()
    H = torchcurv.HessianOperator(model, criterion, data, method=name)
    v = torch.randn(H.n, dtype=DT, generator=torch.Generator().manual_seed(1))
    restricted = name != "finite_difference"
    assert _flags_during(lambda: H.matvec(v)) == {not restricted}
    assert torch.backends.cuda.flash_sdp_enabled()  # the caller's choice is back
    with differentiable_attention():  # the oracle's double backward needs it
        exact = explicit_hessian(model, criterion, data) @ v
    assert rel(H.matvec(v), exact) < (1e-7 if name == "finite_difference" else 1e-12)


@pytest.mark.parametrize("name", JVP)
def test_only_second_order_or_forward_mode_jvps_restrict_attention(name):
    model, criterion, data = _attention_case()
    G = torchcurv.GGNOperator(model, criterion, data, jvp=name)
    V = torch.randn(G.n, 2, dtype=DT, generator=torch.Generator().manual_seed(1))
    restricted = name != "finite_difference"
    assert _flags_during(lambda: G.matmat(V)) == {not restricted}
    with differentiable_attention():
        exact = explicit_ggn(model, criterion, data) @ V
    assert rel(G.matmat(V), exact) < (1e-7 if name == "finite_difference" else 1e-12)
    J = torchcurv.JacobianOperator(model, criterion, data, jvp=name)
    assert _flags_during(lambda: J.matmat(V)) == {not restricted}
    w = torch.randn(J.shape[0], dtype=DT)
    assert _flags_during(lambda: J.rmatvec(w)) == {True}  # Jᵀ w is first order


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_the_finite_difference_hessian_restores_the_parameters_bit_for_bit(dtype):
    model, criterion, data = case("mlp_tanh", "mse")
    model = model.to(dtype)
    data = [(x.to(dtype), y.to(dtype)) for x, y in data]
    before = [p.detach().clone() for p in model.parameters()]
    H = torchcurv.HessianOperator(model, criterion, data, method="finite_difference")
    V = torch.randn(H.n, 3, generator=torch.Generator().manual_seed(2)).to(dtype)
    out = H.matmat(V)
    assert out.dtype == dtype
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    single = torch.stack([H.matvec(V[:, j]) for j in range(3)], dim=1)
    assert torch.equal(out, single)  # each column from the same base point


def _half_model_and_data(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(dtype)
    return model, [(torch.randn(5, 3, dtype=dtype), torch.randn(5, 2, dtype=dtype))]


@pytest.mark.parametrize("cls, keyword", [(torchcurv.HessianOperator, "method"),
                                          (torchcurv.GGNOperator, "jvp")])
def test_finite_differences_on_half_precision_parameters_warn_at_construction(cls, keyword):
    # bfloat16 rounding of the perturbed parameters makes these products inaccurate at
    # the 1e-1 level (benchmarks/product_accuracy.py): not silently
    model, data = _half_model_and_data(torch.bfloat16)
    with pytest.warns(RuntimeWarning, match=rf"{keyword}='finite_difference' on bfloat16") \
            as record:
        cls(model, nn.MSELoss(), data, **{keyword: "finite_difference"})
    assert record[0].filename == __file__  # points at the caller's line
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cls(model, nn.MSELoss(), data)  # exact products: no warning
        cls(*_half_model_and_data(torch.float32)[:1], nn.MSELoss(),
            _half_model_and_data(torch.float32)[1], **{keyword: "finite_difference"})
