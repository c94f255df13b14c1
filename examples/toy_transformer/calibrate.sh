#!/usr/bin/env bash
# Rebuilds the toy transformer's shipped codebooks (model/codebooks/*.safetensors) from
#   - out/calib_k_pre.npy, out/calib_k_post.npy, out/calib_v.npy: K/V activations of the fp32
#     model on 24 x 512 bytes of train.txt (cq_toy_transformer --dump-calibration out);
#   - out/calib_{k,v}_grad2_l{01,23}.npy: squared loss gradients on the same tokens, written by
#     train.py (needs the GPU run; see README.md).
# Usage: examples/toy_transformer/calibrate.sh [build-dir]     (run from the repository root)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
build="${1:-$here/../../build}"
tool="$build/tools/cq-calibrate"
out="$here/out"
books="$here/model/codebooks"
mkdir -p "$books"
kgrad="$out/calib_k_grad2_l01.npy,$out/calib_k_grad2_l23.npy"
vgrad="$out/calib_v_grad2_l01.npy,$out/calib_v_grad2_l23.npy"
common=(--values "$out/calib_v.npy" --iterations 25 --seed 1234 --storage f16 --quiet)

for cfg in 2c8b 4c8b 8c8b 8c10b; do
  c="${cfg%%c*}"; b="${cfg#*c}"; b="${b%b}"
  for method in uniform fisher; do
    "$tool" --keys "$out/calib_k_pre.npy" "${common[@]}" --key-grads "$kgrad" --value-grads "$vgrad" \
      --channels "$c" --bits "$b" --method "$method" --key-rope pre --rope-theta 10000 \
      --out "$books/$cfg-$method.safetensors" | tail -n 1
  done
done
# Post-RoPE keys, for the RoPE-mode comparison (uniform only).
for cfg in 4c8b 8c8b; do
  c="${cfg%%c*}"; b="${cfg#*c}"; b="${b%b}"
  "$tool" --keys "$out/calib_k_post.npy" "${common[@]}" --channels "$c" --bits "$b" --method uniform \
    --key-rope post --out "$books/$cfg-uniform-postrope.safetensors" | tail -n 1
done
ls -la "$books"
