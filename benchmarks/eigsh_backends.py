"""Top-k eigenpairs of an MLP Hessian: torchcurv's scipy and CuPy paths beside two peers.

Prints one JSON line per measurement. On the GPU (H100):

    python benchmarks/eigsh_backends.py --device cuda

and quickly on a CPU (small model, CuPy rows skipped):

    python benchmarks/eigsh_backends.py --device cpu --small

Rows:
- ``torchcurv+arpack``: ``scipy.sparse.linalg.eigsh(as_linear_operator(H))``;
- ``torchcurv+cupy``: ``cupyx.scipy.sparse.linalg.eigsh(as_cupy_linear_operator(H))``;
  both with the same ``k``, ``which``, ``tol`` and a start vector from the same seed,
  and with the time inside products measured by a synchronising wrapper, so
  ``outside_frac`` is the share of wall time the solver and adapter spend beyond the
  products (target for the CuPy path: <= 0.10);
- ``front_door``: ``torchcurv.eigsh(H, backend=...)`` as a user calls it (relative
  tolerance, converged flags checked after the solve);
- peers, run as in /work/shared/bench/peer_baselines_gpu.py: scipy ARPACK on
  curvlinops' ``to_scipy()`` and CuPy eigsh on hessian-eigenthings' ``matvec``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import platform
import time
import traceback

import numpy as np
import scipy.sparse.linalg as sla
import torch
from common import TimedOperator

import torchcurv
from torchcurv.algorithms.assemble import synchronize
from torchcurv.algorithms.result import residual_norms, start_block


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)




def setup(device: torch.device, small: bool):
    torch.manual_seed(0)
    d_in, hidden, batch = (64, 32, 128) if small else (784, 512, 1024)
    model = torch.nn.Sequential(
        torch.nn.Linear(d_in, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, hidden),
        torch.nn.Tanh(), torch.nn.Linear(hidden, 10)).to(device, torch.float32)
    data = [(torch.randn(batch, d_in, device=device), torch.randint(0, 10, (batch,),
                                                                   device=device))
            for _ in range(4)]
    return model, torch.nn.CrossEntropyLoss(), data


def top(values) -> list[float]:
    return sorted((float(v) for v in np.asarray(values).ravel()), reverse=True)[:3]


def max_rel_residual(H, vals, vecs) -> float:
    vals = torch.as_tensor(np.asarray(vals), dtype=torch.float64)
    res = residual_norms(H, vals, vecs)
    return float((res / vals.abs().clamp_min(1e-300)).max())


def run_arpack(H, args, v0):
    T = TimedOperator(H)
    A = torchcurv.as_linear_operator(T)
    t0 = time.perf_counter()
    vals, vecs = sla.eigsh(A, k=args.k, which=args.which, tol=args.tol, v0=v0.cpu().numpy())
    wall = time.perf_counter() - t0
    emit(what="eigsh", lib="torchcurv+arpack", s=wall, matvecs=A.num_matvecs,
         matvec_s=T.seconds, outside_s=wall - T.seconds, outside_frac=1 - T.seconds / wall,
         top=top(vals),
         max_rel_residual=max_rel_residual(H, vals, torch.from_numpy(vecs).to(H.device, H.dtype)))


def run_cupy(H, args, v0):
    import cupy
    import cupyx.scipy.sparse.linalg as csla

    T = TimedOperator(H)
    C = torchcurv.as_cupy_linear_operator(T)
    start = cupy.from_dlpack((v0 / v0.norm()).to(torch.float32).contiguous())
    kwargs = {"v0": start} if "v0" in inspect.signature(csla.eigsh).parameters else {}
    synchronize(H.device)
    t0 = time.perf_counter()
    vals, vecs = csla.eigsh(C, k=args.k, which=args.which, tol=args.tol, **kwargs)
    synchronize(H.device)
    wall = time.perf_counter() - t0
    frac = 1 - T.seconds / wall
    emit(what="eigsh", lib="torchcurv+cupy", s=wall, matvecs=C.num_matvecs,
         matvec_s=T.seconds, outside_s=wall - T.seconds, outside_frac=frac,
         meets_target=frac <= 0.10, top=top(cupy.asnumpy(vals)),
         max_rel_residual=max_rel_residual(H, cupy.asnumpy(vals), torch.from_dlpack(vecs)),
         start_vector="seeded" if kwargs else "cupy random (this CuPy has no v0)")


def run_front_door(H, args, backend):
    r = torchcurv.eigsh(H, k=args.k, which=args.which, backend=backend, tol=args.tol,
                        seed=args.seed)
    emit(what="eigsh", lib=f"front_door[{backend}]", s=r.wall_time, matvecs=r.num_matvecs,
         converged=int(r.converged.sum()), top=top(r.eigenvalues),
         max_rel_residual=float((r.residuals / r.eigenvalues.abs()).max()), info=r.info.as_dict())


def run_curvlinops(model, loss, data, args):
    import curvlinops

    params = [p for p in model.parameters()]
    S = curvlinops.HessianLinearOperator(model, loss, params, data).to_scipy()
    calls = {"n": 0}

    class Counting(sla.LinearOperator):
        def __init__(self):
            super().__init__(dtype=S.dtype, shape=S.shape)

        def _matvec(self, x):
            calls["n"] += 1
            return S.matvec(x)

    t0 = time.perf_counter()
    vals = sla.eigsh(Counting(), k=args.k, which=args.which, tol=args.tol,
                     return_eigenvectors=False)
    emit(what="eigsh", lib="curvlinops+scipy", s=time.perf_counter() - t0, matvecs=calls["n"],
         top=top(vals))


def run_eigenthings(model, loss, data, args):
    import cupy
    import cupyx.scipy.sparse.linalg as csla
    import hessian_eigenthings as he

    Hh = he.HessianOperator(model, data, he.supervised_loss(loss))
    calls = {"n": 0}

    class CupyH(csla.LinearOperator):
        def __init__(self):
            super().__init__(dtype=cupy.float32, shape=(Hh.size, Hh.size))

        def _matvec(self, x):
            calls["n"] += 1
            return cupy.from_dlpack(Hh.matvec(torch.from_dlpack(x.ravel())).detach())

    synchronize(torch.device("cuda"))
    t0 = time.perf_counter()
    vals = csla.eigsh(CupyH(), k=args.k, which=args.which, tol=args.tol,
                      return_eigenvectors=False)
    synchronize(torch.device("cuda"))
    emit(what="eigsh", lib="cupyx(he matvec)", s=time.perf_counter() - t0, matvecs=calls["n"],
         top=top(cupy.asnumpy(vals)))


def guarded(name, fn, *a) -> None:
    try:
        fn(*a)
    except ImportError as e:
        emit(what="eigsh", lib=name, skipped=f"{type(e).__name__}: {e}")
    except Exception:
        emit(what="eigsh", lib=name, error=traceback.format_exc()[-800:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--small", action="store_true", help="a small MLP, for a quick CPU check")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--which", default="LA")
    p.add_argument("--tol", type=float, default=1e-6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-peers", action="store_true")
    args = p.parse_args()
    device = torch.device(args.device)
    model, loss, data = setup(device, args.small)
    H = torchcurv.HessianOperator(model, loss, data)
    emit(what="setup", device=torch.cuda.get_device_name(device) if device.type == "cuda"
         else platform.processor() or "cpu", torch=torch.__version__, n=H.n, k=args.k,
         which=args.which, tol=args.tol, small=args.small)
    v = torch.randn(H.n, device=device)
    for _ in range(2):
        H.matvec(v)
    times = []
    for _ in range(5):
        synchronize(device)
        t0 = time.perf_counter()
        H.matvec(v)
        synchronize(device)
        times.append(time.perf_counter() - t0)
    emit(what="hvp", lib="torchcurv", ms=1e3 * sorted(times)[2])

    v0 = start_block(H.n, 1, torch.float64, device, args.seed)[:, 0]
    guarded("torchcurv+arpack", run_arpack, H, args, v0)
    if device.type == "cuda":
        guarded("torchcurv+cupy", run_cupy, H, args, v0)
    guarded("front_door[arpack]", run_front_door, H, args, "arpack")
    if device.type == "cuda":
        guarded("front_door[cupy]", run_front_door, H, args, "cupy")
    if not args.no_peers:
        guarded("curvlinops+scipy", run_curvlinops, model, loss, data, args)
        if device.type == "cuda":
            guarded("cupyx(he matvec)", run_eigenthings, model, loss, data, args)


if __name__ == "__main__":
    main()
