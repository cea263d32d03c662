"""Curvature products and algorithms over torch.distributed (gloo, 2 CPU processes) equal
the single-process ones on the union of the shards, agree bit for bit across ranks, and
never hang on a failure.

One pair of processes runs every check (spawning costs seconds); each test below asserts
one check's outcome. Every collective runs under the process group's timeout and the
processes under a join timeout, so a broken check fails instead of hanging.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from gloo_ranks import WORLD, assert_check_ok, run_checks, shard_of
from zoo import case, rel

import torchcurv

COLLECTIVE_TIMEOUT_S = 30
JOIN_TIMEOUT_S = 150


def _gather(t: torch.Tensor) -> list[torch.Tensor]:
    out = [torch.empty_like(t) for _ in range(WORLD)]
    dist.all_gather(out, t.contiguous())
    return out


def _same_on_all_ranks(t: torch.Tensor, what: str) -> None:
    everyone = _gather(t)
    assert all(torch.equal(everyone[0], x) for x in everyone), f"ranks differ on {what}"


def _operators(model, criterion, data, **kw):
    yield "hessian", torchcurv.HessianOperator(model, criterion, data, **kw)
    yield "hessian-fd", torchcurv.HessianOperator(
        model, criterion, data, method="finite_difference", **kw)
    yield "ggn", torchcurv.GGNOperator(model, criterion, data, **kw)
    yield "ef", torchcurv.EmpiricalFisherOperator(model, criterion, data, **kw)


# -- checks, each run on both ranks ------------------------------------------------
def check_products(rank):
    for model_name in ("mlp_tanh", "layernorm"):
        model, criterion, data = case(model_name, "ce")
        local = dict(_operators(model, criterion, data, distributed=False))
        shard = shard_of(data, rank)
        for wrap in ("plain", "ddp"):
            net = model if wrap == "plain" else torch.nn.parallel.DistributedDataParallel(model)
            for name, op in _operators(net, criterion, shard, debug_distributed=True):
                assert op.distributed
                V = torch.randn(op.n, 3, dtype=torch.float64,
                                generator=torch.Generator().manual_seed(0))
                tol = 1e-6 if name.endswith("-fd") else 1e-10
                product = op.matmat(V)
                assert rel(product, local[name].matmat(V)) < tol, (model_name, wrap, name)
                _same_on_all_ranks(product, f"{model_name}/{wrap}/{name}")
                assert all(p.grad is None for p in model.parameters()), "DDP hooks fired"
        for name, op in _operators(model, criterion, shard, microbatch_size=2):
            V = torch.randn(op.n, 2, dtype=torch.float64,
                            generator=torch.Generator().manual_seed(1))
            tol = 1e-6 if name.endswith("-fd") else 1e-10
            product = op.matmat(V)
            assert rel(product, local[name].matmat(V)) < tol, (model_name, "micro", name)
            _same_on_all_ranks(product, f"{model_name}/microbatch_size=2/{name}")


def check_budgeted_blocks(rank):
    # Under a memory budget the ranks measure their own peaks but agree on every
    # sub-block: the split product is the single-process one, the same on every rank.
    # Rank 1's budget is looser than rank 0's; the smaller (one vector) is taken.
    model, criterion, data = case("mlp_tanh", "ce")
    local = torchcurv.HessianOperator(model, criterion, data, distributed=False)
    H = torchcurv.HessianOperator(model, criterion, shard_of(data, rank),
                                  max_memory=1 if rank == 0 else 10**12)
    widths = []
    product = H._product
    H._product = lambda V: widths.append(V.shape[1]) or product(V)
    V = torch.randn(H.n, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    out = H.matmat(V)
    assert rel(out, local.matmat(V)) < 1e-10
    _same_on_all_ranks(out, "budgeted block")
    assert widths == [1, 2, 4, 1, 1], widths


def check_mc_fisher(rank):
    # Per-batch seeds keyed by the global batch index: the distributed MC Fisher is the
    # single-process one with per_batch_seeds=True on the shards in rank order.
    model, criterion, data = case("mlp_tanh", "ce")
    op = torchcurv.MCFisherOperator(model, criterion, shard_of(data, rank), mc_samples=3,
                                    seed=4, debug_distributed=True)
    assert op.per_batch_seeds and op.batch_counts == [2, 1]
    assert op.batch_offset == (0 if rank == 0 else 2)
    single = torchcurv.MCFisherOperator(model, criterion, data, mc_samples=3, seed=4,
                                        per_batch_seeds=True, distributed=False)
    V = torch.randn(op.n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    product = op.matmat(V)
    assert rel(product, single.matmat(V)) < 1e-10
    _same_on_all_ranks(product, "MC Fisher product")


def check_eigsh(rank):
    for model_name in ("mlp_tanh", "layernorm"):
        model, criterion, data = case(model_name, "ce")
        H = torchcurv.HessianOperator(model, criterion, shard_of(data, rank),
                                      debug_distributed=True)
        H1 = torchcurv.HessianOperator(model, criterion, data, distributed=False)
        for backend in ("lanczos", "arpack"):
            got = torchcurv.eigsh(H, k=5, backend=backend, tol=1e-12)
            want = torchcurv.eigsh(H1, k=5, backend=backend, tol=1e-12)
            assert got.all_converged, (model_name, backend)
            assert rel(got.eigenvalues, want.eigenvalues) < 1e-10, (model_name, backend)
            _same_on_all_ranks(got.eigenvalues, f"{model_name} {backend} eigenvalues")
            _same_on_all_ranks(got.eigenvectors, f"{model_name} {backend} eigenvectors")


def check_randomized(rank):
    model, criterion, data = case("layernorm", "ce")
    H = torchcurv.HessianOperator(model, criterion, shard_of(data, rank), debug_distributed=True)
    H1 = torchcurv.HessianOperator(model, criterion, data, distributed=False)
    est = torchcurv.trace(H, num_matvecs=12, method="hutch++", seed=7)
    assert abs(est.estimate - torchcurv.trace(H1, num_matvecs=12, method="hutch++",
                                              seed=7).estimate) < 1e-10 * abs(est.estimate)
    _same_on_all_ranks(torch.tensor([est.estimate, est.std_error]), "Hutch++")
    slq = torchcurv.spectral_density(H, num_probes=3, lanczos_steps=8, seed=3)
    slq1 = torchcurv.spectral_density(H1, num_probes=3, lanczos_steps=8, seed=3)
    assert rel(slq.nodes, slq1.nodes) < 1e-10 and rel(slq.weights, slq1.weights) < 1e-10
    _same_on_all_ranks(slq.density, "SLQ density")

    # seed=None: the ranks' global generators differ, rank 0's seed is broadcast.
    torch.manual_seed(100 + rank)
    est = torchcurv.trace(H, num_matvecs=12, method="xtrace")
    _same_on_all_ranks(torch.tensor([est.estimate]), "XTrace with seed=None")
    slq = torchcurv.spectral_density(H, num_probes=2, lanczos_steps=5)
    _same_on_all_ranks(slq.nodes, "SLQ nodes with seed=None")
    diag = torchcurv.diagonal(H, num_matvecs=6, method="xdiag")
    _same_on_all_ranks(diag.estimate, "XDiag with seed=None")

    # Ranks drawing different probes is caught by debug_distributed, on every rank.
    with pytest.raises(RuntimeError, match="ranks disagree"):
        torchcurv.trace(H, num_matvecs=3, method="hutchinson", seed=rank)


def check_fsdp2_finite_difference(rank):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model, criterion, data = case("mlp_tanh", "ce")
    reference = torchcurv.HessianOperator(copy.deepcopy(model), criterion, data,
                                          distributed=False)
    mesh = init_device_mesh("cpu", (WORLD,))
    fully_shard(model[0], mesh=mesh)
    fully_shard(model, mesh=mesh)
    before = [p.full_tensor().clone() for p in model.parameters()]
    shard = shard_of(data, rank)  # unequal: rank 1 pads with zero-weight passes
    H = torchcurv.HessianOperator(model, criterion, shard, method="finite_difference",
                                  debug_distributed=True)
    assert H.fsdp and H.n == reference.n
    V = torch.randn(H.n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    product = H.matmat(V)
    err = rel(product, reference.matmat(V))
    assert err < 1e-6, err
    _same_on_all_ranks(product, "FSDP2 product")
    after = [p.full_tensor() for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(after, before)), "parameters changed"
    assert all(p.grad is None for p in model.parameters()), ".grad left behind"
    top = torchcurv.eigsh(H, k=1, backend="lanczos", tol=1e-6)
    expected = torchcurv.eigsh(reference, k=1, backend="lanczos", tol=1e-10)
    assert rel(top.eigenvalues, expected.eigenvalues) < 1e-5
    for make in (lambda: torchcurv.HessianOperator(model, criterion, shard),
                 lambda: torchcurv.GGNOperator(model, criterion, shard)):
        with pytest.raises(TypeError, match="FSDP2"):
            make()


def check_failure_does_not_hang(rank):
    model, _, data = case("mlp_tanh", "ce")
    calls = {"n": 0}

    def loss(output, batch):
        calls["n"] += 1
        if rank == 1 and calls["n"] > 2:  # fails after construction, inside a product
            raise RuntimeError("rank 1 broke")
        return torch.nn.functional.cross_entropy(output, batch[1])

    objective = torchcurv.Objective(forward=lambda m, b: m(b[0]), loss=loss,
                                    weight=lambda b: b[1].numel())
    op = torchcurv.HessianOperator(model, objective, shard_of(data, rank))
    v = torch.ones(op.n, dtype=torch.float64)
    expected = "rank 1 broke" if rank == 1 else "other rank"
    with pytest.raises(RuntimeError, match=expected):
        op @ v


def check_nonfinite_loss_raises_on_every_rank(rank):
    model, criterion, data = case("mlp_tanh", "ce")
    shard = [(x.clone(), y) for x, y in shard_of(data, rank)]
    if rank == 1:
        shard[0][0][0, 0] = float("nan")
    # At construction: rank 1's loss check fails, rank 0 learns of it.
    expected = (torchcurv.NonFiniteLossError, "loss on batch 0") if rank == 1 else (
        RuntimeError, "other rank.*construction")
    with pytest.raises(expected[0], match=expected[1]):
        torchcurv.GGNOperator(model, criterion, shard)
    # In a product (construction checks off): every rank raises NonFiniteLossError.
    op = torchcurv.GGNOperator(model, criterion, shard, check_deterministic=False)
    with pytest.raises(torchcurv.NonFiniteLossError):
        op @ torch.ones(op.n, dtype=torch.float64)


def check_nonfinite_vector_raises_on_every_rank(rank):
    # the vectors' check is read back with the losses at the product's end, where a NaN
    # loss on one rank must not take its place; the next product still pairs up
    model, criterion, data = case("mlp_tanh", "ce")
    shard = [(x.clone(), y) for x, y in shard_of(data, rank)]
    if rank == 1:
        shard[0][0][0, 0] = float("nan")
    v = torch.ones(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    bad = v.clone()
    bad[3] = float("nan")
    for _, op in _operators(model, criterion, shard, check_deterministic=False):
        with pytest.raises(torchcurv.OperatorInputError,
                           match=r"1 non-finite entries \(NaN/inf\)"):
            op.matvec(bad)
        with pytest.raises(torchcurv.NonFiniteLossError):
            op.matvec(v)
    clean = shard_of(data, rank)
    for name, op in _operators(model, criterion, clean, check_deterministic=False):
        with pytest.raises(torchcurv.OperatorInputError, match="non-finite entries"):
            op.matvec(bad)
        _same_on_all_ranks(op.matvec(v), f"{name} after a refused vector")


CHECKS = [check_products, check_budgeted_blocks, check_mc_fisher, check_eigsh, check_randomized,
          check_fsdp2_finite_difference, check_failure_does_not_hang,
          check_nonfinite_loss_raises_on_every_rank, check_nonfinite_vector_raises_on_every_rank]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    out = tmp_path_factory.mktemp("distributed")
    return out, run_checks(out, CHECKS, collective_timeout_s=COLLECTIVE_TIMEOUT_S,
                           join_timeout_s=JOIN_TIMEOUT_S)


@pytest.mark.timeout(JOIN_TIMEOUT_S + 60)
@pytest.mark.parametrize("check", [c.__name__ for c in CHECKS])
def test_two_gloo_ranks(outcomes, check):
    assert_check_ok(*outcomes, check)
