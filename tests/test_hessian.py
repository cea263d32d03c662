"""HessianOperator: exact against plain autograd on the whole data set as one batch."""

import pytest
import torch
from torch import nn
from zoo import LOSSES, MODELS, case, explicit_hessian, rel

import torchcurv

METHODS = ["autograd", "forward_over_reverse"]


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_dense_hessian_equals_autograd_oracle(model_name, loss, reduction):
    model, criterion, data = case(model_name, loss, reduction)
    H = torchcurv.HessianOperator(model, criterion, data)
    expected = explicit_hessian(model, criterion, data)
    assert H.shape == expected.shape
    assert rel(H.to_dense(), expected) < 1e-10


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("method", METHODS)
def test_matvec_and_matmat_equal_oracle_for_each_method(model_name, method):
    model, criterion, data = case(model_name, "ce")
    expected = explicit_hessian(model, criterion, data)
    H = torchcurv.HessianOperator(model, criterion, data, method=method)
    V = torch.randn(H.n, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assert rel(H @ V[:, 0], expected @ V[:, 0]) < 1e-10
    assert rel(H.matmat(V), expected @ V) < 1e-10
    stacked = torch.stack([H.matvec(V[:, j]) for j in range(4)], dim=1)
    assert rel(H.matmat(V), stacked) < 1e-12


@pytest.mark.parametrize("model_name", ["mlp_tanh", "layernorm", "cnn_bn"])
def test_finite_difference_columns_match_oracle(model_name):
    model, criterion, data = case(model_name, "ce")
    expected = explicit_hessian(model, criterion, data)
    H = torchcurv.HessianOperator(model, criterion, data, method="finite_difference")
    cols = torch.tensor([0, H.n // 2, H.n - 1])
    E = torch.zeros(H.n, 3, dtype=torch.float64)
    E[cols, torch.arange(3)] = 1
    assert rel(H.matmat(E), expected[:, cols]) < 1e-7


def test_hessian_is_symmetric():
    H = torchcurv.HessianOperator(*case("layernorm", "ce"))
    D = H.to_dense()
    assert rel(D, D.T) < 1e-13
    assert H.T is H
    v = torch.randn(H.n, dtype=torch.float64)
    assert torch.equal(H.rmatvec(v), H.matvec(v))


def test_unequal_batches_weighted_by_loss_terms_not_batch_count():
    model, criterion, data = case("mlp_tanh", "ce", sizes=(7, 1))
    H = torchcurv.HessianOperator(model, criterion, data).to_dense()
    # Averaging the two batch Hessians equally is a different (wrong) matrix.
    per_batch = [torchcurv.HessianOperator(model, criterion, [b]).to_dense() for b in data]
    assert rel(H, (7 * per_batch[0] + per_batch[1]) / 8) < 1e-12
    assert rel(H, (per_batch[0] + per_batch[1]) / 2) > 1e-2


def test_ignore_index_and_class_weights_count_loss_terms():
    model, _, data = case("mlp_tanh", "ce", sizes=(6, 4))
    data[0][1][:3] = -100
    criterion = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64))
    H = torchcurv.HessianOperator(model, criterion, data)
    assert rel(H.to_dense(), explicit_hessian(model, criterion, data)) < 1e-10


def test_parameter_subset_by_list_and_by_glob():
    model, criterion, data = case("sequence", "ce")
    chosen = [model.mix.weight, model.head.bias]
    full = explicit_hessian(model, criterion, data)
    H = torchcurv.HessianOperator(model, criterion, data, params=chosen)
    assert rel(H.to_dense(), explicit_hessian(model, criterion, data, chosen)) < 1e-10
    assert H.n < full.shape[0]
    G = torchcurv.HessianOperator(model, criterion, data, param_filter="norm.*")
    assert G.param_names == ["norm.weight", "norm.bias"]
    assert rel(G.to_dense(), explicit_hessian(model, criterion, data, [model.norm.weight,
                                                                       model.norm.bias])) < 1e-10


def test_parameter_shaped_form_round_trips():
    model, criterion, data = case("cnn_bn", "ce")
    H = torchcurv.HessianOperator(model, criterion, data)
    v = torch.randn(H.n, dtype=torch.float64)
    pieces = H.unflatten(v)
    assert [p.shape for p in pieces] == [p.shape for p in model.parameters()]
    assert torch.equal(H.flatten(pieces), v)
    assert torch.allclose(H.flatten(H.matvec_params(pieces)), H @ v, rtol=1e-12, atol=0)


def test_callable_objective_for_dict_batches():
    model, criterion, data = case("mlp_tanh", "mse", sizes=(4, 2))
    dict_data = [{"x": x, "y": y} for x, y in data]
    objective = torchcurv.Objective.from_loss_fn(
        lambda m, b: nn.functional.mse_loss(m(b["x"]), b["y"]),
        weight=lambda b: b["y"].numel(),
    )
    H = torchcurv.HessianOperator(model, objective, dict_data)
    assert rel(H.to_dense(), explicit_hessian(model, criterion, data)) < 1e-10


def test_results_keep_vector_kind_shape_dtype_and_count_matvecs():
    H = torchcurv.HessianOperator(*case("mlp_tanh", "ce"))
    assert (H @ torch.ones(H.n, dtype=torch.float64)).shape == (H.n,)
    assert H.matvec(torch.ones(H.n, 1, dtype=torch.float64)).shape == (H.n, 1)
    out = H.matmat(torch.ones(H.n, 3, dtype=torch.float64))
    assert out.shape == (H.n, 3) and out.dtype == torch.float64
    assert H.num_matvecs == 5 and H.num_calls == 3


class _WithUnused(nn.Module):
    """A linear layer and a parameter the forward never reads."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2).double()
        self.unused = nn.Parameter(torch.ones(4, dtype=torch.float64))

    def forward(self, x):
        return self.lin(x)


@pytest.mark.parametrize("method", ["autograd", "forward_over_reverse"])
def test_parameters_the_loss_ignores_or_is_linear_in_have_zero_hessian_rows(method):
    # no second derivative reaches them: their rows of H are exactly zero, for one
    # vector (parameter-shaped kernels) as for a block
    torch.manual_seed(0)
    model = _WithUnused()
    data = [(torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64))
            for _ in range(2)]
    criterion = nn.MSELoss(reduction="sum")
    H = torchcurv.HessianOperator(model, criterion, data, method=method)
    expected = explicit_hessian(model, criterion, data)
    assert rel(H.to_dense(chunk_size=3), expected) < 1e-12
    v = torch.randn(H.n, dtype=torch.float64)
    assert rel(H.matvec(v), expected @ v) < 1e-12
    unused = torch.zeros(H.n, dtype=torch.bool)
    start = _offset(H, "unused")
    unused[start:start + 4] = True
    assert torch.equal(H.matvec(v)[unused], torch.zeros(4, dtype=torch.float64))
    # the loss linear in the selected parameters (the bias under a linear loss): H = 0
    linear = torchcurv.Objective.from_loss_fn(
        lambda m, b: (m(b[0]) * b[1]).sum(), reduction="sum")
    L = torchcurv.HessianOperator(model, linear, data, method=method,
                                  params=[model.lin.bias, model.unused])
    for V in (torch.randn(L.n, dtype=torch.float64), torch.randn(L.n, 3, dtype=torch.float64)):
        assert torch.equal(L @ V, torch.zeros_like(V))


def _offset(op, name: str) -> int:
    sizes = [p.numel() for p in op.params]
    return sum(sizes[:op.param_names.index(name)])


def test_a_column_of_a_wider_block_reaches_the_batch_products_contiguous(monkeypatch):
    # A one-vector block cut from a column of an (n, m) block is strided; parameter
    # views of it would make every kernel of the product read strided memory (or copy
    # per use). The batch products must see contiguous vectors, and the same product.
    import torchcurv.derivatives.hessian as strategies

    model, criterion, data = case("mlp_tanh", "ce")
    H = torchcurv.HessianOperator(model, criterion, data)
    seen = []
    kernel = strategies.hvp_double_backward

    def recording(model, objective, batch, scale, params, blocks):
        seen.append(all(b.is_contiguous() for b in blocks)
                    and all(v.is_contiguous() for v in blocks._vectors))
        return kernel(model, objective, batch, scale, params, blocks)

    monkeypatch.setattr(strategies, "hvp_double_backward", recording)
    V = torch.randn(H.n, 3, dtype=torch.float64)
    out = H.matmat(V[:, 1:2])
    assert seen and all(seen)
    exact = explicit_hessian(model, criterion, data)
    assert rel(out[:, 0], exact @ V[:, 1]) < 1e-10


@pytest.mark.parametrize("columns", [None, 3])
def test_bf16_batches_are_summed_in_float32_and_rounded_once(columns):
    # oracle: each batch's product alone (a one-batch operator of a 'sum' loss, whose
    # batch scale is 1), summed in float32 and rounded to bfloat16 once; a sum in
    # bfloat16 rounds after every batch and differs from it in many entries
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(torch.bfloat16)
    data = [(torch.randn(4, 6, dtype=torch.bfloat16), torch.randint(0, 3, (4,)))
            for _ in range(8)]
    criterion = nn.CrossEntropyLoss(reduction="sum")
    H = torchcurv.HessianOperator(model, criterion, data)
    shape = (H.n,) if columns is None else (H.n, columns)
    v = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    parts = [torchcurv.HessianOperator(model, criterion, [b]) @ v for b in data]
    total = parts[0].float()
    for p in parts[1:]:
        total += p.float()
    expected = total.to(torch.bfloat16)
    in_bf16 = parts[0].clone()
    for p in parts[1:]:
        in_bf16 += p
    assert not torch.equal(in_bf16, expected)  # the test can tell the two sums apart
    assert torch.equal(H @ v, expected)
