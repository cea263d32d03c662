"""Compile the CE-HVP Triton kernel for sm_90 without a GPU, over the launch grid that
benchmarks/ce_hvp.py --sweep times, and report registers, stack (spills), load/store
widths and exp count from ptxas and the SASS.

Needs triton only (it ships ptxas and cuobjdump). Run from the repository root:

    PYTHONPATH=.:benchmarks python benchmarks/ce_hvp_resources.py

The divisibility hints match a launch with V a multiple of 16 (V=50304, split 13 ways),
as triton specializes such arguments itself; with an odd V the loads are 4-byte.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget

from torchcurv.kernels.ce_hvp_triton import KernelConfig, _ce_hvp_kernel, row_split

ARGS = ["logits_ptr", "u_ptr", "w_ptr", "out_ptr", "counter_ptr", "part_max_ptr",
        "part_sum_ptr", "part_dot_ptr", "V", "M", "span", "split",
        "stride_ln", "stride_um", "stride_un", "stride_om", "stride_on"]  # fmt: skip
CONSTEXPRS = ["HAS_WEIGHTS", "ACC", "CHUNK", "BLOCK_M", "SPLIT_P2"]
TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
V = 50304


def compile_config(dtype: str, config: KernelConfig):
    types = [f"*{dtype}", f"*{dtype}", "*fp32", f"*{dtype}", "*i32", "*fp32", "*fp32",
             "*fp32", "i32", "i32", "i32", "i32", "i32", "i64", "i32", "i64", "i32"]  # fmt: skip
    split, span = row_split(V, config.chunk, max_split=132)
    signature = dict(zip(ARGS, types)) | {name: "constexpr" for name in CONSTEXPRS}
    constexprs = {
        "HAS_WEIGHTS": True, "ACC": tl.float32, "CHUNK": triton.next_power_of_2(span),
        "BLOCK_M": config.block_m, "SPLIT_P2": triton.next_power_of_2(split),
    }  # fmt: skip
    # Pointers, V, span and the strides 16-divisible, as triton specializes them at launch.
    hinted = [i for i, name in enumerate(ARGS) if name not in ("M", "split")]
    attrs = {(i,): [["tt.divisibility", 16]] for i in hinted}
    source = triton.compiler.ASTSource(_ce_hvp_kernel, signature, constexprs, attrs)
    options = {"num_warps": config.num_warps, "num_stages": 1, "maxnreg": config.maxnreg}
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def report(dtype: str, config: KernelConfig) -> dict:
    kernel = compile_config(dtype, config)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = _tool("--dump-resource-usage", f.name)
        sass = _tool("-sass", f.name)
    reg, stack = re.search(r"REG:(\d+) STACK:(\d+)", usage).groups()
    return {
        "dtype": dtype,
        "config": repr(config),
        "registers": int(reg),
        "stack_bytes": int(stack),
        "shared_bytes": kernel.metadata.shared,
        "ldg128": sass.count("LDG.E.128"),
        "ldg_other": len(re.findall(r"LDG\.E(?!\.128)", sass)),
        "ldgsts": sass.count("LDGSTS"),
        "stg128": sass.count("STG.E.128"),
        "ex2": sass.count("MUFU.EX2"),
    }


def _tool(flag: str, path: str) -> str:
    cmd = [os.path.join(TOOLS, "cuobjdump"), flag, path]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


if __name__ == "__main__":
    from ce_hvp import sweep_grid

    for dtype in ("fp32", "bf16"):
        for config in sweep_grid(None) + sweep_grid(16):
            print(json.dumps(report(dtype, config)), flush=True)
