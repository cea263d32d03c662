"""torchcurv.trace: unbiased, sharper with a sketch, exact at low rank, honest errors.

Statistical tests use fixed seeds (so they are deterministic) and tolerances derived from
the estimators' own spread across those seeds, not tuned to the draws.
"""

import math

import pytest
import torch
from spectra import decaying, indefinite, low_rank, low_rank_plus_noise
from zoo import case

import torchcurv
from torchcurv.algorithms.trace import xtrace_samples

METHODS = ["hutchinson", "hutch++", "xtrace"]
DISTRIBUTIONS = ["rademacher", "gaussian"]


def estimates(A, method, seeds, num_matvecs=24, **kw):
    op = torchcurv.MatrixOperator(A)
    results = [
        torchcurv.trace(op, num_matvecs=num_matvecs, method=method, seed=s, **kw) for s in seeds
    ]
    return (
        torch.tensor([r.estimate for r in results], dtype=torch.float64),
        torch.tensor([r.std_error for r in results], dtype=torch.float64),
    )


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
@pytest.mark.parametrize("method", METHODS)
def test_mean_over_seeds_is_within_four_standard_errors_of_the_trace(method, distribution):
    A = indefinite(80)
    est, _ = estimates(A, method, range(300), distribution=distribution)
    z = (est.mean() - A.trace()) / (est.std() / math.sqrt(len(est)))
    assert abs(z) < 4, f"mean of 300 estimates is {float(z):.1f} standard errors off"


def test_xtrace_and_hutchpp_beat_hutchinson_on_low_rank_plus_noise():
    A = low_rank_plus_noise(100)
    spread = {m: (estimates(A, m, range(100))[0] - A.trace()).pow(2).mean().sqrt()
              for m in METHODS}
    assert spread["hutch++"] < spread["hutchinson"] / 1.5
    assert spread["xtrace"] < spread["hutchinson"] / 5
    assert spread["xtrace"] < spread["hutch++"]


def test_xtrace_and_hutchpp_beat_hutchinson_on_fast_decaying_spectrum():
    A = decaying(100)
    spread = {m: (estimates(A, m, range(100))[0] - A.trace()).pow(2).mean().sqrt()
              for m in METHODS}
    assert spread["hutch++"] < spread["hutchinson"] / 5
    assert spread["xtrace"] < spread["hutchinson"] / 5


@pytest.mark.parametrize(
    ("method", "num_matvecs", "rank"),
    [("hutch++", 12, 4), ("xtrace", 12, 5), ("hutch++", 30, 10), ("xtrace", 30, 14)],
)
def test_exact_when_rank_fits_in_the_sketch(method, num_matvecs, rank):
    # Hutch++ sketches num_matvecs // 3 vectors; XTrace leaves one of num_matvecs // 2 out.
    A = low_rank(60, rank)
    for seed in range(3):
        r = torchcurv.trace(torchcurv.MatrixOperator(A), num_matvecs=num_matvecs,
                            method=method, seed=seed)
        assert r.estimate == pytest.approx(float(A.trace()), abs=1e-10)
        assert r.std_error < 1e-10


@pytest.mark.parametrize("method", ["hutch++", "xtrace"])
def test_exact_on_sketches_with_exactly_zero_pivots(method):
    # Rademacher probes of a sparse diagonal give a sketch with exactly dependent columns.
    D = torch.diag(torch.tensor([2.0, -1.0] + [0.0] * 10, dtype=torch.float64))
    r = torchcurv.trace(torchcurv.MatrixOperator(D), num_matvecs=12, method=method, seed=2)
    assert r.estimate == pytest.approx(1.0, abs=1e-12)
    Z = torch.zeros(12, 12, dtype=torch.float64)
    r = torchcurv.trace(torchcurv.MatrixOperator(Z), num_matvecs=12, method=method, seed=2)
    assert r.estimate == 0.0


