"""Where a torch-Lanczos solve's time goes at language-model scale: products against
Gram-Schmidt, QR, Ritz vectors and residual checks, per restart, with the allocator's
retries (a caching allocator that runs out of cached blocks frees them all and
synchronises, which shows as steps far slower than their parts).

    python benchmarks/lanczos_phases.py                 # 1.1B LLaMA, bf16, on CUDA
    python benchmarks/lanczos_phases.py --quick         # tiny config on the CPU

Each phase is timed around the :class:`~torchcurv.algorithms.krylov.KrylovBasis` method
that does it, with the device synchronised on both sides, so the phases add up to the
solve's time up to the Python in between; ``breakdown_replacement`` counts the
directions the recurrence judged rounding noise and replaced by random ones (each one
more orthogonalization). One JSON line per restart and one summary with the
eigenvalues and their true relative residuals (from products, not estimates).
"""
from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from common import emit, machine, sync, timed, write_to
from lm_billion import (
    LLAMA,
    QUICK_LLAMA,
    QUICK_VOCAB,
    TOL,
    VOCAB,
    llama,
    nparams,
    operator,
    token_batches,
)

import torchcurv
from torchcurv.algorithms import krylov, lanczos

PHASES = {  # phase name: (module, attribute) of the function timed as that phase
    "product": (krylov.KrylovBasis, "apply"),
    "gram_schmidt": (krylov.KrylovBasis, "orthogonalize"),
    "qr": (krylov.KrylovBasis, "block_qr"),
    "breakdown_replacement": (krylov.KrylovBasis, "_random_orthogonal"),
    "ritz_vectors": (lanczos, "_ritz_vectors"),
    "residual_check": (lanczos, "residual_norms"),
}


def timing(totals: dict, counts: dict, device: torch.device):
    """Patch every phase's function to add its synchronised seconds to ``totals``;
    returns the undo."""
    saved = []
    for name, (owner, attr) in PHASES.items():
        fn = getattr(owner, attr)
        saved.append((owner, attr, fn))

        def timed(*a, _fn=fn, _name=name, **kw):
            sync(device)
            t0 = time.perf_counter()
            out = _fn(*a, **kw)
            sync(device)
            totals[_name] += time.perf_counter() - t0
            counts[_name] += 1
            return out

        setattr(owner, attr, timed)

    def undo():
        for owner, attr, fn in saved:
            setattr(owner, attr, fn)
    return undo


def projections(ctx: dict, n: int, device: torch.device) -> None:
    """One Gram-Schmidt projection ``W Q^T`` (``W``: 1 vector, ``Q``: 1 or 21 basis
    rows, float32, the bfloat16 solve's arithmetic) at the model's size: the plain
    product beside :func:`~torchcurv.algorithms.krylov.inner_products`' pieces, and the
    bytes-read floor (both inputs once) at the device's copy bandwidth in the same run."""
    W = torch.randn(1, 1, n, device=device)
    copy_s = timed(lambda: W.clone(), device, reps=3, warmup=1)  # reads and writes n floats
    for rows in (1, 21):
        Q = torch.randn(1, rows, n, device=device)
        plain = timed(lambda Q=Q: W @ Q.transpose(1, 2), device, reps=3, warmup=1)
        pieces = timed(lambda Q=Q: krylov.inner_products(W, Q), device, reps=3, warmup=1)
        emit(**ctx, what="projection", rows=rows, plain_s=plain, pieces_s=pieces,
             floor_s=copy_s * (1 + rows) / 2)
        del Q


def retries(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    return torch.cuda.memory_stats(device).get("num_alloc_retries", 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--method", default="ggn/forward")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--ncv", type=int, default=21)
    ap.add_argument("--maxiter", type=int, default=40)
    ap.add_argument("--basis-dtype", default=None, choices=[None, "bfloat16", "float32"])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    write_to(args.out)
    device = torch.device("cpu" if args.quick else "cuda")
    shape, vocab = (QUICK_LLAMA, QUICK_VOCAB) if args.quick else (LLAMA, VOCAB)
    seq_len = 32 if args.quick else 2048
    model = llama(shape["1.1b"], vocab, device, torch.bfloat16, seq_len)
    batches = token_batches(vocab, 2, seq_len, device)
    op = operator(args.method, model, batches)
    ctx = dict(model="llama-1.1b" + ("(quick)" if args.quick else ""), nparams=nparams(model),
               method=args.method, k=args.k, ncv=args.ncv, basis_dtype=args.basis_dtype)
    emit(what="machine", **machine(device))
    projections(ctx, ctx["nparams"], device)

    totals: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    last = {"t": time.perf_counter(), "totals": {}, "retries": retries(device)}

    def callback(info: dict) -> None:
        sync(device)
        now = time.perf_counter()
        phases = {p: totals[p] - last["totals"].get(p, 0.0) for p in PHASES}
        r = retries(device)
        emit(**ctx, what="restart", restart=info["restart"], num_matvecs=info["num_matvecs"],
             num_converged=info["num_converged"], seconds=now - last["t"], phases=phases,
             other_s=now - last["t"] - sum(phases.values()),
             alloc_retries=None if r is None else r - last["retries"],
             peak_gib=(torch.cuda.max_memory_allocated(device) / 2**30
                       if device.type == "cuda" else None))
        last.update(t=now, totals=dict(totals), retries=r)

    undo = timing(totals, counts, device)
    try:
        sync(device)
        t0 = time.perf_counter()
        res = torchcurv.eigsh(op, k=args.k, which="LA", backend="lanczos",
                              tol=TOL[torch.bfloat16], seed=0, ncv=args.ncv,
                              maxiter=args.maxiter, callback=callback,
                              basis_dtype=None if args.basis_dtype is None
                              else getattr(torch, args.basis_dtype))
        sync(device)
        wall = time.perf_counter() - t0
    finally:
        undo()
    lam = res.eigenvalues
    emit(**ctx, what="solve", seconds=wall, num_matvecs=res.num_matvecs,
         restarts=res.info.restarts, stop_reason=res.info.stop_reason, tol=res.tol,
         eigenvalues=lam.flip(0).tolist(),
         relative_residuals=(res.residuals / lam.abs()).flip(0).tolist(),
         converged=res.converged.flip(0).tolist(), all_converged=res.all_converged,
         phases=dict(totals), calls=dict(counts), other_s=wall - sum(totals.values()),
         alloc_retries=retries(device),
         peak_gib=(torch.cuda.max_memory_allocated(device) / 2**30
                   if device.type == "cuda" else None))


if __name__ == "__main__":
    main()
