"""Curvature-product cost against one gradient, torchcurv beside its peers, in one run.

For the MLP (784-512-512-10 tanh, 4 x 1024) and a 4-layer GPT-2-style model (B=8, T=256):
gradient time over the data, single HVP time, matmat(16) time per vector, for torchcurv
(each HVP method), hessian-eigenthings and curvlinops when installed. Every ratio is
against the gradient measured in the same run.

    python benchmarks/curvature_products.py --device cuda --out results.jsonl
    python benchmarks/curvature_products.py --device cpu --small      # seconds, smoke
"""

from __future__ import annotations

import argparse
import traceback

import torch
from common import emit, gpt2_problem, lm_objective, machine, mlp_problem, timed, write_to

import torchcurv


def _peak(device, fn) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**30


def _measure(problem, lib, method, op_matvec, op_matmat, n, device, t_grad, reps):
    v = torch.randn(n, device=device)
    t = timed(lambda: op_matvec(v), device, reps=reps)
    rec = dict(problem=problem, lib=lib, method=method, what="hvp", ms=t * 1e3,
               ratio_to_grad=t / t_grad, peak_gib=_peak(device, lambda: op_matvec(v)))
    emit(**rec)
    if op_matmat is not None:
        V = torch.randn(n, 16, device=device)
        t16 = timed(lambda: op_matmat(V), device, reps=max(2, reps // 2), warmup=1)
        emit(problem=problem, lib=lib, method=method, what="matmat16", ms=t16 * 1e3,
             ms_per_vec=t16 * 1e3 / 16, ratio_per_vec_to_grad=t16 / 16 / t_grad,
             peak_gib=_peak(device, lambda: op_matmat(V)))


def _guarded(problem, lib, fn):
    try:
        fn()
    except Exception as exc:  # a peer failing is a finding, not the end of the run
        emit(problem=problem, lib=lib, error=repr(exc)[:400],
             where=traceback.format_exc().splitlines()[-3][:200])


def bench_mlp(device, small, reps):
    model, criterion, data = mlp_problem(device, small)
    params = [p for p in model.parameters() if p.requires_grad]

    def grad():
        for x, y in data:
            torch.autograd.grad(criterion(model(x), y), params)

    t_grad = timed(grad, device, reps=reps)
    emit(problem="mlp", what="gradient", ms=t_grad * 1e3,
         nparams=sum(p.numel() for p in params))
    for method in ("autograd", "forward_over_reverse"):
        H = torchcurv.HessianOperator(model, criterion, data, method=method)
        _guarded("mlp", "torchcurv", lambda H=H, method=method: _measure(
            "mlp", "torchcurv", method, H.matvec, H.matmat, H.n, device, t_grad, reps))

    def eigenthings():
        import hessian_eigenthings as he

        Hh = he.HessianOperator(model, data, he.supervised_loss(criterion))
        _measure("mlp", "hessian_eigenthings", "hvp", Hh.matvec, None, Hh.size, device,
                 t_grad, reps)

    def curvlinops():
        import curvlinops

        Hc = curvlinops.HessianLinearOperator(model, criterion, params, data)
        n = sum(p.numel() for p in params)
        _measure("mlp", "curvlinops", "hvp", lambda v: Hc @ v, lambda V: Hc @ V, n, device,
                 t_grad, reps)

    _guarded("mlp", "hessian_eigenthings", eigenthings)
    _guarded("mlp", "curvlinops", curvlinops)


def bench_gpt2(device, small, reps, attn):
    model, batches = gpt2_problem(device, small, attn)
    params = [p for p in model.parameters() if p.requires_grad]

    def grad():
        for b in batches:
            torch.autograd.grad(model(**b).loss, params)

    t_grad = timed(grad, device, reps=reps)
    emit(problem="gpt2", attn=attn, what="gradient", ms=t_grad * 1e3,
         nparams=sum(p.numel() for p in params), peak_gib=_peak(device, grad))
    for method in ("autograd", "forward_over_reverse"):
        def ours(method=method):
            H = torchcurv.HessianOperator(model, lm_objective(), batches, method=method)
            _measure("gpt2", "torchcurv", f"{method}/{attn}", H.matvec, H.matmat, H.n,
                     device, t_grad, reps)

        _guarded("gpt2", "torchcurv", ours)

    def eigenthings():
        import hessian_eigenthings as he

        Hh = he.HessianOperator(model, batches, he.hf_lm_loss())
        _measure("gpt2", "hessian_eigenthings", f"hvp/{attn}", Hh.matvec, None, Hh.size,
                 device, t_grad, reps)

    _guarded("gpt2", "hessian_eigenthings", eigenthings)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true", help="tiny sizes, for a CPU smoke run")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--only", choices=["mlp", "gpt2"], default=None)
    ap.add_argument("--out", default=None, help="also append the JSON lines to this file")
    args = ap.parse_args()
    write_to(args.out)
    device = torch.device(args.device)
    emit(what="machine", **machine(device))
    if args.only in (None, "mlp"):
        bench_mlp(device, args.small, args.reps)
    if args.only in (None, "gpt2"):
        for attn in ("eager", "sdpa"):
            _guarded("gpt2", "setup", lambda attn=attn: bench_gpt2(device, args.small,
                                                                   args.reps, attn))


if __name__ == "__main__":
    main()
