#!/usr/bin/env bash
# GPU validation and benchmarks in one run: the kernel tests on real CUDA kernels, compute-sanitizer over
# every op, the per-op benchmarks and the whole-model throughput targets.
#
#   bench/run_gpu.sh [results_dir]            (default bench/results; JSON + PNG land there)
#   STAGES="tests kernels" bench/run_gpu.sh   (a subset of: env tests smoke sanitize kernels throughput)
#   QUICK=1 bench/run_gpu.sh                  (the issue's target shapes only, bf16, fewer iterations)
#
# Needs a CUDA GPU, torch and triton; runs from a checkout (no install needed).
set -uo pipefail
cd "$(dirname "$0")/.."
RES=$(mkdir -p "${1:-bench/results}" && cd "${1:-bench/results}" && pwd)
export MTLFACE_FAST_RESULTS_DIR=$RES PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
STAGES=${STAGES:-"env tests sanitize kernels throughput"}
QUICK=${QUICK:-0}
status=0
step() { echo; echo "=== $* ($(date -u +%H:%M:%S))"; }
run() { "$@" || { echo "FAILED ($?): $*"; status=1; }; }
has() { [[ " $STAGES " == *" $1 "* ]]; }

if has env; then
  step env
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  run "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', \
triton.__version__, torch.cuda.get_device_name())"
fi

if has smoke; then
  step "every op at full size on CUDA against the reference"
  run timeout 300 "$PY" bench/gpu_smoke.py
fi

if has tests; then
  step "kernel and model tests on CUDA"
  tests=$(ls tests/test_afd_kernels.py tests/test_icm_kernels.py tests/test_tpami_kernels.py \
          tests/test_fast_model.py tests/test_tpami_fast.py tests/test_eval_pipeline.py 2>/dev/null)
  # CUDA-only cases of the export tests (the CPU ones run in CI): AOTInductor package, TensorRT when present.
  tests="$tests tests/test_export_aoti.py::test_aoti_cuda_package_parity tests/test_export_tensorrt.py"
  # The log (full tracebacks) goes next to the results, so that it survives a cut-off console.
  run timeout ${TESTS_TIMEOUT:-900} "$PY" -m pytest -q -p no:cacheprovider -rfs --tb=short $tests \
    > "$RES/gpu-tests.log" 2>&1
  tail -n 40 "$RES/gpu-tests.log"
fi

if has sanitize; then
  step "compute-sanitizer memcheck over every op (small shapes)"
  if command -v compute-sanitizer >/dev/null; then
    run timeout 600 compute-sanitizer --tool memcheck --error-exitcode 1 --target-processes all \
      "$PY" bench/gpu_smoke.py
  else
    echo "compute-sanitizer not found; running the smoke script plainly"
    run "$PY" bench/gpu_smoke.py
  fi
fi

if has kernels; then
  step "per-op benchmarks"
  if [ "$QUICK" = 1 ]; then
    run "$PY" bench/kernels.py --op afd --device cuda --batch 256,1024 --dtype bf16 --iters 10
    run "$PY" bench/kernels.py --op icm --device cuda --batch 64 --dtype bf16 --train-steps 0 --iters 10
  else
    run "$PY" bench/kernels.py --op afd --device cuda
    run "$PY" bench/kernels.py --op icm --device cuda
    run "$PY" bench/kernels.py --op trunk --device cuda --batch 256
    run "$PY" bench/kernels.py --op stylegan2 --device cuda --dtype bf16
  fi
fi

if has throughput; then
  step "whole-model throughput (bf16)"
  T="$PY bench/throughput.py --device cuda --dtype bf16 --warmup 3 --iters 10"
  if [ "$QUICK" = 1 ]; then
    run $T --tasks encode --batch 256 --variants reference,reference_autocast,ours
    run $T --tasks synthesize --batch 64 --variants reference,reference_autocast,ours
    exit $status
  fi
  run $T --tasks encode --batch 256 --variants reference,reference_autocast,reference_compile,ours,ours_compile
  run $T --tasks synthesize --batch 64 --variants reference,reference_autocast,reference_compile,ours,ours_compile
  run $T --tasks synthesize_all --batch 64 --variants reference,reference_x7,ours
  run $T --tasks train_step --batch 64 --variants reference,reference_autocast,ours
  run $T --tasks encode,synthesize --batch 1 --variants reference,reference_autocast,ours,ours_cudagraphs
fi
exit $status
