"""Where the time of a torch Lanczos solve goes: operator products vs everything else.

Top-10 'LA' of the MLP Hessian (benchmarks/common.py) with ``lanczos`` and ``block``;
one JSON line per solve with the wall time, the time inside operator products and the
rest, then the torch profiler's table of the ops outside the products (stdout).
"""

from __future__ import annotations

import argparse
import time

import torch
from common import TimedOperator, emit, machine, mlp_problem, sync, write_to

import torchcurv


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    write_to(args.out)
    device = torch.device(args.device)
    emit(what="machine", **machine(device))
    model, criterion, data = mlp_problem(device, args.small)
    H = TimedOperator(torchcurv.HessianOperator(model, criterion, data))
    # warm-up: kernels, allocator, cuBLAS/cuSOLVER handles of every op a solve uses
    torchcurv.eigsh(torchcurv.MatrixOperator(torch.eye(64, device=device) * torch.arange(
        64, device=device)), k=3, backend="lanczos")
    torchcurv.eigsh(torchcurv.MatrixOperator(torch.eye(64, device=device) * torch.arange(
        64, device=device)), k=3, backend="block", block_size=4)
    H.matvec(torch.randn(H.n, device=device))
    for backend, options in (("lanczos", {}), ("block", {"block_size": 4})):
        H.seconds = 0.0
        sync(device)
        t0 = time.perf_counter()
        r = torchcurv.eigsh(H, k=args.k, which="LA", tol=1e-6, backend=backend, seed=0,
                            **options)
        sync(device)
        wall = time.perf_counter() - t0
        emit(what="profile", backend=backend, s=wall, matvec_s=H.seconds,
             outside_s=wall - H.seconds, matvecs=r.num_matvecs,
             converged=int(r.converged.sum()), restarts=r.info.restarts)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        torchcurv.eigsh(H, k=args.k, which="LA", tol=1e-6, backend="lanczos", seed=0)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=25), flush=True)
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25), flush=True)


if __name__ == "__main__":
    main()
