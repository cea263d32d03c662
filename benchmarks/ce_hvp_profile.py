"""Launch one CE-HVP kernel a few times, for Nsight Compute to profile one launch.

    ncu --clock-control none --kernel-name regex:_ce_hvp_kernel --launch-skip 2 \\
        --launch-count 1 --section WarpStateStats ... \\
        python3 benchmarks/ce_hvp_profile.py --case bf16 [--candidate PATH] [--config ...]

The kernel is torchcurv's, or a candidate module (``benchmarks/ce_hvp_ab.py`` explains
those); the inputs are ``benchmarks/ce_hvp.py``'s for the case (N=8192, V=50304 for the
one-direction cases). Without ``--config`` the library's ``default_config``.
"""

from __future__ import annotations

import argparse
import sys

import ce_hvp as bench
import torch
from ce_hvp_ab import CASES, load_module, parse_config

from torchcurv.kernels import ce_hvp_triton


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--case", choices=CASES, default="bf16")
    parser.add_argument("--candidate", help="path of a candidate kernel module")
    parser.add_argument("--config", type=parse_config, help="CHUNK,BLOCK_M,WARPS[,MAXNREG]")
    parser.add_argument("--launches", type=int, default=3)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2
    module = load_module(args.candidate) if args.candidate else ce_hvp_triton
    m, n, dtype = CASES[args.case]
    logits, U, weights = bench.make_inputs(m, n, dtype, seed=1)
    default = ce_hvp_triton.default_config(bench.V, m or 1, U.element_size())
    config = module.KernelConfig(*(args.config or vars(default).values()))
    out = torch.empty_like(U)
    for _ in range(args.launches):
        module.ce_hessian_matmat_triton(logits, U, weights, out=out, config=config)
    torch.cuda.synchronize()
    print(f"{args.case} {config} launched {args.launches}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
