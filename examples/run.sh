#!/usr/bin/env bash
# cq's main example, from a fresh Debian 12 machine: installs the Debian packages it needs, builds
# the examples in Release and runs them.
#
#   examples/run.sh [build-dir]     (default: build/)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${1:-$root/build}"

"$root/cmake/install-deps.sh"
cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$build" -j"$(nproc)" --target cq_quickstart
"$build/examples/cq_quickstart"
