#!/usr/bin/env bash
# On the GPU machine, from anywhere: the CUDA tests of the fused cross-entropy
# Hessian product (the kernel's own tests compiled for the real GPU, and the gpu-marked
# backend tests), then its microbenchmark. JSON lines land in $OUT (or the repo root).
#
# The device image may lack pytest and cannot fetch it. Beforehand, on a machine with
# network: pip download --no-deps -d .wheels pytest pluggy iniconfig packaging pygments
# and carry ".wheels" with the run; this script installs from there when needed.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.
PY=${PYTHON:-python3}

if ! "$PY" -c "import pytest" 2>/dev/null; then
    if [ -d .wheels ]; then
        "$PY" -m pip install -q --no-index --find-links .wheels pytest
    else
        echo "pytest is missing and no .wheels/ folder was carried (see this script's header)" >&2
        exit 2
    fi
fi
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(0))"

status=0
"$PY" -m pytest -q -p no:cacheprovider -o addopts= tests/test_ce_hvp_triton.py || status=1
"$PY" -m pytest -q -p no:cacheprovider -o addopts= -m gpu tests/test_ce_hvp.py || status=1
"$PY" benchmarks/ce_hvp.py --out "${OUT:-.}/ce_hvp.jsonl" || status=1
exit $status
