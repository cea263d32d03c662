"""Compile every autotune config of the CE-HVP Triton kernel for sm_90 without a GPU and
report registers, stack (spills), load/store widths and exp count from ptxas and the SASS.

Needs triton only (it ships ptxas and cuobjdump). Run from the repository root:

    PYTHONPATH=. python benchmarks/ce_hvp_resources.py

The divisibility hints match a launch with V a multiple of 16 (V=50304), as triton
specializes such arguments itself; with an odd V the loads are 4-byte, not 16-byte.
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

from torchcurv.kernels.ce_hvp_triton import _autotune_configs, _ce_hvp_kernel

ARGS = ["logits_ptr", "u_ptr", "w_ptr", "out_ptr", "N", "V", "M",
        "stride_ln", "stride_um", "stride_un", "stride_om", "stride_on"]  # fmt: skip
CONSTEXPRS = ["HAS_WEIGHTS", "ACC", "BLOCK_V", "BLOCK_M", "PROGRAMS_PER_SM", "STAGES"]
TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def compile_config(dtype: str, config: triton.Config):
    types = [f"*{dtype}", f"*{dtype}", "*fp32", f"*{dtype}", "i32", "i32", "i32",
             "i32", "i64", "i32", "i64", "i32"]  # fmt: skip
    signature = dict(zip(ARGS, types)) | {name: "constexpr" for name in CONSTEXPRS}
    constexprs = {"HAS_WEIGHTS": True, "ACC": tl.float32, **config.kwargs}
    # Pointers, V and the strides 16-divisible, as triton specializes them at launch.
    hinted = [i for i, name in enumerate(ARGS) if name not in ("N", "M")]
    attrs = {(i,): [["tt.divisibility", 16]] for i in hinted}
    source = triton.compiler.ASTSource(_ce_hvp_kernel, signature, constexprs, attrs)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def report(dtype: str, config: triton.Config) -> dict:
    kernel = compile_config(dtype, config)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = _tool("--dump-resource-usage", f.name)
        sass = _tool("-sass", f.name)
    reg, stack = re.search(r"REG:(\d+) STACK:(\d+)", usage).groups()
    return {
        "dtype": dtype,
        **config.kwargs,
        "num_warps": config.num_warps,
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
    for dtype in ("fp32", "bf16"):
        for config in _autotune_configs():
            print(json.dumps(report(dtype, config)))
