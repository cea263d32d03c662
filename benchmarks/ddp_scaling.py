"""Data-parallel scaling of curvature products: one GPU with all the data against two GPUs
with half each.

The GPT-2-style model of ``curvature_products.py`` (config-built, random weights, eager
attention), ``--batches`` batches of B=8, T=256 in all. One process multiplies with the
whole data set; under torchrun each rank holds every ``world``-th batch and a product is
the ranks' sum (one all-reduce). Times one Hessian-vector product (autograd) and one GGN
product (forward-mode JVP); the speed-up is the one-process time over the two-rank time.

Both measurements and the speed-ups, in one go (NVLink multicast stays off):

    bash benchmarks/ddp_scaling.sh ddp.jsonl            # GPU: 1 GPU, then 2 GPUs (nccl)
    bash benchmarks/ddp_scaling.sh ddp.jsonl --tiny     # CPU smoke run (gloo)

Or by hand:

    python benchmarks/ddp_scaling.py --out ddp.jsonl                     # all data, 1 process
    torchrun --nproc-per-node 2 benchmarks/ddp_scaling.py --out ddp.jsonl
    python benchmarks/ddp_scaling.py --summarize ddp.jsonl               # speed-up lines
"""

from __future__ import annotations

import argparse
import json
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from common import emit, gpt2_problem, machine, timed, write_to
from torch import nn

import torchcurv


def lm_output_objective() -> torchcurv.Objective:
    """Next-token cross-entropy with the logits as the model output (for the GGN too)."""

    def forward(model, batch):
        logits = model(input_ids=batch["input_ids"]).logits[:, :-1]
        return logits.reshape(-1, logits.shape[-1])

    def targets(batch):
        return batch["labels"][:, 1:].reshape(-1)

    criterion = nn.CrossEntropyLoss()
    return torchcurv.Objective(
        forward=forward, loss=lambda output, batch: criterion(output, targets(batch)),
        weight=lambda batch: (targets(batch) != -100).sum(), criterion=criterion,
        targets=targets)


def setup() -> tuple[torch.device, int, int]:
    """Start torch.distributed under torchrun (nccl on GPUs, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1:
        # NVLink multicast (NVLS) can take a shared host's GPUs out of service: keep it off.
        if os.environ.setdefault("NCCL_NVLS_ENABLE", "0") != "0":
            raise SystemExit("set NCCL_NVLS_ENABLE=0: this benchmark never uses NVLink multicast")
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=5),
                                device_id=device if cuda else None)
        return device, dist.get_rank(), world
    return device, 0, 1


def measure(args) -> None:
    device, rank, world = setup()
    if rank == 0:
        write_to(args.out)
    config = "tiny" if args.tiny else "gpt2-4layer"
    model, batches = gpt2_problem(device, small=args.tiny, attn="eager",
                                  num_batches=args.batches)
    shard = batches[rank::world]
    if rank == 0:
        emit(what="machine", world=world, config=config, **machine(device))
    objective = lm_output_objective()
    ops = {
        "hessian": torchcurv.HessianOperator(model, objective, shard),
        "ggn": torchcurv.GGNOperator(model, objective, shard),
    }
    for name, op in ops.items():
        assert op.distributed == (world > 1)
        v = torch.randn(op.n, generator=torch.Generator().manual_seed(0)).to(device, op.dtype)
        if world > 1:
            dist.barrier()
        ms = timed(lambda op=op, v=v: op.matvec(v), device, reps=args.reps) * 1e3
        # The product's norm, equal in the 1- and 2-rank runs up to float32 rounding.
        norm = float(op.matvec(v).double().norm())
        if rank == 0:
            emit(what="matvec", config=config, op=name, world=world, ms=ms, n=op.n,
                 batches=args.batches, batches_per_rank=len(shard), product_norm=norm,
                 peak_gib=(torch.cuda.max_memory_allocated(device) / 2**30
                           if device.type == "cuda" else None))
    if world > 1:
        dist.destroy_process_group()


def summarize(path: str) -> None:
    """Append one ``speedup`` line per (config, op) from the latest 1- and 2-rank runs."""
    write_to(path)
    latest: dict[tuple, dict] = {}
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            if rec.get("what") == "matvec":
                latest[(rec["config"], rec["op"], rec["world"])] = rec
    for (config, op, world), rec in sorted(latest.items()):
        one = latest.get((config, op, 1))
        if world == 1 or one is None:
            continue
        speedup = one["ms"] / rec["ms"]
        emit(what="speedup", config=config, op=op, world=world, ms_1=one["ms"],
             ms_n=rec["ms"], speedup=speedup, efficiency=speedup / world,
             product_norm_rel_diff=abs(rec["product_norm"] - one["product_norm"])
             / one["product_norm"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny model, for a CPU smoke run")
    ap.add_argument("--batches", type=int, default=8,
                    help="batches (B=8, T=256) in the whole data set; a multiple of the ranks")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=None, help="append the JSON lines to this file (rank 0)")
    ap.add_argument("--summarize", metavar="PATH", default=None,
                    help="only compute speed-ups from the matvec lines in PATH")
    args = ap.parse_args()
    if args.summarize:
        summarize(args.summarize)
    else:
        measure(args)


if __name__ == "__main__":
    main()
