"""Damped solves, block solves and shift-invert: the three targets of issue 18.

1. ``cg``: torch CG (``torchcurv.solve``) on the operator's device against
   ``scipy.sparse.linalg.cg`` on ``as_linear_operator`` (one host round trip per
   product), for the benchmark MLP's GGN plus damping, at the same tolerance and the
   same iteration count (scipy's count is fixed to ours with ``maxiter``); curvlinops'
   ``CGInverseLinearOperator`` (GPyTorch's batched CG) beside them where it runs.
   hessian-eigenthings has no solver.
2. ``block``: one solve of 16 right-hand sides against 16 single solves (seconds per
   column of each, and their ratio).
3. ``shift_invert``: the 5 eigenvalues nearest 0 of a zoo-sized MLP Hessian
   (``eigsh(sigma=0)``, arpack and lanczos) against ``numpy.linalg.eigh``.

One JSON line per measurement, each with ``nparams``.

    python benchmarks/solve.py --device cuda --out benchmarks/results/solve_h200.jsonl
    python benchmarks/solve.py --quick          # CPU smoke: small MLP, seconds
"""

from __future__ import annotations

import argparse
import time
import traceback

import numpy as np
import scipy.sparse.linalg as sla
import torch
from common import emit, machine, mlp_problem, sync, write_to
from torch import nn

import torchcurv

DAMPING = 1e-2


def timed_once(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def rhs(n, m, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, m, generator=g, dtype=torch.float64).to(device, dtype)


def cg_target(G, tol, maxiter, device):
    n = G.n
    b = rhs(n, 1, device, G.dtype)[:, 0]
    torchcurv.solve(G, b, damping=DAMPING, tol=tol, maxiter=2)  # warm-up
    r, seconds = timed_once(lambda: torchcurv.solve(G, b, damping=DAMPING, tol=tol,
                                                   maxiter=maxiter), device)
    iters = int(r.iterations[0])
    emit(target="cg", lib="torchcurv", method="torch cg", nparams=n, s=seconds,
         iterations=iters, matvecs=r.num_matvecs,
         rel_residual=float(r.relative_residuals[0]), converged=bool(r.converged[0]))
    A = torchcurv.as_linear_operator(G) + DAMPING * sla.aslinearoperator(
        sla.LinearOperator((n, n), matvec=lambda x: x, dtype=np.float64))
    bn = b.double().cpu().numpy()
    (x, info), seconds = timed_once(
        lambda: sla.cg(A, bn, rtol=tol, maxiter=iters), device)
    true = (b.double() - (G @ torch.from_numpy(x).to(device, G.dtype)).double()
            - DAMPING * torch.from_numpy(x).to(device)).norm() / b.double().norm()
    emit(target="cg", lib="scipy", method="scipy cg on as_linear_operator", nparams=n,
         s=seconds, iterations=iters, info=info, rel_residual=float(true))
    try:
        import curvlinops

        params = [p for p in G.params]
        Gc = curvlinops.GGNLinearOperator(G.model, G.objective.criterion, params, G.data)
        # curvlinops has no identity operator to add the damping: run the batched CG its
        # CGInverseLinearOperator runs (GPyTorch's linear_cg) on Gc @ X + damping X
        from linear_operator.utils.linear_cg import linear_cg

        def inv_matmul(v):
            return linear_cg(lambda X: Gc @ X + DAMPING * X, v[:, None], tolerance=tol,
                             max_iter=iters)[:, 0]

        y, seconds = timed_once(lambda: inv_matmul(b), device)
        true = (b - (G @ y) - DAMPING * y).double().norm() / b.double().norm()
        emit(target="cg", lib="curvlinops", method="linear_cg (CGInverseLinearOperator)",
             nparams=n, s=seconds, iterations=iters, rel_residual=float(true))
    except Exception as e:  # a peer failing is a result to record, not a crash
        emit(target="cg", lib="curvlinops", method="CGInverseLinearOperator", nparams=n,
             error=f"{type(e).__name__}: {e}"[:300], trace=traceback.format_exc()[-600:])


def block_target(G, tol, maxiter, device, m=16):
    B = rhs(G.n, m, device, G.dtype, seed=1)
    block, s_block = timed_once(lambda: torchcurv.solve(G, B, damping=DAMPING, tol=tol,
                                                       maxiter=maxiter), device)
    singles = 0.0
    for j in range(m):
        _, s = timed_once(lambda j=j: torchcurv.solve(G, B[:, j], damping=DAMPING, tol=tol,
                                                     maxiter=maxiter), device)
        singles += s
    emit(target="block", lib="torchcurv", nparams=G.n, columns=m, s_block=s_block,
         s_singles=singles, per_column_ratio=s_block / singles,
         block_matvecs=block.num_matvecs, converged=int(block.converged.sum()),
         iterations=block.iterations.tolist())


def shift_invert_target(tol):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(b, 4, generator=g, dtype=torch.float64),
             torch.randn(b, 3, generator=g, dtype=torch.float64)) for b in (16, 16)]
    H = torchcurv.HessianOperator(model, nn.MSELoss(), data)
    dense = H.to_dense().cpu().numpy()
    ev = np.linalg.eigh((dense + dense.T) / 2)[0]
    nearest = np.sort(ev[np.argsort(np.abs(ev))[:5]])
    for backend in ("arpack", "lanczos"):
        r, seconds = timed_once(lambda backend=backend: torchcurv.eigsh(
            H, k=5, sigma=0.0, backend=backend, tol=tol), H.device)
        emit(target="shift_invert", lib="torchcurv", backend=backend, nparams=H.n, s=seconds,
             matvecs=r.num_matvecs, eigenvalues=r.eigenvalues.tolist(),
             eigh_nearest=nearest.tolist(),
             max_abs_diff_vs_eigh=float(np.max(np.abs(r.eigenvalues.numpy() - nearest))),
             converged=int(r.converged.sum()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="CPU smoke: the small MLP")
    parser.add_argument("--tol", type=float, default=1e-6)
    parser.add_argument("--maxiter", type=int, default=500)
    parser.add_argument("--out")
    args = parser.parse_args()
    write_to(args.out)
    device = torch.device("cpu" if args.quick else args.device)
    emit(machine=machine(device), quick=args.quick)
    model, criterion, data = mlp_problem(device, small=args.quick)
    G = torchcurv.GGNOperator(model, criterion, data)
    maxiter = 30 if args.quick else args.maxiter
    cg_target(G, args.tol, maxiter, device)
    block_target(G, args.tol, maxiter, device)
    shift_invert_target(1e-10)


if __name__ == "__main__":
    main()
