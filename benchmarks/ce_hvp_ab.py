"""Side by side in one run: a candidate CE-HVP kernel module against torchcurv's kernel.

The candidate is a Python file with the interface of torchcurv/kernels/ce_hvp_triton.py
(``KernelConfig``, ``ce_hessian_matmat_triton``). The designs measured and dropped in
benchmarks/NOTES_ce_hvp.md are kept as patches against that module in
benchmarks/ce_hvp_variants/, so each of their numbers can be re-measured:

    patch -o /tmp/candidate.py torchcurv/kernels/ce_hvp_triton.py \\
        benchmarks/ce_hvp_variants/packed_bf16.patch
    PYTHONPATH=.:benchmarks python3 benchmarks/ce_hvp_ab.py /tmp/candidate.py \\
        --config 4096,1,4 --config 8192,1,8,64 --out ab.jsonl

In one run: the copy bandwidth; the candidate against float64 at awkward sizes (odd V, a
chunk of only -inf logits, blocks of directions, far more programs than fit at once); then
per case both kernels, interleaved over ``--rounds``, each under its own configurations
(``--baseline-config``, default: torchcurv's ``default_config``). A configuration with
block_m=1 is timed on the one-direction cases, others on the M=16 cases. One JSON object
per line (``benchmarks/ce_hvp.py`` defines the columns).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import sys
from pathlib import Path

import ce_hvp as bench
import torch

from torchcurv.kernels import ce_hvp_triton as baseline
from torchcurv.kernels.ce_hvp import _ce_hessian_matmat_eager

CASES = {  # name: (M or None, N, dtype)
    "bf16": (None, bench.N, torch.bfloat16),
    "fp32": (None, bench.N, torch.float32),
    "bf16x16": (bench.BLOCK[0], bench.BLOCK[1], torch.bfloat16),
    "fp32x16": (bench.BLOCK[0], bench.BLOCK[1], torch.float32),
}
# (N, V, M, dtype, chunk, block_m): odd V, a split of 50 chunks over 4096 rows, blocks.
CHECKS = [
    (512, 50257, None, torch.float32, 2048, 1),
    (512, 50257, None, torch.bfloat16, 4096, 1),
    (256, 50257, 3, torch.bfloat16, 512, 4),
    (4096, 51200, None, torch.float32, 1024, 1),
    (4096, 51200, None, torch.bfloat16, 1024, 1),
    (300, 50304, 16, torch.float32, 512, 8),
    (300, 50304, 16, torch.bfloat16, 1024, 8),
    (64, 40000, None, torch.float16, 1024, 1),
]


def load_module(path: str):
    spec = importlib.util.spec_from_file_location("ce_hvp_candidate", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def parse_config(text: str) -> tuple[int, int, int, int | None]:
    """``CHUNK,BLOCK_M,WARPS[,MAXNREG]`` -> a tuple for either module's ``KernelConfig``."""
    fields = [int(x) for x in text.split(",")]
    if len(fields) not in (3, 4):
        raise argparse.ArgumentTypeError(f"expected CHUNK,BLOCK_M,WARPS[,MAXNREG], got {text!r}")
    return (*fields, None) if len(fields) == 3 else tuple(fields)


def check_candidate(candidate, seed: int = 0) -> list[dict]:
    """Relative error against float64 (and whether every element was written) per CHECKS."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    rows = []
    for n, v, m, dtype, chunk, block_m in CHECKS:
        logits = (torch.randn(n, v, generator=g, device="cuda") * 3).to(dtype)
        logits[1, : 3 * chunk] = float("-inf")
        shape = (n, v) if m is None else (m, n, v)
        U = torch.randn(*shape, generator=g, device="cuda").to(dtype)
        weights = torch.rand(n, generator=g, device="cuda")
        out = torch.full_like(U, float("nan"))
        config = candidate.KernelConfig(chunk, block_m)
        candidate.ce_hessian_matmat_triton(logits, U, weights, out=out, config=config)
        expected = _ce_hessian_matmat_eager(logits.double(), U.double(), weights.double())
        err = float((out.double() - expected).norm() / expected.norm())
        tolerance = 1e-5 if dtype == torch.float32 else 1e-2
        rows.append({
            "check": [n, v, m, str(dtype).removeprefix("torch."), repr(config)],
            "rel_err_vs_float64": float(f"{err:.3g}"),
            "ok": bool(torch.isfinite(out).all()) and err < tolerance,
        })  # fmt: skip
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("candidate", help="path of the candidate kernel module")
    parser.add_argument("--config", type=parse_config, action="append", default=[],
                        help="candidate configuration CHUNK,BLOCK_M,WARPS[,MAXNREG] (repeat)")
    parser.add_argument("--baseline-config", type=parse_config, action="append", default=[],
                        help="baseline configuration (repeat; default: default_config)")
    parser.add_argument("--cases", default="bf16,fp32", help=f"of {','.join(CASES)}")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", help="also write the JSON lines to this file")
    args = parser.parse_args()  # fmt: skip
    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2
    candidate = load_module(args.candidate)
    sink = open(args.out, "w") if args.out else None

    def emit(row: dict) -> None:
        print(json.dumps(row), flush=True)
        if sink:
            sink.write(json.dumps(row) + "\n")

    checks = check_candidate(candidate)
    for row in checks:
        emit(row)
    copy_bw = bench.copy_bandwidth()
    emit({"device": torch.cuda.get_device_name(), "copy_TBps": round(copy_bw / 1e12, 3),
          "candidate": Path(args.candidate).name})  # fmt: skip
    for case in args.cases.split(","):
        m, n, dtype = CASES[case]
        logits, U, weights = bench.make_inputs(m, n, dtype, seed=1)
        default = baseline.default_config(bench.V, m or 1, U.element_size())
        kernels = [
            ("baseline", baseline, args.baseline_config or [tuple(vars(default).values())]),
            ("candidate", candidate, args.config),
        ]
        for round_ in range(args.rounds):
            for name, module, configs in kernels:
                for fields in configs:
                    if (fields[1] == 1) != (m is None):
                        continue
                    config = module.KernelConfig(*fields)
                    launch = functools.partial(
                        module.ce_hessian_matmat_triton, logits, U, weights, config=config
                    )
                    err = bench.check(lambda out, f=launch: f(out=out), logits, U, weights)
                    row = bench._timed_row(name, launch, logits, U, err, copy_bw)
                    emit({**row, "case": case, "triton_config": repr(config), "round": round_})
        del logits, U, weights
        torch.cuda.empty_cache()
    return 0 if all(r["ok"] for r in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
