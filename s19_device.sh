#!/usr/bin/env bash
# Session 19, device call 157: the final dependent-combine build: A/B (order alternating), tests, racecheck.
set -uo pipefail
b=build-h200
timeout 120 python3 bench/cuda/ab_libs.py --a "$b/old/libcq_cuda_bench.so" --b "$b/bench/cuda/libcq_cuda_bench.so" \
  --shapes 16,32,32,32768 1,32,8,4096 1,64,8,32768 --C 8 4 --chain 20 --rounds 4 > "$OUT/ab_final.log" 2>&1
echo "ab exit $?"; cat "$OUT/ab_final.log"
timeout 220 "$b/tests/cq_cuda_tests" > "$OUT/cuda_tests.log" 2>&1; echo "tests exit $?"; tail -n 4 "$OUT/cuda_tests.log"
CQ_CUDA_TEST_QUICK=1 timeout 130 compute-sanitizer --tool racecheck --error-exitcode 3 "$b/tests/cq_cuda_tests" \
  -tc='*fused attention matches*' > "$OUT/sanitizer_racecheck.log" 2>&1
echo "racecheck exit $?"; grep -E "test cases|SUMMARY" "$OUT/sanitizer_racecheck.log" | tail -n 3
