#!/usr/bin/env bash
# Installs the Debian packages cq's build, tests, benchmarks and examples need, if any is missing.
# Uses sudo when not root. Safe to run repeatedly: it does nothing when everything is present.
set -euo pipefail

packages=(
  g++ clang cmake make              # compilers and build
  libeigen3-dev                     # cq's one library dependency
  doctest-dev libbenchmark-dev      # tests and benchmarks
  libfaiss-dev libopenblas0-pthread # the peer cq is compared against
  bible-kjv                         # public-domain text for the toy transformer
  libclang-rt-14-dev                # sanitizer runtimes for the sanitizer test pass
  libcli11-dev                      # cq-calibrate's command line
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

sudo=""
[ "$(id -u)" -ne 0 ] && sudo="sudo"
echo "cq: installing missing Debian packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
if ! $sudo apt-get install -y -qq "${missing[@]}" >/dev/null; then
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi
