#!/usr/bin/env python3
"""Times cq's fused attention alone on one decode shape (no SDPA, no calibration timing): the quick
A/B driver behind the kernel-version tables of docs/design/cuda-attention.md. Build two libraries (e.g. before
and after a change) and run this once per library in the same device call.

    python3 bench/cuda/time_cq.py --lib LIB.so [--shape B,HQ,HKV,CTX] [--C 8] [--kernel 2] [--stages] [--chain N]

--stages also times the stage subsets bench.py uses for its time split (stage bits: 1 score tables,
2 key scan, 4 value histograms, 8 window, 16 histogram x codebook). --chain N times N runs issued
back to back between two events and reports the time per run: the GPU's time, without the host's
launch latency that a single short run waits for (both matter to a decode step; they differ at
batch 1 and short contexts).
"""

import argparse

import torch

import bench


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", required=True)
    ap.add_argument("--shape", default="16,32,32,32768", help="batch, query heads, KV heads, context")
    ap.add_argument("--C", type=int, default=8, help="channels per group (8-bit codes)")
    ap.add_argument("--kernel", type=int, default=0, help="0: automatic, 1: general, 2: lane-tables, 3: grouped-rows kernel")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--stages", action="store_true")
    ap.add_argument("--chain", type=int, default=1, help="runs per timed interval (reported per run)")
    a = ap.parse_args()
    lib = bench.load(a.lib)
    B, hq, hkv, ctx = (int(x) for x in a.shape.split(","))
    h = lib.cqb_create(B, hq, hkv, ctx, a.C, 8, 32)
    if not h:
        raise SystemExit(lib.cqb_last_error().decode())
    lib.cqb_set_kernel(h, a.kernel)
    stream = torch.cuda.current_stream().cuda_stream
    def runs(stages):
        for _ in range(a.chain):
            lib.cqb_run(h, stages, stream)

    out = [f"C={a.C} {a.shape}: {bench.median_ms(lambda: runs(31), a.reps) / a.chain:.4f} ms"]
    if a.stages:
        for st in (8, 24, 25, 27, 30, 31):
            out.append(f"stages {st}: {bench.median_ms(lambda: runs(st), a.reps) / a.chain:.4f}")
    print(", ".join(out), f"(splits {lib.cqb_splits(h)})")
    lib.cqb_destroy(h)


if __name__ == "__main__":
    main()
