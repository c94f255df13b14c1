#!/usr/bin/env bash
# Everything the H200 runs, in one call (device time is scarce): the CUDA tests, compute-sanitizer
# memcheck and racecheck on a reduced test set, and the benchmarks. Binaries come prebuilt in
# build-h200/ (carried with the working tree; see docs/design/cuda-attention.md); logs go to $OUT.
#   bench/cuda/run_h200.sh [--quick]
set -uo pipefail
OUT="${OUT:-/tmp/cq_out}"
mkdir -p "$OUT"
b=build-h200
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
echo "== cuda tests"
"$b/tests/cq_cuda_tests" 2>&1 | tail -n 25 | tee "$OUT/cuda_tests.log"
echo "== compute-sanitizer (reduced grid)"
# racecheck leaves out the k-means tests: under it their many launches outlast the time limit.
# When the k-means kernels change, run them alone under racecheck (-tc='*k-means*', no timeout).
for tool in memcheck racecheck; do
  filter=()
  [ "$tool" = racecheck ] && filter=(-tce='*k-means*')
  CQ_CUDA_TEST_QUICK=1 timeout 300 compute-sanitizer --tool "$tool" --error-exitcode 3 "$b/tests/cq_cuda_tests" \
    "${filter[@]}" > "$OUT/sanitizer_$tool.log" 2>&1
  echo "$tool exit $? ($(grep -c 'ERROR SUMMARY: 0 errors' "$OUT/sanitizer_$tool.log") clean summaries)"
  tail -n 4 "$OUT/sanitizer_$tool.log"
done
echo "== benchmark"
PYTHONUNBUFFERED=1 python3 bench/cuda/bench.py --lib "$b/bench/cuda/libcq_cuda_bench.so" --json "$OUT/bench.json" "$@" 2>&1 | tee "$OUT/bench.log"
