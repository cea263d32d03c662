"""Faults on one rank of a distributed operator: every rank raises a clear error in bounded
time, and no later product is wrong.

Two gloo processes on the CPU run every scenario in order; each rank writes what it saw.
An exception or a ``KeyboardInterrupt`` is raised on rank 1 at each phase (construction,
product, inside eigsh / trace / SLQ between products), ranks build operators of different
``n`` or on different weights, a rank's loader shrinks after construction. The collective
timeout is far above the bound each scenario asserts, so "raised when the group timed
out" fails the check instead of passing it.
"""

from __future__ import annotations

import time

import pytest
import torch
from gloo_ranks import assert_check_ok, run_checks, shard_of
from zoo import case, rel

import torchcurv

COLLECTIVE_TIMEOUT_S = 60  # a rank waiting for this long has missed the failure
BOUND_S = 15  # every scenario's ranks must raise well within this
JOIN_TIMEOUT_S = 240


class InjectedError(RuntimeError):
    pass


def _setup(rank):
    model, criterion, data = case("mlp_tanh", "ce")
    shard = shard_of(data, rank)
    reference = {
        "hessian": torchcurv.HessianOperator(model, criterion, data, distributed=False),
        "ggn": torchcurv.GGNOperator(model, criterion, data, distributed=False),
    }
    return model, criterion, shard, reference


def _failing_objective(criterion, rank, fail_at, exc_type):
    """A cross-entropy objective whose loss raises on rank 1 at call ``fail_at`` only."""
    calls = {"n": 0}

    def loss(output, batch):
        calls["n"] += 1
        if rank == 1 and calls["n"] == fail_at:
            raise exc_type("injected on rank 1")
        return criterion(output, batch[1])

    return torchcurv.Objective(forward=lambda m, b: m(b[0]), loss=loss,
                               weight=lambda b: b[1].numel())


def _expect_raise(rank, action, own):
    """Run ``action``: rank 1 must raise ``own``, rank 0 RankFailedError, both quickly."""
    start = time.monotonic()
    try:
        action()
    except BaseException as exc:
        caught = exc
    else:
        caught = None
    elapsed = time.monotonic() - start
    expected = own if rank == 1 else torchcurv.RankFailedError
    assert isinstance(caught, expected), (rank, repr(caught))
    assert elapsed < BOUND_S, f"rank {rank} took {elapsed:.1f} s to raise"
    return caught


def _later_products_right(op, reference):
    V = torch.randn(op.n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for _ in range(2):
        assert rel(op.matmat(V), reference.matmat(V)) < 1e-10


# -- scenarios, each run on both ranks ---------------------------------------------
def check_construction(rank):
    model, criterion, shard, reference = _setup(rank)
    for exc_type in (InjectedError, KeyboardInterrupt):
        # call 1 is the construction's loss check on rank 1
        objective = _failing_objective(criterion, rank, 1, exc_type)
        _expect_raise(rank, lambda o=objective: torchcurv.HessianOperator(model, o, shard),
                      exc_type)
    # a rank failing before its first collective (its param_filter matches nothing)
    pattern = "0.*" if rank == 0 else "nothing*"
    _expect_raise(rank, lambda: torchcurv.GGNOperator(model, criterion, shard,
                                                       param_filter=pattern), ValueError)
    _later_products_right(torchcurv.HessianOperator(model, criterion, shard),
                          reference["hessian"])


def check_product(rank):
    model, criterion, shard, reference = _setup(rank)
    for exc_type in (InjectedError, KeyboardInterrupt):
        for name, make in (("hessian", torchcurv.HessianOperator),
                           ("ggn", torchcurv.GGNOperator)):
            # construction evaluates the loss twice (repeatability): call 3 is a product
            objective = _failing_objective(criterion, rank, 3, exc_type)
            op = make(model, objective, shard)
            v = torch.ones(op.n, dtype=torch.float64)
            _expect_raise(rank, lambda op=op, v=v: op @ v, exc_type)
            _later_products_right(op, reference[name])


def check_between_sub_blocks(rank):
    # A budgeted block (max_memory: every sub-block one vector) interrupted on rank 1
    # between its sub-blocks, outside any product: rank 0 raises at its next checkpoint.
    model, criterion, shard, reference = _setup(rank)
    H = torchcurv.HessianOperator(model, criterion, shard, max_memory=1)
    product = H._product
    calls = {"n": 0}

    def interrupted(V):
        calls["n"] += 1
        if rank == 1 and calls["n"] == 2:
            raise KeyboardInterrupt
        return product(V)

    H._product = interrupted
    V = torch.randn(H.n, 4, dtype=torch.float64)
    _expect_raise(rank, lambda: H.matmat(V), KeyboardInterrupt)
    H._product = product
    _later_products_right(H, reference["hessian"])


def check_algorithms(rank):
    model, criterion, shard, reference = _setup(rank)
    H = torchcurv.HessianOperator(model, criterion, shard)

    def interrupt_on_rank_1(info):
        if rank == 1:
            raise KeyboardInterrupt

    # between products: eigsh's own loop, in a callback
    _expect_raise(rank, lambda: torchcurv.eigsh(H, k=2, backend="lanczos", ncv=6,
                                                callback=interrupt_on_rank_1),
                  KeyboardInterrupt)
    _later_products_right(H, reference["hessian"])
    # inside a product of trace and of SLQ
    for run in (lambda op: torchcurv.trace(op, num_matvecs=12, seed=0),
                lambda op: torchcurv.spectral_density(op, num_probes=2, lanczos_steps=5, seed=0)):
        objective = _failing_objective(criterion, rank, 3, KeyboardInterrupt)
        op = torchcurv.HessianOperator(model, objective, shard)
        _expect_raise(rank, lambda op=op, run=run: run(op), KeyboardInterrupt)
        _later_products_right(op, reference["hessian"])


def check_ranks_disagree(rank):
    model, criterion, shard, _ = _setup(rank)
    start = time.monotonic()
    pattern = "0.*" if rank == 0 else "2.*"  # layers of different sizes: n differs
    with pytest.raises(ValueError, match="ranks disagree on n"):
        torchcurv.HessianOperator(model, criterion, shard, param_filter=pattern)
    other = case("mlp_tanh", "ce")[0]
    if rank == 1:
        with torch.no_grad():
            next(other.parameters())[0, 0] += 1e-3
    with pytest.raises(ValueError, match="values differ between ranks"):
        torchcurv.GGNOperator(other, criterion, shard, debug_distributed=True)
    assert time.monotonic() - start < BOUND_S


def check_loader_shrinks(rank):
    model, criterion, shard, reference = _setup(rank)
    data = list(shard)
    op = torchcurv.GGNOperator(model, criterion, data)
    saved = list(data)
    if rank == 1:
        data.clear()  # an exhausted loader: today's products would be all-zero here
    _expect_raise(rank, lambda: op @ torch.ones(op.n, dtype=torch.float64),
                  torchcurv.DataChangedError)
    data[:] = saved
    _later_products_right(op, reference["ggn"])


CHECKS = [check_construction, check_product, check_between_sub_blocks, check_algorithms,
          check_ranks_disagree, check_loader_shrinks]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    out = tmp_path_factory.mktemp("faults")
    return out, run_checks(out, CHECKS, collective_timeout_s=COLLECTIVE_TIMEOUT_S,
                           join_timeout_s=JOIN_TIMEOUT_S)


@pytest.mark.timeout(JOIN_TIMEOUT_S + 60)
@pytest.mark.parametrize("check", [c.__name__ for c in CHECKS])
def test_fault_on_one_rank(outcomes, check):
    assert_check_ok(*outcomes, check)
