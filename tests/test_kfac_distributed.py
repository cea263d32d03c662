"""KFAC and EKFAC over torch.distributed (gloo, 2 CPU processes): each rank walks its
shard, the factors are summed with one all-reduce (EKFAC: one more for its eigenvalues),
and the operator equals the single-process one on the union of the shards, identical on
every rank, with products that need no communication."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from gloo_ranks import WORLD, assert_check_ok, run_checks, shard_of
from zoo import case, rel

import torchcurv
from torchcurv.operators import kfac

COLLECTIVE_TIMEOUT_S = 30
JOIN_TIMEOUT_S = 120


def _same_on_all_ranks(t: torch.Tensor, what: str) -> None:
    everyone = [torch.empty_like(t) for _ in range(WORLD)]
    dist.all_gather(everyone, t.contiguous())
    assert all(torch.equal(everyone[0], x) for x in everyone), f"ranks differ on {what}"


def check_factors_are_summed_with_one_all_reduce(rank):
    model, criterion, data = case("mlp_tanh", "ce")
    V = torch.randn(sum(p.numel() for p in model.parameters()), 3, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(0))
    for cls, reductions in ((torchcurv.KFACOperator, 1), (torchcurv.EKFACOperator, 2)):
        local = cls(model, criterion, data, fisher_type="type-2", distributed=False)
        for wrap in ("plain", "ddp"):
            net = model if wrap == "plain" else torch.nn.parallel.DistributedDataParallel(model)
            calls: list[int] = []
            original = kfac.all_reduce_sum

            def counted(*args, original=original, calls=calls, **kwargs):
                calls.append(1)
                return original(*args, **kwargs)

            kfac.all_reduce_sum = counted
            try:
                op = cls(net, criterion, shard_of(data, rank), fisher_type="type-2")
            finally:
                kfac.all_reduce_sum = original
            assert op.distributed and len(calls) == reductions, (cls.__name__, calls)
            assert op.num_examples == 10
            # products are local: no collective may run
            real = dist.all_reduce
            dist.all_reduce = None  # type: ignore[assignment]
            try:
                product = op @ V
                inverse = op.inverse(0.1, mode="exact") @ V
            finally:
                dist.all_reduce = real
            assert rel(product, local @ V) < 1e-10, (cls.__name__, wrap)
            assert rel(inverse, local.inverse(0.1, mode="exact") @ V) < 1e-10
            _same_on_all_ranks(product, f"{cls.__name__}/{wrap} product")
            assert abs(op.logdet(0.1) - local.logdet(0.1)) < 1e-10 * abs(local.logdet(0.1))
            assert all(p.grad is None for p in model.parameters()), "DDP hooks fired"


def check_monte_carlo_draws_are_keyed_by_the_global_batch(rank):
    model, criterion, data = case("mlp_tanh", "mse")
    op = torchcurv.KFACOperator(model, criterion, shard_of(data, rank), mc_samples=2,
                                seed=3, kfac_approx="reduce")
    assert op.per_batch_seeds and op.batch_offset == (0 if rank == 0 else 2)
    single = torchcurv.KFACOperator(model, criterion, data, mc_samples=2, seed=3,
                                    kfac_approx="reduce", per_batch_seeds=True,
                                    distributed=False)
    V = torch.randn(op.n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    product = op @ V
    assert rel(product, single @ V) < 1e-10
    _same_on_all_ranks(product, "Monte-Carlo KFAC product")


def check_nonfinite_loss_raises_on_every_rank(rank):
    model, criterion, data = case("mlp_tanh", "ce")
    shard = shard_of(data, rank)
    if rank == 1:
        shard = [(torch.full_like(x, float("nan")), y) for x, y in shard]
    expected = "batch" if rank == 1 else "other ranks"
    with pytest.raises(torchcurv.NonFiniteLossError, match=expected):
        torchcurv.KFACOperator(model, criterion, shard, fisher_type="empirical",
                               check_deterministic=False)


CHECKS = [check_factors_are_summed_with_one_all_reduce,
          check_monte_carlo_draws_are_keyed_by_the_global_batch,
          check_nonfinite_loss_raises_on_every_rank]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    out = tmp_path_factory.mktemp("kfac_distributed")
    return out, run_checks(out, CHECKS, collective_timeout_s=COLLECTIVE_TIMEOUT_S,
                           join_timeout_s=JOIN_TIMEOUT_S)


@pytest.mark.timeout(JOIN_TIMEOUT_S + 60)
@pytest.mark.parametrize("check", [c.__name__ for c in CHECKS])
def test_two_gloo_ranks(outcomes, check):
    assert_check_ok(*outcomes, check)
