#!/usr/bin/env bash
# cq's main example, from a fresh Debian 12 machine: installs the Debian packages it needs, builds
# the toy-transformer example in Release and runs it: held-out perplexity, bits per channel, KV
# memory and speed of a small trained LLaMA-style model with its KV cache in fp32, CQ and INT,
# then a greedy generation side by side. About a minute on 2 cores.
#
#   examples/run.sh [build-dir] [-- example options, e.g. --windows 32]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="$root/build"
if [ $# -gt 0 ] && [ "$1" != "--" ]; then build="$1"; shift; fi
[ "${1:-}" = "--" ] && shift

"$root/cmake/install-deps.sh"
cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$build" -j"$(nproc)" --target cq_toy_transformer
"$build/examples/cq_toy_transformer" "$@"
