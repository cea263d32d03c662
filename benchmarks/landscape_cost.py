"""Loss-landscape cost: seconds per grid point against one forward pass over the data.

``torchcurv.loss_landscape`` evaluates each grid point with one no-grad forward per batch
(the weights set in place with multi-tensor kernels), so a point should cost about one
forward pass over the data. Measured on the MLP (784-512-512-10 tanh, 4 x 1024) and a
4-layer GPT-2-style model (B=8, T=256, vocabulary 50257): the time of one no-grad
forward pass over the data, the landscape's time per grid point (the difference between
two grid sizes, so the gradient and the product ``A D`` of the quadratic model cancel)
and that fixed part. hessian-eigenthings 1.0.0a5 and curvlinops 3.0.1 have no loss
landscape, so there is no peer to run beside it.

    python benchmarks/landscape_cost.py --device cuda \
        --out benchmarks/results/landscape_cost_h200.jsonl
    python benchmarks/landscape_cost.py --quick      # tiny sizes on the CPU, seconds
"""

from __future__ import annotations

import argparse

import torch
from common import emit, gpt2_problem, guarded, lm_objective, machine, mlp_problem, timed, write_to

import torchcurv
from torchcurv.objectives import as_objective

SMALL_GRID, EXTRA_POINTS = 3, 12


def forward_pass(model, objective, data):
    """One no-grad forward pass over the data (the loss of every batch)."""
    with torch.no_grad():
        for batch in data:
            objective(model, batch)


def bench(problem, model, criterion, data, device, reps):
    objective = as_objective(criterion)
    H = torchcurv.HessianOperator(model, criterion, data)
    nparams = H.n

    def scape(steps):
        return lambda: torchcurv.loss_landscape(model, criterion, data, "random", seed=0,
                                                curvature=H, steps=steps)

    t_forward = timed(lambda: forward_pass(model, objective, data), device, reps=reps)
    t_small = timed(scape(SMALL_GRID), device, reps=reps, warmup=1)
    t_big = timed(scape(SMALL_GRID + EXTRA_POINTS), device, reps=reps, warmup=1)
    per_point = (t_big - t_small) / EXTRA_POINTS
    emit(problem=problem, lib="torchcurv", what="landscape_point", nparams=nparams,
         batches=len(data), forward_pass_ms=t_forward * 1e3, per_point_ms=per_point * 1e3,
         ratio_to_forward_pass=per_point / t_forward,
         quadratic_model_ms=(t_small - SMALL_GRID * per_point) * 1e3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="tiny sizes on the CPU (smoke run)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=None, help="also append the JSON lines to this file")
    args = ap.parse_args()
    write_to(args.out)
    device = torch.device("cpu" if args.quick else args.device)
    reps = 2 if args.quick else args.reps
    emit(what="machine", **machine(device))
    model, criterion, data = mlp_problem(device, small=args.quick)
    guarded("mlp", "torchcurv", lambda: bench("mlp", model, criterion, data, device, reps))

    def gpt2():
        lm, batches = gpt2_problem(device, small=args.quick, attn="sdpa", num_batches=2)
        bench("gpt2", lm, lm_objective(), batches, device, reps)

    guarded("gpt2", "torchcurv", gpt2)


if __name__ == "__main__":
    main()
