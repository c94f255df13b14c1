#!/usr/bin/env bash
# The whole test suite, from a fresh Debian 12 machine: installs the Debian packages it needs,
# then runs three passes:
#   1. every target (library tests, benchmarks built but not run, examples, tools; the CUDA tests
#      and benchmark are compiled when nvcc is present) in Release with assertions kept on in the
#      tests; ctest runs all tests, including the comparison with faiss and the toy transformer's
#      quality check;
#   2. the same tests again built with clang under AddressSanitizer + UndefinedBehaviorSanitizer,
#      plus the libFuzzer targets fuzzing each parser for CQ_FUZZ_SECONDS (20) seconds;
#   3. the threaded tests under ThreadSanitizer.
# Any sanitizer report fails the run.
#
#   tests/run.sh [build-dir]        (default: build/; the sanitizer builds go beside it)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${1:-$root/build}"
jobs="$(nproc)"
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 ASAN_OPTIONS=detect_leaks=1 TSAN_OPTIONS=halt_on_error=1

"$root/cmake/install-deps.sh"
# Wall-clock seconds of each step, printed as it ends, so a slow CI run says where its time went.
step() { echo "[time] $1 done at ${SECONDS}s"; }
step "install"

# Without a GPU the CUDA code is only compiled, as a check (CQ_CUDA_COMPILE_CHECK: PTX without
# optimisation; cmake/CqCuda.cmake says what that leaves out). Sanitizer builds keep line tables
# only (enough for their reports) and build the ISA conformance variants for AVX2 only: pass 1 runs
# all of them.
cuda_check=()
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 || cuda_check=(-DCQ_CUDA_COMPILE_CHECK=ON)
sanitizer_flags=(-DCMAKE_BUILD_TYPE=RelWithDebInfo "-DCMAKE_CXX_FLAGS_RELWITHDEBINFO=-O2 -gline-tables-only -DNDEBUG"
                 -DCQ_CONFORMANCE_ISAS=avx2)

echo "== 1/3 Release build and tests"
cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release "${cuda_check[@]}"
cmake --build "$build" -j"$jobs"
step "build 1/3"
ctest --test-dir "$build" --output-on-failure -j"$jobs"
step "tests 1/3"

echo "== 2/3 AddressSanitizer + UndefinedBehaviorSanitizer (clang), with the fuzzers"
CXX=clang++ cmake -S "$root" -B "$build-asan" "${sanitizer_flags[@]}" -DCQ_SANITIZE=address,undefined \
  -DCQ_ENABLE_CUDA=OFF -DCQ_BUILD_BENCH=OFF -DCQ_BUILD_FUZZERS=ON
cmake --build "$build-asan" -j"$jobs"
step "build 2/3"
ctest --test-dir "$build-asan" --output-on-failure -j"$jobs"
step "tests 2/3"

echo "== 3/3 ThreadSanitizer (clang): thread pool, concurrent attention, parallel fits, cq-calibrate"
CXX=clang++ cmake -S "$root" -B "$build-tsan" "${sanitizer_flags[@]}" -DCQ_SANITIZE=thread \
  -DCQ_ENABLE_CUDA=OFF -DCQ_BUILD_BENCH=OFF -DCQ_BUILD_EXAMPLES=OFF
cmake --build "$build-tsan" -j"$jobs" --target cq_thread_tests cq_calibrate_tests
step "build 3/3"
"$build-tsan/tests/cq_thread_tests" -tc="*concurrent*,*thread*,*splitting*,*reproducible*,*ThreadPool*"
"$build-tsan/tools/cq_calibrate_tests"
step "tests 3/3"
echo "all passes clean"
