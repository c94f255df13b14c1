#!/usr/bin/env bash
# Decode and prefill timings for the logit soft-capping change (session 20), one device call: this
# build against the build before it with no cap (both orders), this build with and without a cap of
# 50 (automatic kernel, then each kernel forced), prefill against SDPA with and without the cap.
# Prebuilt: build-h200/bench/cuda/libcq_cuda_bench.so (new), build-h200/head/libcq_cuda_bench.so
# (before). Logs under $OUT.
set -uo pipefail
OUT="${OUT:-/tmp/cq_out}"
mkdir -p "$OUT"
root=$PWD
cd bench/cuda
new=$root/build-h200/bench/cuda/libcq_cuda_bench.so
old=$root/build-h200/head/libcq_cuda_bench.so
shapes="16,32,32,32768 16,32,8,32768 16,64,8,32768 1,32,8,4096 64,32,8,4096"
python3 ab_libs.py --a "$old" --b "$new" --shapes $shapes --C 8 2 --chain 20 --rounds 4 > "$OUT/ab_head_vs_new.log" 2>&1
python3 ab_libs.py --a "$new" --b "$old" --shapes $shapes --C 8 2 --chain 20 --rounds 4 > "$OUT/ab_new_vs_head.log" 2>&1
python3 ab_libs.py --a "$new" --b "$new" --soft-cap-b 50 --shapes $shapes --C 8 2 --chain 20 --rounds 3 > "$OUT/ab_cap.log" 2>&1
for k in 1 2 3; do
  python3 ab_libs.py --a "$new" --b "$new" --soft-cap-b 50 --kernel $k --shapes 16,32,8,32768 --C 8 2 --chain 20 --rounds 3 >> "$OUT/ab_cap_kernels.log" 2>&1
done
python3 prefill.py --lib "$new" --heads 32/8,32/32 --configs 8 --rounds 3 > "$OUT/prefill.log" 2>&1
python3 prefill.py --lib "$new" --heads 32/8,32/32 --configs 8 --rounds 3 --soft-cap 50 >> "$OUT/prefill.log" 2>&1
