"""How far each curvature product of a low-precision language model is from the exact
one: a random LLaMA (``lm_billion.py``'s tiny ``--quick`` shape, 2 x 32 tokens) in
bfloat16 and float32, every Hessian method and GGN JVP against the float64 model's
exact product (same weights), relative error ``||y - y64|| / ||y64||`` over random
vectors; for finite differences also the step scaled by factors around the default
rule ``h = eps^(1/3) (1 + ||theta||) / ||v||``.

    python benchmarks/product_accuracy.py            # CPU, about a minute

Writes JSON lines (``--out``); ``benchmarks/results/product_accuracy_cpu.jsonl``.
"""
from __future__ import annotations

import argparse
import statistics

import torch
from common import emit, machine, write_to
from lm_billion import QUICK_LLAMA, QUICK_VOCAB, llama, nparams, token_batches

import torchcurv
import torchcurv.derivatives.hessian as hessian_strategies

STEP_FACTORS = (1.0, 0.3, 0.1, 0.03, 0.01)


def relative(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).norm() / ref.norm())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vectors", type=int, default=3)
    ap.add_argument("--size", default="1.1b", choices=list(QUICK_LLAMA))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    write_to(args.out)
    device = torch.device("cpu")
    emit(what="machine", **machine(device))
    objective = torchcurv.causal_lm_objective()
    batches = token_batches(QUICK_VOCAB, 2, 32, device)
    exact64 = llama(QUICK_LLAMA[args.size], QUICK_VOCAB, device, torch.float64, 32)
    refs = {"hessian": torchcurv.HessianOperator(exact64, objective, batches),
            "ggn": torchcurv.GGNOperator(exact64, objective, batches)}
    n = refs["hessian"].n
    g = torch.Generator().manual_seed(0)
    V = torch.randn(n, args.vectors, dtype=torch.float64, generator=g)
    expected = {k: op @ V for k, op in refs.items()}
    step_rule = hessian_strategies.finite_difference_step
    for dtype in (torch.bfloat16, torch.float32):
        model = llama(QUICK_LLAMA[args.size], QUICK_VOCAB, device, dtype, 32)
        model.load_state_dict({k: v.to(dtype) for k, v in exact64.state_dict().items()})
        ctx = dict(model=f"llama-{args.size}(quick)", nparams=nparams(model),
                   dtype=str(dtype).removeprefix("torch."), vectors=args.vectors)
        cases = [("hessian", m, torchcurv.HessianOperator, {"method": m})
                 for m in ("autograd", "forward_over_reverse", "finite_difference")]
        cases += [("ggn", j, torchcurv.GGNOperator, {"jvp": j})
                  for j in ("forward", "finite_difference")]
        for matrix, method, cls, kw in cases:
            factors = STEP_FACTORS if method == "finite_difference" else (None,)
            for f in factors:
                if f is not None and matrix == "hessian":
                    hessian_strategies.finite_difference_step = (
                        lambda d, t, v, f=f: f * step_rule(d, t, v))
                try:
                    if f not in (None, 1.0) and matrix == "ggn":
                        continue  # the GGN's step is the same rule; one row suffices
                    op = cls(model, objective, batches, **kw)
                    errors = [relative(op @ V[:, j].to(dtype), expected[matrix][:, j])
                              for j in range(args.vectors)]
                finally:
                    hessian_strategies.finite_difference_step = step_rule
                emit(**ctx, matrix=matrix, method=method, step_factor=f,
                     median_relative_error=statistics.median(errors),
                     relative_errors=errors)


if __name__ == "__main__":
    main()
