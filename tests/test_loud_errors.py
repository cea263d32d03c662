"""No silent wrong answers (issue 15): each input below gets the right answer or an error
that names the problem, the same for every operator and every backend."""

import numpy as np
import pytest
import scipy.sparse.linalg as sla
import torch
from torch import nn
from zoo import DT, assert_unchanged, case, snapshot

import torchcurv
from torchcurv import NonFiniteLossError, Objective, OperatorInputError
from torchcurv.operators.counting import HostReads


def _operators():
    """One of each operator class, on a small float64 MLP with cross-entropy."""
    model, criterion, data = case("mlp_tanh", "ce")
    return {
        "hessian": torchcurv.HessianOperator(model, criterion, data),
        "hessian_fd": torchcurv.HessianOperator(model, criterion, data,
                                                method="finite_difference"),
        "ggn": torchcurv.GGNOperator(model, criterion, data),
        "ef": torchcurv.EmpiricalFisherOperator(model, criterion, data),
        "mc_fisher": torchcurv.MCFisherOperator(model, criterion, data, seed=3),
        "matrix": torchcurv.MatrixOperator(torch.diag(torch.arange(1.0, 11.0, dtype=DT))),
        "from_scipy": torchcurv.from_linear_operator(
            sla.aslinearoperator(np.diag(np.arange(1.0, 11.0)))),
    }


OPERATORS = _operators()


def _counts(op):
    return op.num_matvecs, op.num_calls


# -- 1. an (n, 0) block ------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(OPERATORS))
def test_an_empty_block_gives_an_empty_result_and_counts_no_product(name):
    op = OPERATORS[name]
    before = _counts(op)
    out = op.matmat(torch.zeros(op.n, 0, dtype=op.dtype))
    assert out.shape == (op.n, 0)
    assert out.dtype == op.dtype
    assert _counts(op) == before
    assert (op @ torch.zeros(op.n, 0, dtype=op.dtype)).shape == (op.n, 0)


@pytest.mark.parametrize("name", ["hessian", "ggn"])
def test_an_empty_block_passes_through_the_scipy_adapter_as_scipy_operators_do(name):
    op = OPERATORS[name]
    A = torchcurv.as_linear_operator(op)
    expected = sla.aslinearoperator(np.eye(op.n)).matmat(np.zeros((op.n, 0)))
    out = A.matmat(np.zeros((op.n, 0)))
    assert out.shape == expected.shape == (op.n, 0)
    assert (A.num_matvecs, A.num_calls) == (0, 0)


# -- 2. NaN/inf in the vectors -------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(OPERATORS))
def test_a_non_finite_vector_is_refused_alike_by_every_operator(name):
    op = OPERATORS[name]
    V = torch.ones(op.n, 3, dtype=op.dtype)
    V[0, 1], V[2, 1] = float("nan"), float("inf")
    before = _counts(op)
    with pytest.raises(OperatorInputError,
                       match=r"2 non-finite entries \(NaN/inf\) in column\(s\) \[1\]"):
        op.matmat(V)
    v = torch.ones(op.n, dtype=op.dtype)
    v[-1] = float("nan")
    with pytest.raises(OperatorInputError, match=r"1 non-finite entries \(NaN/inf\)"):
        op.matvec(v)
    assert _counts(op) == before


@pytest.mark.parametrize("name", ["hessian", "hessian_fd", "ggn", "mc_fisher"])
def test_a_non_finite_vector_is_refused_through_the_scipy_adapter(name):
    A = torchcurv.as_linear_operator(OPERATORS[name])
    x = np.ones(A.shape[0])
    x[4] = np.nan
    with pytest.raises(OperatorInputError, match="non-finite entries"):
        A.matvec(x)


@pytest.mark.parametrize("check_deterministic", [True, False])
@pytest.mark.parametrize("name", ["hessian", "ggn", "ef", "mc_fisher"])
def test_a_product_reads_back_once_for_its_vectors_and_losses_together(name,
                                                                       check_deterministic):
    # the vectors' NaN/inf check, the losses' and (counts not cached at construction)
    # the data's loss-term count are read back together at the end of the product,
    # whatever the number of batches; scipy's adapter adds no read
    cls = type(OPERATORS[name])
    reads = {}
    for sizes in ((5, 3), (5, 3, 2, 4, 3)):
        model, criterion, data = case("mlp_tanh", "ce", sizes=sizes)
        op = cls(model, criterion, data, check_deterministic=check_deterministic)
        v = torch.randn(op.n, dtype=DT)
        op.matvec(v)  # warm-up: first calls may read back once (library set-up)
        with HostReads() as counter:
            op.matvec(v)
        with HostReads() as adapted:
            torchcurv.as_linear_operator(op).matvec(v.numpy())
        reads[len(sizes)] = (counter.count, adapted.count)
    assert reads == {2: (1, 1), 5: (1, 1)}, reads


