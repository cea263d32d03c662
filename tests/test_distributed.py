"""Curvature products over torch.distributed (gloo, 2 CPU processes) equal the
single-process products on the union of the shards, and never hang on a failure."""

from __future__ import annotations

import os
import socket
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from zoo import case, rel

import torchcurv

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shard(data, rank):
    # Unequal shards: rank 0 holds batches of 5 and 3 rows, rank 1 one batch of 2.
    return data[:2] if rank == 0 else data[2:]


def _operators(model, criterion, data, **kw):
    yield "hessian", torchcurv.HessianOperator(model, criterion, data, **kw)
    yield "hessian-fd", torchcurv.HessianOperator(
        model, criterion, data, method="finite_difference", **kw)
    for name in ("GGNOperator", "EmpiricalFisherOperator"):
        if hasattr(torchcurv, name):
            yield name, getattr(torchcurv, name)(model, criterion, data, **kw)


def _check_products(rank, results):
    V = torch.randn(0, 0)
    for model_name in ("mlp_tanh", "layernorm"):
        model, criterion, data = case(model_name, "ce")
        local = dict(_operators(model, criterion, data, distributed=False))
        shard = _shard(data, rank)
        for wrap in ("plain", "ddp"):
            net = model if wrap == "plain" else torch.nn.parallel.DistributedDataParallel(model)
            for name, op in _operators(net, criterion, shard, debug_distributed=True):
                assert op.distributed
                V = torch.randn(op.n, 3, dtype=torch.float64,
                                generator=torch.Generator().manual_seed(0))
                tol = 1e-6 if name.endswith("-fd") else 1e-10
                err = rel(op.matmat(V), local[name].matmat(V))
                assert err < tol, (model_name, wrap, name, err)
                results.append((model_name, wrap, name, err))
                assert all(p.grad is None for p in model.parameters()), "DDP hooks fired"
        for name, op in _operators(model, criterion, shard, microbatch_size=2):
            V = torch.randn(op.n, 2, dtype=torch.float64,
                            generator=torch.Generator().manual_seed(1))
            err = rel(op.matmat(V), local[name].matmat(V))
            assert err < (1e-6 if name.endswith("-fd") else 1e-10), (model_name, "micro", name, err)
            results.append((model_name, "microbatch_size=2", name, err))
        eig = torch.linalg.eigvalsh(dict(_operators(model, criterion, shard))["hessian"].to_dense())
        assert rel(eig, torch.linalg.eigvalsh(local["hessian"].to_dense())) < 1e-10


def _check_failure_does_not_hang(rank):
    model, _, data = case("mlp_tanh", "ce")
    calls = {"n": 0}

    def loss(output, batch):
        calls["n"] += 1
        if rank == 1 and calls["n"] > 2:  # fails after construction, inside a product
            raise RuntimeError("rank 1 broke")
        return torch.nn.functional.cross_entropy(output, batch[1])

    objective = torchcurv.Objective(forward=lambda m, b: m(b[0]), loss=loss,
                                    weight=lambda b: b[1].numel())
    op = torchcurv.HessianOperator(model, objective, _shard(data, rank))
    v = torch.ones(op.n, dtype=torch.float64)
    expected = "rank 1 broke" if rank == 1 else "other rank"
    try:
        op @ v
    except RuntimeError as exc:
        assert expected in str(exc), str(exc)
    else:
        raise AssertionError("a failure on rank 1 went unnoticed")


def _worker(rank, port, out_dir):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD, timeout=timedelta(seconds=60))
    status = "ok"
    try:
        results = []
        _check_products(rank, results)
        _check_failure_does_not_hang(rank)
        status += "".join(f"\n{r}" for r in results)
    except BaseException:
        status = traceback.format_exc()
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
            f.write(status)
        dist.destroy_process_group()


@pytest.mark.timeout(240)
def test_two_gloo_ranks_match_single_process_on_union_of_shards(tmp_path):
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, str(tmp_path))) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=200)
    hung = [i for i, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert not hung, f"rank(s) {hung} hung"
    for r in range(WORLD):
        status = (tmp_path / f"rank{r}.txt").read_text()
        assert status.startswith("ok"), f"rank {r}:\n{status}"
