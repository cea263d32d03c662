"""Curvature-product cost against one gradient, torchcurv beside its peers, in one run.

For the MLP (784-512-512-10 tanh, 4 x 1024) and a 4-layer GPT-2-style model (B=8, T=256):
gradient time over the data, single HVP time, matmat(16) time per vector, for torchcurv
(each HVP method), hessian-eigenthings and curvlinops when installed. Every ratio is
against the gradient measured in the same run.

    python benchmarks/curvature_products.py --device cuda --out results.jsonl
    python benchmarks/curvature_products.py --device cpu --small      # seconds, smoke
"""

from __future__ import annotations

import torch
from common import (
    emit,
    gpt2_problem,
    guarded,
    lm_objective,
    measure_products,
    mlp_problem,
    peak_gib,
    products_main,
    timed,
)

import torchcurv


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
        guarded("mlp", "torchcurv", lambda H=H, method=method: measure_products(
            "mlp", "torchcurv", method, H.matvec, H.matmat, H.n, device, t_grad, reps))

    def eigenthings():
        import hessian_eigenthings as he

        Hh = he.HessianOperator(model, data, he.supervised_loss(criterion))
        measure_products("mlp", "hessian_eigenthings", "hvp", Hh.matvec, None, Hh.size, device,
                         t_grad, reps)

    def curvlinops():
        import curvlinops

        Hc = curvlinops.HessianLinearOperator(model, criterion, params, data)
        n = sum(p.numel() for p in params)
        measure_products("mlp", "curvlinops", "hvp", lambda v: Hc @ v, lambda V: Hc @ V, n, device,
                         t_grad, reps)

    guarded("mlp", "hessian_eigenthings", eigenthings)
    guarded("mlp", "curvlinops", curvlinops)


def bench_gpt2(device, small, reps, attn):
    model, batches = gpt2_problem(device, small, attn)
    params = [p for p in model.parameters() if p.requires_grad]

    def grad():
        for b in batches:
            torch.autograd.grad(model(**b).loss, params)

    t_grad = timed(grad, device, reps=reps)
    emit(problem="gpt2", attn=attn, what="gradient", ms=t_grad * 1e3,
         nparams=sum(p.numel() for p in params), peak_gib=peak_gib(device, grad))
    for method in ("autograd", "forward_over_reverse"):
        def ours(method=method):
            H = torchcurv.HessianOperator(model, lm_objective(), batches, method=method)
            measure_products("gpt2", "torchcurv", f"{method}/{attn}", H.matvec, H.matmat, H.n,
                             device, t_grad, reps)

        guarded("gpt2", "torchcurv", ours)

    def eigenthings():
        import hessian_eigenthings as he

        Hh = he.HessianOperator(model, batches, he.hf_lm_loss())
        measure_products("gpt2", "hessian_eigenthings", f"hvp/{attn}", Hh.matvec, None, Hh.size,
                         device, t_grad, reps)

    guarded("gpt2", "hessian_eigenthings", eigenthings)


if __name__ == "__main__":
    products_main(__doc__, bench_mlp, bench_gpt2)