def test_a_models_buffers_are_compared_with_one_read_back_and_restored_when_changed():
    # The guard compares every tensor attribute with its snapshot when a product ends;
    # one read per tensor (two BatchNorm layers hold six) would stall a GPU six times.
    # A forward that changes a buffer (train-mode BatchNorm's running statistics) must
    # still find it put back.
    def model_and_data():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(),
                              nn.Linear(6, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)).double()
        g = torch.Generator().manual_seed(1)
        data = [(torch.randn(8, 4, generator=g, dtype=DT), torch.randint(0, 3, (8,), generator=g))
                for _ in range(2)]
        return model, data

    model, data = model_and_data()
    model.eval()
    H = torchcurv.HessianOperator(model, nn.CrossEntropyLoss(), data)
    v = torch.randn(H.n, dtype=DT)
    H.matvec(v)
    with HostReads() as counter:
        H.matvec(v)
    assert counter.count == 2  # the product's checks, the guard's comparisons

    model, data = model_and_data()
    model.train()
    H = torchcurv.HessianOperator(model, nn.CrossEntropyLoss(), data,
                                  check_deterministic=False)
    before = snapshot(model)
    H.matvec(torch.randn(H.n, dtype=DT))
    assert_unchanged(model, before)


@pytest.mark.parametrize("method", ["autograd", "forward_over_reverse", "finite_difference"])
def test_a_non_finite_vector_is_reported_before_a_non_finite_loss_model_unchanged(method):
    # both problems at once: the vector is the caller's to fix first (finite differences
    # would step along it and blame the loss)
    model, criterion, data = case("mlp_tanh", "ce")
    data[1][0][0, 0] = float("nan")
    H = torchcurv.HessianOperator(model, criterion, data, method=method,
                                  check_deterministic=False)
    v = torch.ones(H.n, dtype=DT)
    before = snapshot(model)
    with pytest.raises(NonFiniteLossError, match=r"batch\(es\) \[1\]"):
        H.matvec(v)
    assert_unchanged(model, before)
    v[5] = float("inf")
    with pytest.raises(OperatorInputError, match=r"the vector has 1 non-finite entries"):
        H.matvec(v)
    assert_unchanged(model, before)
    assert (H.num_matvecs, H.num_calls) == (0, 0)


# -- 3. a loss that is not a scalar ----------------------------------------------------------
def _vector_loss_objective():
    return Objective(forward=lambda model, batch: model(batch[0]),
                     loss=lambda out, batch: nn.functional.cross_entropy(
                         out, batch[1], reduction="none"),
                     reduction="sum")


@pytest.mark.parametrize("objective", [
    _vector_loss_objective(),
    Objective.from_loss_fn(lambda model, batch: (model(batch[0]) ** 2).sum(dim=1),
                           reduction="sum"),
], ids=["objective", "from_loss_fn"])
def test_a_non_scalar_loss_is_refused_at_construction_naming_its_shape(objective):
    model, _, data = case("mlp_tanh", "ce")
    with pytest.raises(ValueError, match=r"shape \(5,\), not a scalar.*reduction='mean'"):
        torchcurv.HessianOperator(model, objective, data)


def test_a_non_scalar_loss_is_refused_at_the_first_product_without_construction_checks():
    model, _, data = case("mlp_tanh", "ce")
    for cls in (torchcurv.HessianOperator, torchcurv.GGNOperator):
        op = cls(model, _vector_loss_objective(), data, check_deterministic=False)
        with pytest.raises(ValueError, match=r"shape \(5,\), not a scalar"):
            op.matvec(torch.ones(op.n, dtype=DT))


def test_a_criterion_without_reduction_is_refused_naming_the_fix():
    model, _, data = case("mlp_tanh", "ce")
    with pytest.raises(ValueError, match="reduction='none'; use 'mean' or 'sum'"):
        torchcurv.GGNOperator(model, nn.CrossEntropyLoss(reduction="none"), data)


# -- 4. NaN model outputs in the Monte-Carlo Fisher ------------------------------------------
@pytest.mark.parametrize("loss", ["ce", "bce"])
def test_nan_inputs_to_the_mc_fisher_name_the_batch(loss):
    model, criterion, data = case("mlp_tanh", loss)
    data[1][0][0, 0] = float("nan")
    op = torchcurv.MCFisherOperator(model, criterion, data, check_deterministic=False)
    with pytest.raises(NonFiniteLossError, match=r"batch\(es\) \[1\]"):
        op.matvec(torch.ones(op.n, dtype=DT))


# -- 5. an all-zero start vector -----------------------------------------------------------
@pytest.mark.parametrize("backend, options", [
    ("arpack", {"v0": torch.zeros(10, dtype=DT)}),
    ("arpack", {"v0": np.zeros(10)}),
    ("lanczos", {"v0": torch.zeros(10, dtype=DT)}),
    ("block", {"block_size": 2, "v0": torch.zeros(10, 2, dtype=DT)}),
    ("power", {"v0": torch.zeros(10, dtype=DT)}),
    ("lobpcg", {"X0": np.zeros((10, 2))}),
])
def test_a_zero_start_vector_is_refused_by_every_backend(backend, options):
    op = OPERATORS["matrix"]
    which = "LM" if backend == "power" else "LA"
    with pytest.raises(ValueError, match="zero"):
        torchcurv.eigsh(op, k=2, which=which, backend=backend, **options)


