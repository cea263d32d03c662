#!/usr/bin/env bash
# One device-machine call per stage; every stage writes JSON lines / logs into $OUT,
# result files named with $TAG (default h200).
#
#   bash benchmarks/device_run.sh tests      # every gpu-marked test (CUDA, Triton, CuPy)
#   bash benchmarks/device_run.sh kernels    # CE-HVP kernel tests, microbenchmark + config sweep
#   bash benchmarks/device_run.sh products   # HVP / GGN products vs gradient, with peers
#   bash benchmarks/device_run.sh engine     # HVP profile, compile (GPT-2), KFAC: with peers
#   bash benchmarks/device_run.sh solvers    # eigensolver backends, with peers
#   bash benchmarks/device_run.sh lm         # GPT-2-style LM scale (eager and sdpa)
#   bash benchmarks/device_run.sh billion    # 1.1B LLaMA: products, top-10, SLQ (~9 min)
#   bash benchmarks/device_run.sh krylov     # Krylov/attention GPU tests, tiles, 1.1B solve phases
#   bash benchmarks/device_run.sh ab         # 1.1B products, .ab/old against this tree (carry .ab;
#                                            # make it with git archive, see engine_ab.py)
#
# The device image has torch, triton, cupy, transformers but not the peers or pytest:
# carry their wheels in .whl/ (git-ignored); they are installed into /tmp/site here.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
TAG=${TAG:-h200}
mkdir -p "$OUT"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl >/dev/null 2>&1
fi
export PYTHONPATH=/tmp/site:.:benchmarks
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, torch.version.cuda)"
status=0
run() {  # run NAME CMD...: log to $OUT/NAME.log, keep going on failure
    local name=$1; shift
    echo "== $name: $*"
    local t0=$SECONDS
    "$@" > "$OUT/$name.log" 2>&1 || { status=1; echo "!! $name failed"; }
    tail -n 15 "$OUT/$name.log"
    echo "== $name took $((SECONDS - t0)) s"
}
for stage in "$@"; do
    case $stage in
        tests)
            run gpu_tests python3 -m pytest -q -p no:cacheprovider -m "gpu or multigpu" --durations=25 \
                -o addopts= -rs tests
            run triton_kernel_tests python3 -m pytest -q -p no:cacheprovider -o addopts= \
                tests/test_ce_hvp_triton.py ;;
        kernels)
            run ce_kernel_tests python3 -m pytest -q -p no:cacheprovider -o addopts= \
                tests/test_ce_hvp_triton.py
            run ce_backend_tests python3 -m pytest -q -p no:cacheprovider -o addopts= -m gpu \
                tests/test_ce_hvp.py
            run ce_hvp python3 benchmarks/ce_hvp.py --sweep --out "$OUT/ce_hvp_$TAG.jsonl" ;;
        products)
            run curvature_products python3 benchmarks/curvature_products.py \
                --out "$OUT/curvature_products_$TAG.jsonl"
            run ggn_products python3 benchmarks/ggn_products.py --out "$OUT/ggn_products_$TAG.jsonl" ;;
        engine)
            run hvp_profile python3 benchmarks/hvp_profile.py --out "$OUT/hvp_profile_$TAG.jsonl"
            run compile_gpt2 python3 benchmarks/compile_products.py --only gpt2 --attn sdpa \
                --out "$OUT/compile_products_${TAG}_gpt2.jsonl"
            run kfac python3 benchmarks/kfac.py --device cuda --reps 20 \
                --out "$OUT/kfac_$TAG.jsonl" ;;
        solvers)
            run eigsh_backends python3 benchmarks/eigsh_backends.py
            run eigsolvers python3 benchmarks/eigsolvers.py --out "$OUT/eigsolvers_$TAG.jsonl"
            run profile_lanczos python3 benchmarks/profile_lanczos.py \
                --out "$OUT/profile_lanczos_$TAG.jsonl" ;;
        lm)
            run lm_scale python3 benchmarks/lm_scale.py --out "$OUT/lm_scale_$TAG.jsonl" ;;
        krylov)
            run gpu_krylov_tests python3 -m pytest -q -p no:cacheprovider -o addopts= -m gpu \
                tests/test_lanczos.py tests/test_spectral.py tests/test_flash_attention.py
            run attention_tiles python3 benchmarks/attention_tiles.py \
                --out "$OUT/attention_tiles_$TAG.jsonl"
            run lanczos_phases_ggn timeout 200 python3 benchmarks/lanczos_phases.py \
                --out "$OUT/lanczos_phases_$TAG.jsonl"
            run lanczos_phases_hessian timeout 200 python3 benchmarks/lanczos_phases.py \
                --method hessian/forward_over_reverse --out "$OUT/lanczos_phases_$TAG.jsonl" ;;
        ab)
            run engine_ab timeout 400 python3 benchmarks/engine_ab.py .ab/old . .ab/old . \
                --profile --out "$OUT/engine_ab_$TAG.jsonl" ;;
        billion)
            run lm_billion timeout 590 python3 benchmarks/lm_billion.py --budget-s 540 \
                --out "$OUT/lm_billion_$TAG.jsonl" --figures "$OUT" ;;
        *) echo "unknown stage $stage"; status=2 ;;
    esac
done
exit $status
