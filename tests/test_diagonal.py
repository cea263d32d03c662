"""torchcurv.diagonal: unbiased entries, XDiag sharper than Hutchinson, exact when asked."""

import math

import pytest
import torch
from spectra import decaying, indefinite, low_rank, low_rank_plus_noise
from zoo import case, rel

import torchcurv
from torchcurv.algorithms.diagonal import xdiag_terms
from torchcurv.algorithms.probing import ProbeSource

STOCHASTIC = ["hutchinson", "xdiag"]


def estimates(A, method, seeds, num_matvecs=24, **kw):
    op = torchcurv.MatrixOperator(A)
    results = [torchcurv.diagonal(op, num_matvecs=num_matvecs, method=method, seed=s, **kw)
               for s in seeds]
    return (torch.stack([r.estimate for r in results]),
            torch.stack([r.std_error for r in results]))


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
@pytest.mark.parametrize("method", STOCHASTIC)
def test_every_entry_is_unbiased_across_seeds(method, distribution):
    A = indefinite(60)
    est, _ = estimates(A, method, range(200), distribution=distribution)
    z = (est.mean(0) - A.diagonal()) / (est.std(0) / math.sqrt(len(est)))
    # 60 entries: 4.5 standard errors keeps the chance of a false alarm below 1e-3.
    assert z.abs().max() < 4.5


@pytest.mark.parametrize("make", [low_rank_plus_noise, decaying])
def test_xdiag_beats_hutchinson_on_dominant_spectra(make):
    A = make(60)
    rmse = {m: (estimates(A, m, range(50))[0] - A.diagonal()).pow(2).mean().sqrt()
            for m in STOCHASTIC}
    assert rmse["xdiag"] < rmse["hutchinson"] / 5


def test_xdiag_is_exact_when_rank_is_below_the_sketch_size():
    A = low_rank(50, 5)  # num_matvecs=12: 6 probes, each estimate sketches 5
    for seed in range(3):
        r = torchcurv.diagonal(torchcurv.MatrixOperator(A), num_matvecs=12, method="xdiag",
                               seed=seed)
        assert (r.estimate - A.diagonal()).abs().max() < 1e-12
        assert r.std_error.max() < 1e-12


