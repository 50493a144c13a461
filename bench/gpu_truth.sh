#!/usr/bin/env bash
# The GPU truth run: every fused op against the reference at full size, compute-sanitizer memcheck, the
# per-op benchmarks and the whole model, in at most 8 minutes on one H100; every stage under its own time
# limit, JSON written after every case (bench/gpu_truth.py has the details).
#
#   bench/gpu_truth.sh [results_dir]             GPU run -> results_dir/truth-cuda-<stamp>.json
#   bench/gpu_truth.sh --dry-run [results_dir]   the same harness on CPU at tiny sizes, kernels in the Triton
#                                                interpreter (CI: tests/test_gpu_truth_dryrun.py)
#
# Stage limits in seconds (GPU): env 20, parity 80, sanitize 110, ops 110, model 140 = 460 s at most.
# Exit status 0 only if every stage finished with every case ok.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=""
if [ "${1:-}" = "--dry-run" ]; then DRY="--dry-run"; shift; fi
RES=$(mkdir -p "${1:-bench/results}" && cd "${1:-bench/results}" && pwd)
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
if [ -n "$DRY" ]; then
  export TRITON_INTERPRET=1 MTLFACE_FAST_AUTOTUNE=0   # read when triton is imported
  OUT=$RES/truth-dryrun-$STAMP.json
  # hang guards only: ~2 minutes of CPU time in all on an idle 2-core machine, several times that when shared
  declare -A LIMIT=([env]=300 [parity]=900 [sanitize]=900 [ops]=900 [model]=900)
else
  OUT=$RES/truth-cuda-$STAMP.json
  declare -A LIMIT=([env]=20 [parity]=80 [sanitize]=110 [ops]=110 [model]=140)
fi
"$PY" bench/gpu_truth.py init --out "$OUT" $DRY || exit 2
for stage in env parity sanitize ops model; do
  echo; echo "=== $stage (limit ${LIMIT[$stage]} s, $(date -u +%H:%M:%S))"
  timeout -k 10 "${LIMIT[$stage]}" "$PY" bench/gpu_truth.py run "$stage" --out "$OUT" $DRY
  "$PY" bench/gpu_truth.py close "$stage" --out "$OUT" --rc $? --limit "${LIMIT[$stage]}"
done
echo; echo "results: $OUT"
"$PY" bench/gpu_truth.py check --out "$OUT"
