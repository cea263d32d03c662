"""examples/ddp_top_eigenvalues.py runs under torchrun with 2 processes (gloo on CPU; nccl
on 2 GPUs) and its distributed eigenvalues equal the single-process ones."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("backend", ["gloo", pytest.param("nccl", marks=pytest.mark.multigpu)])
def test_ddp_example_runs_under_torchrun_and_matches_one_process(backend):
    env = dict(os.environ, OMP_NUM_THREADS="1", NCCL_NVLS_ENABLE="0",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if backend == "gloo":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the example picks nccl whenever it sees CUDA
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc-per-node", "2", str(ROOT / "examples" / "ddp_top_eigenvalues.py"),
           "--samples", "256", "--batch-size", "48", "--verify"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    for name in ("Hessian", "GGN"):
        assert len(re.findall(rf"^{name} top-5 .*2 ranks, 128 samples/rank", out, re.M)) == 1, out
        diff = float(re.search(rf"^{name} max relative difference to one process: (\S+)",
                               out, re.M).group(1))
        assert diff < 1e-10, out
