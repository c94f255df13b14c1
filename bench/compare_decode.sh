#!/usr/bin/env bash
# Side-by-side CPU decode attention: cq (bench/decode_bench.cpp) against another engine's kernel,
# alternating processes round by round, medians over rounds. The peer is any program that takes
# `Q KV CTX THREADS REPS` and prints the median microseconds of REPS decode steps with Q query heads
# on KV heads of head_dim 128 over CTX f16 tokens on THREADS threads (we use ggml's CPU
# flash_attn_ext, built from its public source outside this repository by bench/peers/ggml_fa_decode.cpp;
# see bench/RESULTS.md).
#
#   PEER=/path/to/peer [EVICT=64] bench/compare_decode.sh [build-dir] [rounds]
#
# EVICT=M: both programs read M MiB of other memory before every timed call (cold caches, as in a
# real model's decode step; the peer takes it as a sixth argument).
set -euo pipefail
build="${1:-build}"
rounds="${2:-11}"
cq="$build/bench/cq_decode_bench"
: "${PEER:?set PEER to the peer decode program}"
evict="${EVICT:-0}"
median() { sort -g | awk '{a[NR] = $1} END {print a[int((NR + 1) / 2)]}'; }

shapes=("1 1 32768" "8 8 32768" "8 2 32768" "8 1 32768" "1 1 4096" "8 2 4096" "8 1 4096")
echo "| q / KV heads | context | threads | peer us | cq us | peer / cq | cq pre-RoPE us | peer / cq pre | pre / post |"
echo "|---|---|---|---|---|---|---|---|---|"
for shape in "${shapes[@]}"; do
  read -r q kv ctx <<<"$shape"
  reps=$([ "$ctx" -ge 32768 ] && echo 20 || echo 100)
  for threads in 1 2; do
    peer_t=() post_t=() pre_t=()
    for ((r = 0; r < rounds; r++)); do
      peer_t+=("$("$PEER" "$q" "$kv" "$ctx" "$threads" "$reps" "$evict")")
      post_t+=("$("$cq" --q "$q" --kv "$kv" --ctx "$ctx" --threads "$threads" --reps "$reps" --evict "$evict")")
      pre_t+=("$("$cq" --q "$q" --kv "$kv" --ctx "$ctx" --threads "$threads" --reps "$reps" --evict "$evict" --pre-rope)")
    done
    p=$(printf '%s\n' "${peer_t[@]}" | median)
    c=$(printf '%s\n' "${post_t[@]}" | median)
    e=$(printf '%s\n' "${pre_t[@]}" | median)
    awk -v q="$q" -v kv="$kv" -v ctx="$ctx" -v t="$threads" -v p="$p" -v c="$c" -v e="$e" 'BEGIN {
      printf "| %s / %s | %dK | %s | %.0f | %.0f | %.2fx | %.0f | %.2fx | %.2fx |\n", q, kv, ctx / 1024, t, p, c, p / c, e, p / e, e / c }'
  done
done
