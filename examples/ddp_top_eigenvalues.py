"""Top Hessian and GGN eigenvalues of a DDP-wrapped model, each rank holding a data shard.

Run on CPU (gloo) or GPUs (nccl, chosen when CUDA is available):

    torchrun --nproc-per-node 2 examples/ddp_top_eigenvalues.py
    torchrun --nproc-per-node 2 examples/ddp_top_eigenvalues.py --verify

Every curvature product is the sum of the ranks' products over their shards (one
all-reduce each), so every rank runs the same eigensolver on the same vectors and gets
the same eigenvalues; rank 0 prints them. ``--verify`` makes rank 0 also build the
single-process operator on the full data set and print the largest relative difference.
"""

from __future__ import annotations

import argparse
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import torchcurv


def make_problem(samples: int):
    """A fixed random classification data set and an MLP (the same on every rank)."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(samples, 20, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (samples,), generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 5)).double()
    return model, TensorDataset(X, y)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=1024,
                    help="data set size; a multiple of the world size (see below)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("-k", type=int, default=5, help="eigenvalues to compute")
    ap.add_argument("--verify", action="store_true",
                    help="rank 0 compares with the single-process operator on all data")
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=5))
    try:
        top_eigenvalues(args, device, local_rank if cuda else None)
        # The DDP wrapper and its communication state die with top_eigenvalues' frame,
        # before the group goes. Rank 0 may still be computing its single-process
        # reference: a rank that tears the group down while a peer is busy can abort in
        # gloo's threads at exit, so everyone waits for the last rank first. Not after
        # an error: the other ranks may be inside a product's collective, and a rank
        # waiting here would keep torchrun from seeing the failure.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def top_eigenvalues(args: argparse.Namespace, device: torch.device,
                    device_id: int | None) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    model, dataset = make_problem(args.samples)
    if len(dataset) % world:
        # DistributedSampler pads the last shard by repeating samples, which would count
        # them twice in the curvature; keep the data set a multiple of the world size.
        raise SystemExit(f"--samples must be a multiple of the world size {world}")
    model = model.to(device).eval()
    ddp = nn.parallel.DistributedDataParallel(
        model, device_ids=None if device_id is None else [device_id])
    # shuffle=False: every product walks the same batches (shuffle=True is fine too as
    # long as set_epoch is not called between products).
    sampler = DistributedSampler(dataset, shuffle=False)
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler)

    criterion = nn.CrossEntropyLoss()
    results = {}
    for name, cls in (("Hessian", torchcurv.HessianOperator), ("GGN", torchcurv.GGNOperator)):
        op = cls(ddp, criterion, loader)  # DDP: distributed over ddp's process group
        res = torchcurv.eigsh(op, k=args.k, which="LA", backend="lanczos", tol=1e-8)
        results[name] = res.eigenvalues
        if rank == 0:
            top = ", ".join(f"{v:.6g}" for v in res.eigenvalues.flip(0).tolist())
            print(f"{name} top-{args.k} ({op.n} parameters, {world} ranks, "
                  f"{len(sampler)} samples/rank): {top}", flush=True)
        if args.verify and rank == 0:
            full = DataLoader(dataset, batch_size=args.batch_size)
            single = cls(model, criterion, full, distributed=False)
            ref = torchcurv.eigsh(single, k=args.k, which="LA", backend="lanczos", tol=1e-8)
            diff = float((res.eigenvalues - ref.eigenvalues).abs().max()
                         / ref.eigenvalues.abs().max())
            print(f"{name} max relative difference to one process: {diff:.2e}", flush=True)


if __name__ == "__main__":
    main()