def test_a_start_block_with_one_zero_column_names_it():
    v0 = torch.ones(10, 2, dtype=DT)
    v0[:, 1] = 0
    with pytest.raises(ValueError, match=r"all-zero column\(s\) \[1\]"):
        torchcurv.eigsh(OPERATORS["matrix"], k=2, backend="block", block_size=2, v0=v0)


# -- 6. progress bars are closed however a solve ends ----------------------------------------
@pytest.fixture
def bars(monkeypatch):
    """Every tqdm bar the solvers open during the test."""
    import tqdm.auto

    opened = []

    class Spy(tqdm.auto.tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = False
            super().__init__(*args, **kwargs)
            opened.append(self)

    monkeypatch.setattr(tqdm.auto, "tqdm", Spy)
    return opened


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize("backend, options", [
    ("lanczos", {}), ("block", {"block_size": 2}), ("power", {"which": "LM"}),
])
def test_a_progress_bar_is_closed_when_the_callback_raises(bars, backend, options, error):
    def callback(state):
        raise error("stop")

    with pytest.raises(error, match="stop"):
        torchcurv.eigsh(OPERATORS["matrix"], k=2, backend=backend, progress=True,
                        callback=callback, **options)
    assert len(bars) == 1
    assert bars[0].disable  # tqdm's close() sets it


def test_a_progress_bar_is_closed_when_a_trace_callback_raises(bars):
    def callback(used, budget):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        torchcurv.trace(OPERATORS["matrix"], num_matvecs=8, block_size=2, progress=True,
                        callback=callback)
    assert len(bars) == 1 and bars[0].disable


# -- 7. per-backend options of compare_backends ---------------------------------------------
def test_a_backend_s_own_maxiter_is_accepted_and_reaches_only_that_backend():
    """maxiter counts each backend's own iterations, so it may differ per backend."""
    op = torchcurv.MatrixOperator(torch.diag(torch.linspace(1, 2, 60, dtype=DT)))
    table = torchcurv.compare_backends(op, k=2, backends=["arpack", "lobpcg"], tol=1e-10,
                                       options={"lobpcg": {"maxiter": 3}})
    alone = torchcurv.eigsh(op, k=2, backend="lobpcg", tol=1e-10, maxiter=3, seed=0)
    assert table["lobpcg"].result.info.iterations == alone.info.iterations
    assert not table["lobpcg"].result.converged.all()  # stopped early, as asked
    assert table["arpack"].result.converged.all()  # the shared maxiter (None) stays


@pytest.mark.parametrize("options, error, match", [
    ({"lobpcg": {"maxitr": 50}}, TypeError,
     r"'lobpcg' takes no option\(s\) \['maxitr'\]; its options: block_size, X0"),
    ({"lobpcg": {"tol": 1e-3}}, ValueError, r"\['tol'\].*compare_backends\(tol=...\)"),
    ({"lobpcg": {"maxiter": 0}}, ValueError, "maxiter"),
])
def test_bad_backend_options_fail_before_anything_runs(options, error, match):
    op = torchcurv.MatrixOperator(torch.diag(torch.arange(1.0, 11.0, dtype=DT)))
    with pytest.raises(error, match=match):
        torchcurv.compare_backends(op, k=2, backends=["arpack", "lobpcg"], options=options)
    assert op.num_matvecs == 0


# -- 8. validate rebuilds the operator from its whole configuration ----------------------------
@pytest.mark.parametrize("against", ["finite_difference", "dense"])
def test_validate_a_per_batch_seeded_mc_fisher(against):
    model, criterion, data = case("mlp_tanh", "ce")
    op = torchcurv.MCFisherOperator(model, criterion, data, seed=5, per_batch_seeds=True)
    assert torchcurv.validate(op, against).max_error < 1e-6


@pytest.mark.parametrize("make", [
    lambda m, c, d: torchcurv.MCFisherOperator(m, c, d, seed=5, mc_samples=3,
                                               microbatch_size=2),
    lambda m, c, d: torchcurv.MCFisherOperator(m, c, d, generator=torch.Generator().manual_seed(7),
                                               per_batch_seeds=True),
    lambda m, c, d: torchcurv.HessianOperator(m, c, d, microbatch_size=2),
    lambda m, c, d: torchcurv.GGNOperator(m, c, d, microbatch_size=2),
], ids=["mc_fisher_microbatch", "mc_fisher_generator", "hessian_microbatch",
        "ggn_microbatch"])
def test_validate_against_finite_differences_keeps_the_operator_s_configuration(make):
    model, criterion, data = case("mlp_tanh", "bce")
    op = make(model, criterion, data)
    assert torchcurv.validate(op, "finite_difference").max_error < 1e-6
