"""Top-k eigenpairs of the MLP Hessian: torchcurv's solvers beside ARPACK and the seed library.

Top-10 'LA' of the Hessian of the MLP 784-512-512-10 (tanh, 4 x 1024, float32; n = 669,706)
with torchcurv's ``lanczos`` and ``block`` backends, scipy ARPACK driving torchcurv's
HVP (one host round trip per matvec), and hessian-eigenthings' ``lanczos`` (fixed steps,
no restart). One JSON line per solve: wall time (device-synchronised), matvecs, operator
calls, eigenvalues, relative residuals ``||Hv - lv|| / |l|`` checked with torchcurv's
operator, and the agreement with ARPACK's eigenvalues.

    python benchmarks/eigsolvers.py --device cuda --out eig.jsonl
    python benchmarks/eigsolvers.py --device cpu --small          # seconds, smoke
"""

from __future__ import annotations

import argparse
import time
import traceback

import numpy as np
import torch
from common import emit, machine, mlp_problem, sync, write_to

import torchcurv
from torchcurv.algorithms.block import block_eigsh
from torchcurv.algorithms.lanczos import lanczos_eigsh
from torchcurv.algorithms.result import residual_norms


def relative_residuals(H, values, vectors) -> list[float]:
    """``||H v - l v|| / |l|`` per pair, with torchcurv's operator (uncounted)."""
    lam = torch.as_tensor(values, dtype=torch.float64)
    R = residual_norms(H, lam, torch.as_tensor(vectors).to(H.device))
    return (R / lam.abs()).tolist()


def ours(H, solver, method, k, tol, reference, **options):
    H.num_matvecs = H.num_calls = 0
    sync(H.device)
    t0 = time.perf_counter()
    r = solver(H, k=k, which="LA", tol=tol, seed=0, **options)
    sync(H.device)
    seconds = time.perf_counter() - t0
    emit(problem="mlp", lib="torchcurv", method=method, s=seconds, matvecs=r.num_matvecs,
         calls=H.num_calls, eigenvalues=r.eigenvalues.tolist(),
         max_rel_residual=float((r.residuals / r.eigenvalues.abs()).max()),
         converged=int(r.converged.sum()), restarts=r.info.restarts,
         stop_reason=r.info.stop_reason, ncv=r.info.ncv,
         block_size=r.info.block_size,
         max_rel_diff_vs_arpack=None if reference is None else float(np.max(np.abs(
             r.eigenvalues.numpy() - reference) / np.abs(reference))))


def arpack(H, k, tol):
    """scipy ``eigsh`` on torchcurv's HVP; returns ARPACK's ascending eigenvalues."""
    import scipy.sparse.linalg as sla

    calls = {"n": 0}

    def matvec(x):
        calls["n"] += 1
        v = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32).ravel()).to(H.device)
        return H.matvec(v).cpu().numpy()

    A = sla.LinearOperator((H.n, H.n), matvec=matvec, dtype=np.float32)
    sync(H.device)
    t0 = time.perf_counter()
    values, vectors = sla.eigsh(A, k=k, which="LA", tol=tol,
                                v0=np.random.default_rng(0).standard_normal(H.n))
    seconds = time.perf_counter() - t0
    V = torch.from_numpy(vectors)
    emit(problem="mlp", lib="scipy-arpack", method="torchcurv hvp", s=seconds,
         matvecs=calls["n"], calls=calls["n"], eigenvalues=values.tolist(),
         max_rel_residual=max(relative_residuals(H, values.tolist(), V)))
    return values.astype(np.float64)


def eigenthings(model, criterion, data, H, k, max_iter, reference):
    import hessian_eigenthings as he

    Hh = he.HessianOperator(model, data, he.supervised_loss(criterion))
    Hh.matvec(torch.randn(Hh.size, device=H.device))  # warm-up, like ours
    sync(H.device)
    t0 = time.perf_counter()
    r = he.lanczos(Hh, k=k, max_iter=max_iter, seed=0, which="LA")
    sync(H.device)
    seconds = time.perf_counter() - t0
    values = torch.as_tensor(r.eigenvalues).double().cpu()
    order = torch.argsort(values)
    vectors = torch.as_tensor(r.eigenvectors)
    vectors = vectors.T  # hessian-eigenthings stores (k, n)
    values, vectors = values[order], vectors[:, order]
    emit(problem="mlp", lib="hessian_eigenthings", method=f"lanczos max_iter={max_iter}",
         s=seconds, matvecs=max_iter, calls=max_iter, eigenvalues=values.tolist(),
         converged=int(torch.as_tensor(r.converged).sum()),
         max_rel_residual=max(relative_residuals(H, values.tolist(), vectors)),
         max_rel_diff_vs_arpack=None if reference is None else float(np.max(np.abs(
             values.numpy() - reference) / np.abs(reference))))


def guarded(lib, fn):
    try:
        return fn()
    except Exception as exc:  # a failing solver is a finding, not the end of the run
        emit(problem="mlp", lib=lib, error=repr(exc)[:400],
             where=traceback.format_exc().splitlines()[-3][:200])
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true", help="tiny MLP, for a CPU smoke run")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--tol", type=float, default=1e-6)
    ap.add_argument("--block-sizes", default="4,10,16", help="comma-separated block sizes")
    ap.add_argument("--no-arpack", action="store_true", help="skip the (slow) ARPACK run")
    ap.add_argument("--out", default=None, help="also append the JSON lines to this file")
    args = ap.parse_args()
    write_to(args.out)
    device = torch.device(args.device)
    emit(what="machine", **machine(device))
    model, criterion, data = mlp_problem(device, args.small)
    H = torchcurv.HessianOperator(model, criterion, data)
    H.matvec(torch.randn(H.n, device=device))  # warm-up (kernels, allocator)
    # and the solvers' own first-use costs (cuBLAS/cuSOLVER handles), as ARPACK's
    # host-side LAPACK needs none: a tiny solve of each torch backend, untimed
    warm = torchcurv.MatrixOperator(torch.diag(torch.arange(64.0, device=device)))
    lanczos_eigsh(warm, k=3)
    block_eigsh(warm, k=3, block_size=4)
    emit(problem="mlp", what="setup", n=H.n, k=args.k, tol=args.tol, dtype=str(H.dtype))

    reference = None if args.no_arpack else guarded("scipy-arpack",
                                                    lambda: arpack(H, args.k, args.tol))
    guarded("torchcurv", lambda: ours(H, lanczos_eigsh, "lanczos", args.k, args.tol,
                                      reference))
    for p in (int(s) for s in args.block_sizes.split(",") if s):
        guarded("torchcurv", lambda p=p: ours(H, block_eigsh, f"block p={p}", args.k,
                                              args.tol, reference, block_size=p))
    for max_iter in (2 * args.k, 60):
        guarded("hessian_eigenthings", lambda m=max_iter: eigenthings(
            model, criterion, data, H, args.k, m, reference))


if __name__ == "__main__":
    main()
