"""Launch one CE-HVP kernel a few times, for Nsight Compute to profile one launch.

    ncu --clock-control none --kernel-name regex:_ce_hvp_kernel --launch-skip 2 \\
        --launch-count 1 --section WarpStateStats ... \\
        python3 benchmarks/ce_hvp_profile.py --case bf16 [--candidate PATH] [--config ...]

The kernel is torchcurv's, or a candidate module (``benchmarks/ce_hvp_ab.py`` explains
those); the inputs are ``benchmarks/ce_hvp.py``'s for the case (N=8192, V=50304 for the
one-direction cases). Without ``--config`` the library's ``default_config``.

``--host`` instead prints where the host's launch time of one call goes (milliseconds
for each step to return while the device is busy, ``ce_hvp.host_ms``): the public
function, the kernel wrapper, the bare triton launch with its workspace prepared, and the
pieces the wrapper adds.
"""

from __future__ import annotations

import argparse
import sys

import ce_hvp as bench
import torch
import triton
import triton.language as tl
from ce_hvp_ab import CASES, load_module, parse_config

from torchcurv.kernels import ce_hessian_matmat, ce_hvp_triton
from torchcurv.kernels.ce_hvp import _check_inputs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--case", choices=CASES, default="bf16")
    parser.add_argument("--candidate", help="path of a candidate kernel module")
    parser.add_argument("--config", type=parse_config, help="CHUNK,BLOCK_M,WARPS[,MAXNREG]")
    parser.add_argument("--launches", type=int, default=3)
    parser.add_argument("--host", action="store_true", help="host launch time, step by step")
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
    if args.host:
        host_breakdown(logits, U, weights, out, ce_hvp_triton.default_config(bench.V, 1, 2))
        return 0
    for _ in range(args.launches):
        module.ce_hessian_matmat_triton(logits, U, weights, out=out, config=config)
    torch.cuda.synchronize()
    print(f"{args.case} {config} launched {args.launches}x")
    return 0


def host_breakdown(logits, U, weights, out, config) -> None:
    """Host milliseconds per step of a one-direction call (see the module docstring)."""
    n, v = logits.shape
    max_split = ce_hvp_triton._multiprocessors(logits.device.index)
    split, span = ce_hvp_triton.row_split(v, config.chunk, max_split)
    counters = torch.zeros(1 + n, dtype=torch.int32, device="cuda")
    part_max, part_sum, part_dot = torch.empty(3 * n * split, device="cuda").split(n * split)

    def bare_launch():
        counters.zero_()
        ce_hvp_triton._ce_hvp_kernel[(n * split,)](
            logits, U[None], weights, out[None], counters, part_max, part_sum, part_dot,
            v, 1, span, split, logits.stride(0), U.numel(), U.stride(0), out.numel(),
            out.stride(0), HAS_WEIGHTS=True, ACC=tl.float32,
            CHUNK=triton.next_power_of_2(span), BLOCK_M=1,
            SPLIT_P2=triton.next_power_of_2(split), num_warps=config.num_warps, num_stages=1,
        )  # fmt: skip

    steps = {
        "ce_hessian_matmat(backend='triton')": lambda: ce_hessian_matmat(
            logits, U, weights, backend="triton", out=out
        ),
        "ce_hessian_matmat_triton": lambda: ce_hvp_triton.ce_hessian_matmat_triton(
            logits, U, weights, out=out
        ),
        "triton launch + counters.zero_()": bare_launch,
        "counters.zero_()": counters.zero_,
        "torch.zeros(counters)": lambda: torch.zeros(1 + n, dtype=torch.int32, device="cuda"),
        "torch.empty(partials)": lambda: torch.empty(3 * n * split, device="cuda"),
        "_check_inputs": lambda: _check_inputs(logits, U, weights, out),
        "get_device_properties": lambda: torch.cuda.get_device_properties(logits.device),
    }
    print(f"triton {triton.__version__}, torch {torch.__version__}, {config}")
    for name, step in steps.items():
        print(f"{bench.host_ms(step, reps=50) * 1e3:8.1f} us  {name}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
