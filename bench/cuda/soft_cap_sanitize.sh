#!/usr/bin/env bash
# compute-sanitizer on the tests the logit soft cap touches (TOOLS="memcheck racecheck initcheck") (quick grid: every twelfth grid shape
# and every special case, the soft-capped ones included). Logs under $OUT.
set -uo pipefail
OUT="${OUT:-/tmp/cq_out}"
mkdir -p "$OUT"
t=build-h200/tests/cq_cuda_tests
run() {  # tool, seconds, test filter
  CQ_CUDA_TEST_QUICK=1 timeout "$2" compute-sanitizer --tool "$1" --error-exitcode 3 "$t" -tc="$3" > "$OUT/sanitizer_$1.log" 2>&1
  echo "$1 exit $? ($(grep -c 'ERROR SUMMARY: 0 errors' "$OUT/sanitizer_$1.log") clean summaries): $(grep -E 'test cases|ERROR SUMMARY' "$OUT/sanitizer_$1.log" | tail -2 | tr '\n' ' ')"
}
for tool in ${TOOLS:-memcheck racecheck initcheck}; do
  case $tool in
    memcheck) run memcheck 200 "*shared attention cases*,*prefill: the attention conformance*,*pools byte for byte*" ;;
    racecheck) run racecheck 200 "*shared attention cases*,*prefill: chunks*" ;;
    initcheck) run initcheck 150 "*shared attention cases*" ;;
  esac
done
