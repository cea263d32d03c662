#!/usr/bin/env bash
# Curvature-product scaling: all data on 1 GPU, then half each on 2 GPUs, then speed-ups.
# Usage: bash benchmarks/ddp_scaling.sh OUT.jsonl [ddp_scaling.py options, e.g. --tiny]
set -euo pipefail
out=$1
shift
here=$(cd "$(dirname "$0")" && pwd)
py=${PYTHON:-python3}
export NCCL_NVLS_ENABLE=0 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
export PYTHONPATH="$here/..${PYTHONPATH:+:$PYTHONPATH}"
"$py" "$here/ddp_scaling.py" --out "$out" "$@"
"$py" -m torch.distributed.run --standalone --nproc-per-node 2 "$here/ddp_scaling.py" \
    --out "$out" "$@"
"$py" "$here/ddp_scaling.py" --summarize "$out"
