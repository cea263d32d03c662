"""The model comes back bit-identical, and bad input gets an error that names the problem."""

import pytest
import torch
from torch import nn
from zoo import assert_unchanged, case, snapshot

import torchcurv
from torchcurv import NondeterminismError, NonFiniteLossError, OperatorInputError

ALL_METHODS = ["autograd", "forward_over_reverse", "finite_difference"]


def _with_grads_and_mixed_modes(model):
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.25)
    model.train()
    model[0].eval()  # a mix of modes must survive too
    return model


@pytest.mark.parametrize("method", ALL_METHODS)
def test_model_bit_identical_after_products(method):
    model, criterion, data = case("mlp_tanh", "ce")
    _with_grads_and_mixed_modes(model)
    before = snapshot(model)
    H = torchcurv.HessianOperator(model, criterion, data, method=method)
    H.matmat(torch.randn(H.n, 3, dtype=torch.float64))
    H.to_dense()
    assert_unchanged(model, before)


def test_batchnorm_buffers_restored_even_in_train_mode():
    model, criterion, data = case("cnn_bn", "ce")
    model.train()
    before = snapshot(model)
    with pytest.warns(UserWarning, match="BatchNorm"):
        H = torchcurv.HessianOperator(model, criterion, data)
    H @ torch.randn(H.n, dtype=torch.float64)
    assert_unchanged(model, before)


class _InterruptOnBatch:
    """A loss that raises on the k-th evaluation (KeyboardInterrupt mid-product)."""

    def __init__(self, k, exc):
        self.calls, self.k, self.exc = 0, k, exc

    def __call__(self, output, batch):
        self.calls += 1
        if self.calls == self.k:
            raise self.exc
        return nn.functional.cross_entropy(output, batch[1])


@pytest.mark.parametrize("method", ALL_METHODS)
@pytest.mark.parametrize("exc", [KeyboardInterrupt(), RuntimeError("boom")])
def test_model_bit_identical_when_product_is_interrupted(method, exc):
    model, _, data = case("mlp_tanh", "ce")
    _with_grads_and_mixed_modes(model)
    loss = _InterruptOnBatch(k=10**9, exc=exc)
    objective = torchcurv.Objective(
        forward=lambda m, b: m(b[0]), loss=loss, weight=lambda b: b[1].numel()
    )
    H = torchcurv.HessianOperator(model, objective, data, method=method)
    before = snapshot(model)
    loss.calls, loss.k = 0, 2  # fails on the 2nd batch (for finite differences: mid-perturbation)
    with pytest.raises(type(exc)):
        H @ torch.randn(H.n, dtype=torch.float64)
    assert_unchanged(model, before)


@pytest.fixture
def hessian():
    return torchcurv.HessianOperator(*case("mlp_tanh", "ce"))


def test_wrong_shape_is_named(hessian):
    with pytest.raises(OperatorInputError, match=r"shape \(7,\).*needs \(43,\)"):
        hessian @ torch.zeros(7, dtype=torch.float64)
    with pytest.raises(OperatorInputError, match="matmat"):
        hessian.matvec(torch.zeros(hessian.n, 2, dtype=torch.float64))


def test_wrong_dtype_is_named(hessian):
    with pytest.raises(OperatorInputError, match="dtype torch.float32.*torch.float64"):
        hessian @ torch.zeros(hessian.n)


def test_wrong_device_is_named(hessian):
    with pytest.raises(OperatorInputError, match="is on meta"):
        hessian @ torch.zeros(hessian.n, dtype=torch.float64, device="meta")


def test_numpy_input_points_to_the_scipy_adapter(hessian):
    with pytest.raises(OperatorInputError, match="as_linear_operator"):
        hessian @ torch.zeros(hessian.n, dtype=torch.float64).numpy()
    with pytest.raises(OperatorInputError, match="as_linear_operator"):
        hessian.matvec(torch.zeros(hessian.n, dtype=torch.float64).numpy())


def test_empty_and_one_shot_data_are_refused():
    model, criterion, data = case("mlp_tanh", "ce")
    with pytest.raises(ValueError, match="empty"):
        torchcurv.HessianOperator(model, criterion, [])
    with pytest.raises(TypeError, match="one-shot"):
        torchcurv.HessianOperator(model, criterion, (b for b in data))


def test_parameters_not_of_model_or_frozen_are_refused():
    model, criterion, data = case("mlp_tanh", "ce")
    with pytest.raises(ValueError, match="not a parameter of the model"):
        torchcurv.HessianOperator(model, criterion, data, params=[nn.Parameter(torch.zeros(3))])
    model[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match="'0.weight' does not require grad"):
        torchcurv.HessianOperator(model, criterion, data, params=[model[0].weight])
    with pytest.raises(ValueError, match="matches no parameter"):
        torchcurv.HessianOperator(model, criterion, data, param_filter="encoder.*")