def test_xtrace_equals_its_leave_one_out_definition():
    A = indefinite(40)
    Omega = torch.randn(40, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    fast = xtrace_samples(lambda V: A @ V, Omega)
    eye = torch.eye(40, dtype=torch.float64)
    for i in range(6):
        Q = torch.linalg.qr(A @ torch.cat([Omega[:, :i], Omega[:, i + 1:]], dim=1)).Q
        P = Q @ Q.T
        w = Omega[:, i]
        slow = torch.trace(P @ A) + w @ (eye - P) @ A @ (eye - P) @ w
        assert float(fast[i]) == pytest.approx(float(slow), abs=1e-12)


@pytest.mark.parametrize(("method", "least_coverage"),
                         [("hutchinson", 0.9), ("hutch++", 0.9), ("xtrace", 0.85)])
def test_std_error_is_calibrated(method, least_coverage):
    A = indefinite(80)
    est, se = estimates(A, method, range(200))
    err = (est - A.trace()).abs()
    assert (err <= 3 * se).double().mean() >= least_coverage
    # ...and not inflated: the typical reported error matches the actual spread.
    ratio = float(se.mean() / err.pow(2).mean().sqrt())
    assert 0.5 < ratio < 2


@pytest.mark.parametrize("method", METHODS)
def test_same_seed_gives_the_same_result_and_another_seed_does_not(method):
    op = torchcurv.MatrixOperator(decaying(50))
    a = torchcurv.trace(op, num_matvecs=20, method=method, seed=7)
    b = torchcurv.trace(op, num_matvecs=20, method=method, seed=7)
    c = torchcurv.trace(op, num_matvecs=20, method=method, seed=8)
    d = torchcurv.trace(op, num_matvecs=20, method=method,
                        generator=torch.Generator().manual_seed(7))
    assert a == b == d
    assert a.estimate != c.estimate


def test_without_seed_the_global_generator_decides():
    op = torchcurv.MatrixOperator(decaying(50))
    torch.manual_seed(11)
    a = torchcurv.trace(op, num_matvecs=10)
    b = torchcurv.trace(op, num_matvecs=10)
    torch.manual_seed(11)
    assert torchcurv.trace(op, num_matvecs=10) == a
    assert b.estimate != a.estimate


@pytest.mark.parametrize("method", METHODS)
def test_block_size_changes_the_calls_not_the_estimate(method):
    op = torchcurv.MatrixOperator(indefinite(50))
    whole = torchcurv.trace(op, num_matvecs=21, method=method, seed=3)
    calls = op.num_calls
    chunked = torchcurv.trace(op, num_matvecs=21, method=method, seed=3, block_size=4)
    assert chunked.estimate == pytest.approx(whole.estimate, rel=1e-12)
    assert chunked.std_error == pytest.approx(whole.std_error, rel=1e-9)
    assert op.num_calls - calls > calls


@pytest.mark.parametrize(
    ("method", "num_matvecs", "used", "calls"),
    [("hutchinson", 17, 17, 1), ("hutch++", 17, 17, 2), ("xtrace", 16, 16, 2),
     ("xtrace", 17, 16, 2), ("hutch++", 3, 3, 2), ("xtrace", 4, 4, 2)],
)
def test_budget_is_respected_and_reported_exactly(method, num_matvecs, used, calls):
    op = torchcurv.MatrixOperator(decaying(30))
    r = torchcurv.trace(op, num_matvecs=num_matvecs, method=method, seed=0)
    assert r.num_matvecs == op.num_matvecs == used
    assert op.num_calls == calls  # whole blocks through matmat, never a loop of matvecs


def test_single_sample_has_nan_std_error():
    op = torchcurv.MatrixOperator(decaying(30))
    assert math.isnan(torchcurv.trace(op, num_matvecs=1).std_error)
    assert math.isnan(torchcurv.trace(op, num_matvecs=3, method="hutch++").std_error)


def test_float32_operator_gives_the_float64_estimate_to_single_precision():
    A = indefinite(60)
    r64 = torchcurv.trace(torchcurv.MatrixOperator(A), num_matvecs=20, method="xtrace", seed=1)
    r32 = torchcurv.trace(torchcurv.MatrixOperator(A.float()), num_matvecs=20,
                          method="xtrace", seed=1)
    assert r32.estimate == pytest.approx(r64.estimate, rel=1e-5)


def test_callback_sees_every_call_and_progress_bar_runs():
    op = torchcurv.MatrixOperator(decaying(30))
    seen = []
    torchcurv.trace(op, num_matvecs=12, method="xtrace", seed=0, block_size=4,
                    callback=lambda used, total: seen.append((used, total)), progress=True)
    assert seen == [(4, 12), (6, 12), (10, 12), (12, 12)]


def test_hutchpp_on_a_small_hessian_is_within_three_standard_errors_of_its_trace():
    model, criterion, data = case("mlp_tanh", "ce")
    H = torchcurv.HessianOperator(model, criterion, data)
    exact = float(H.to_dense().trace())
    r = torchcurv.trace(H, num_matvecs=30, method="hutch++", seed=0)
    assert r.num_matvecs == 30
    assert abs(r.estimate - exact) <= 3 * r.std_error


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_matvecs": 10, "method": "hutch"}, ValueError, "unknown trace method 'hutch'"),
        ({"num_matvecs": 10, "distribution": "normal"}, ValueError, "unknown distribution"),
        ({"num_matvecs": 0}, ValueError, "needs num_matvecs >= 1"),
        ({"num_matvecs": 2, "method": "hutch++"}, ValueError, "needs num_matvecs >= 3"),
        ({"num_matvecs": 3, "method": "xtrace"}, ValueError, "needs num_matvecs >= 4"),
        ({"num_matvecs": 10.0}, TypeError, "num_matvecs must be an int"),
        ({"num_matvecs": 22, "method": "xtrace"}, ValueError, "more than n=10"),
        ({"num_matvecs": 40, "method": "hutch++"}, ValueError, "more than n=10"),
        ({"num_matvecs": 5, "seed": 1, "generator": torch.Generator()}, ValueError,
         "either seed or generator"),
        ({"num_matvecs": 5, "block_size": 0}, ValueError, "block_size"),
    ],
)
def test_bad_arguments_raise_naming_the_problem(kwargs, error, match):
    op = torchcurv.MatrixOperator(decaying(10))
    with pytest.raises(error, match=match):
        torchcurv.trace(op, **kwargs)


def test_a_plain_tensor_is_refused_with_the_fix():
    with pytest.raises(TypeError, match="MatrixOperator"):
        torchcurv.trace(decaying(10), num_matvecs=5)


@pytest.mark.gpu
@pytest.mark.parametrize("method", METHODS)
def test_cuda_operator_gives_the_cpu_estimate_for_the_same_seed(method):
    A = indefinite(200)
    cpu = torchcurv.trace(torchcurv.MatrixOperator(A), num_matvecs=30, method=method, seed=4)
    gpu_op = torchcurv.MatrixOperator(A.cuda())
    gpu = torchcurv.trace(gpu_op, num_matvecs=30, method=method, seed=4)
    assert gpu.estimate == pytest.approx(cpu.estimate, rel=1e-10)
    assert gpu.num_matvecs == gpu_op.num_matvecs == cpu.num_matvecs
    g = torch.Generator(device="cuda").manual_seed(4)
    on_device = torchcurv.trace(gpu_op, num_matvecs=30, method=method, generator=g)
    assert on_device == torchcurv.trace(gpu_op, num_matvecs=30, method=method,
                                        generator=torch.Generator(device="cuda").manual_seed(4))