def test_xdiag_equals_its_leave_one_out_definition():
    A = indefinite(40)
    Omega = torch.randn(40, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    base, terms = xdiag_terms(lambda V: A @ V, Omega)
    eye = torch.eye(40, dtype=torch.float64)
    for i in range(5):
        Q = torch.linalg.qr(A @ torch.cat([Omega[:, :i], Omega[:, i + 1:]], dim=1)).Q
        P = Q @ Q.T
        w = Omega[:, i]
        slow = torch.diagonal(P @ A) + w * ((eye - P) @ A @ w)
        assert (base + terms[:, i] - slow).abs().max() < 1e-12


def test_hutchinson_is_the_mean_and_standard_error_of_probe_products():
    A = indefinite(30)
    r = torchcurv.diagonal(torchcurv.MatrixOperator(A), num_matvecs=9, seed=5, block_size=4)
    W = ProbeSource(30, "rademacher", torch.float64, torch.device("cpu"), seed=5).draw(9)
    samples = W * (A @ W)
    assert rel(r.estimate, samples.mean(1)) < 1e-13
    assert rel(r.std_error, samples.std(1) / 3) < 1e-12


@pytest.mark.parametrize(("method", "least_coverage"), [("hutchinson", 0.9), ("xdiag", 0.85)])
def test_std_error_covers_most_entries(method, least_coverage):
    A = indefinite(60)
    est, se = estimates(A, method, range(50))
    err = (est - A.diagonal()).abs()
    assert (err <= 3 * se).double().mean() >= least_coverage
    ratio = float(se.mean() / err.pow(2).mean().sqrt())
    assert 0.5 < ratio < 2


@pytest.mark.parametrize("method", STOCHASTIC)
def test_same_seed_gives_the_same_diagonal(method):
    op = torchcurv.MatrixOperator(decaying(40))
    a = torchcurv.diagonal(op, num_matvecs=10, method=method, seed=3)
    b = torchcurv.diagonal(op, num_matvecs=10, method=method, seed=3)
    c = torchcurv.diagonal(op, num_matvecs=10, method=method, seed=4)
    assert torch.equal(a.estimate, b.estimate) and torch.equal(a.std_error, b.std_error)
    assert not torch.equal(a.estimate, c.estimate)


@pytest.mark.parametrize(("method", "num_matvecs", "used"),
                         [("hutchinson", 11, 11), ("xdiag", 11, 10), ("xdiag", 4, 4)])
def test_budget_is_respected_and_reported_exactly(method, num_matvecs, used):
    op = torchcurv.MatrixOperator(decaying(30))
    r = torchcurv.diagonal(op, num_matvecs=num_matvecs, method=method, seed=0)
    assert r.num_matvecs == op.num_matvecs == used
    assert r.estimate.shape == r.std_error.shape == (30,)


@pytest.mark.parametrize("block_size", [None, 1, 7, 64])
def test_exact_diagonal_uses_n_products_whatever_the_block(block_size):
    A = indefinite(45)
    op = torchcurv.MatrixOperator(A)
    r = torchcurv.diagonal(op, method="exact", block_size=block_size)
    assert torch.equal(r.estimate, A.diagonal())
    assert torch.equal(r.std_error, torch.zeros(45, dtype=torch.float64))
    assert r.num_matvecs == op.num_matvecs == 45
    assert op.num_calls == (1 if block_size is None else math.ceil(45 / block_size))


def test_exact_diagonal_of_a_hessian_matches_the_dense_matrix_in_parameter_shapes():
    model, criterion, data = case("layernorm", "ce")
    H = torchcurv.HessianOperator(model, criterion, data)
    r = torchcurv.diagonal(H, method="exact")
    assert rel(r.estimate, H.to_dense().diagonal()) < 1e-12
    per_param = H.unflatten(r.estimate.to(H.dtype))
    assert [p.shape for p in per_param] == [p.shape for p in model.parameters()]


def test_exact_refuses_huge_operators_and_short_budgets():
    op = torchcurv.MatrixOperator(decaying(40))
    with pytest.raises(ValueError, match="max_exact_n=30"):
        torchcurv.diagonal(op, method="exact", max_exact_n=30)
    with pytest.raises(ValueError, match="needs num_matvecs >= 40"):
        torchcurv.diagonal(op, method="exact", num_matvecs=39)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_matvecs": 5, "method": "diag++"}, ValueError, "unknown diagonal method"),
        ({"method": "hutchinson"}, TypeError, "needs num_matvecs"),
        ({"num_matvecs": 3, "method": "xdiag"}, ValueError, "needs num_matvecs >= 4"),
        ({"num_matvecs": 24, "method": "xdiag"}, ValueError, "more than n=10"),
        ({"num_matvecs": 5, "distribution": "uniform"}, ValueError, "unknown distribution"),
    ],
)
def test_bad_arguments_raise_naming_the_problem(kwargs, error, match):
    with pytest.raises(error, match=match):
        torchcurv.diagonal(torchcurv.MatrixOperator(decaying(10)), **kwargs)


def test_float32_operator_gives_float32_diagonal_close_to_float64():
    A = indefinite(40)
    r64 = torchcurv.diagonal(torchcurv.MatrixOperator(A), num_matvecs=16, method="xdiag",
                             seed=2)
    r32 = torchcurv.diagonal(torchcurv.MatrixOperator(A.float()), num_matvecs=16,
                             method="xdiag", seed=2)
    assert r32.estimate.dtype == torch.float32
    assert rel(r32.estimate.double(), r64.estimate) < 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["hutchinson", "xdiag", "exact"])
def test_cuda_diagonal_stays_on_the_device_and_matches_the_cpu(method):
    A = indefinite(200)
    budget = None if method == "exact" else 30
    cpu = torchcurv.diagonal(torchcurv.MatrixOperator(A), num_matvecs=budget, method=method,
                             seed=4)
    gpu = torchcurv.diagonal(torchcurv.MatrixOperator(A.cuda()), num_matvecs=budget,
                             method=method, seed=4)
    assert gpu.estimate.device.type == gpu.std_error.device.type == "cuda"
    assert rel(gpu.estimate.cpu(), cpu.estimate) < 1e-10
    big = torchcurv.MatrixOperator(indefinite(2000).float().cuda())
    r = torchcurv.diagonal(big, num_matvecs=40, method="xdiag",
                           generator=torch.Generator(device="cuda").manual_seed(0))
    assert r.estimate.dtype == torch.float32 and r.estimate.is_cuda