def test_nan_loss_names_the_batch():
    model, criterion, data = case("mlp_tanh", "ce")
    H = torchcurv.HessianOperator(model, criterion, data)
    data[1][0][0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match=r"batch\(es\) \[1\]"):
        H @ torch.randn(H.n, dtype=torch.float64)


def test_dropout_in_train_mode_is_refused():
    model = nn.Sequential(nn.Linear(4, 5), nn.Dropout(0.5), nn.Linear(5, 3)).double()
    data = case("mlp_tanh", "ce")[2]
    with pytest.raises(NondeterminismError, match="Dropout.*model.eval"):
        torchcurv.HessianOperator(model, nn.CrossEntropyLoss(), data)
    torchcurv.HessianOperator(model.eval(), nn.CrossEntropyLoss(), data)


def test_shuffling_loader_is_refused():
    dataset = torch.utils.data.TensorDataset(torch.randn(32, 4, dtype=torch.float64),
                                             torch.randint(0, 3, (32,)))
    model, criterion, _ = case("mlp_tanh", "ce")
    loader = torch.utils.data.DataLoader(dataset, batch_size=5, shuffle=True)
    with pytest.raises(NondeterminismError, match="shuffle"):
        torchcurv.HessianOperator(model, criterion, loader)
    loader = torch.utils.data.DataLoader(dataset, batch_size=5)
    H = torchcurv.HessianOperator(model, criterion, loader)
    assert H.total_weight == 32


def test_reduction_none_and_unknown_method_are_refused():
    model, _, data = case("mlp_tanh", "ce")
    with pytest.raises(ValueError, match="reduction"):
        torchcurv.HessianOperator(model, nn.CrossEntropyLoss(reduction="none"), data)
    with pytest.raises(ValueError, match="method"):
        torchcurv.HessianOperator(model, nn.CrossEntropyLoss(), data, method="magic")


def test_guard_restores_tensor_attributes_when_its_type_cache_is_full(monkeypatch):
    # The guard recognises tensor attributes by a per-type cache that empties itself at
    # a limit (classes made on the fly are not kept alive): a tensor attribute changed in
    # place comes back while the cache is being emptied and refilled.
    from torchcurv.operators import model_guard

    monkeypatch.setattr(model_guard, "_TENSOR_TYPES_LIMIT", 2)
    model_guard._TENSOR_TYPES.clear()
    model = nn.Linear(3, 2)
    model.note = "text"
    model.scale = 2.5
    model.steps = torch.zeros(3)
    for _ in range(3):
        with model_guard.preserved(model):
            model.steps.add_(1.0)
        assert torch.equal(model.steps, torch.zeros(3))
        assert len(model_guard._TENSOR_TYPES) <= 2


def test_guard_follows_a_model_changed_between_products():
    # A guard keeps the layout of the model it saw last: changes made between products
    # (a submodule swapped, a buffer registered, .grad set, an attribute renamed) are
    # what the next product gives back, and what a forward changes is undone.
    from torchcurv.operators.model_guard import ModelGuard, preserved

    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    guard = ModelGuard(model)
    with preserved(model, guard=guard):
        model.extra = 1
    assert not hasattr(model, "extra")
    relu = nn.ReLU()
    model[1] = relu
    model.register_buffer("steps", torch.zeros(3))
    model[0].weight.grad = torch.ones(4, 3)
    model.note = "kept"
    for _ in range(2):
        with preserved(model, guard=guard):
            model.steps.add_(1.0)
            model[1] = nn.Tanh()
            model.foo = 2
            model[0].weight.grad = None
            del model.note
            model.renamed = "kept"
        assert model[1] is relu
        assert torch.equal(model.steps, torch.zeros(3))
        assert not hasattr(model, "foo") and not hasattr(model, "renamed")
        assert model.note == "kept"
        assert torch.equal(model[0].weight.grad, torch.ones(4, 3))
    del model.note
    model.renamed = "kept"
    with preserved(model, guard=guard):
        del model.renamed
    assert model.renamed == "kept" and not hasattr(model, "note")


def test_products_give_back_a_model_changed_between_them():
    model, criterion, data = case("mlp_tanh", "ce")
    H = torchcurv.HessianOperator(model, criterion, data)
    v = torch.randn(H.n, dtype=torch.float64)
    first = H @ v
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    model.train()
    model.tag = "between"
    before = snapshot(model)
    assert torch.equal(H @ v, first)
    assert_unchanged(model, before)
    assert model.tag == "between"
