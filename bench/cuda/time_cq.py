#!/usr/bin/env python3
"""Times cq's fused attention alone on one decode shape (no SDPA, no calibration timing): the quick
A/B driver behind the kernel-version tables of docs/design/cuda-attention.md. Build two libraries (e.g. before
and after a change) and run this once per library in the same device call.

    python3 bench/cuda/time_cq.py --lib LIB.so [--shape B,HQ,HKV,CTX] [--C 8] [--kernel 2] [--stages] [--chain N]
                                  [--pages P [--rounds R] [--in-order | --identity] [--append]]

--stages also times the stage subsets bench.py uses for its time split (stage bits: 1 score tables,
2 key scan, 4 value histograms, 8 window, 16 histogram x codebook). --chain N times N runs issued
back to back between two events and reports the time per run: the GPU's time, without the host's
launch latency that a single short run waits for (both matter to a decode step; they differ at
batch 1 and short contexts). --pages P times the same codes in contiguous buffers and in pages of P
tokens (shuffled over the pool, or each sequence's in order with --in-order, or with --identity the contiguous
buffers themselves through an identity page table), alternating for R rounds, and checks that both give the same output;
--append then times cuda::encode_into_pages of one new token per sequence into those pages (a decode step's
append), alone and followed by cuda::write_full_rows of the same rows into fp16 window pages, and reports each
against the paged decode.
"""

import argparse
import ctypes

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
    ap.add_argument("--pages", type=int, default=0,
                    help="also time the codes in shuffled pages of this many tokens, alternating with contiguous "
                         "buffers for --rounds rounds (and check both give the same output)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--append", action="store_true",
                    help="with --pages: also time encoding one new token per sequence into the pages "
                         "(cuda::encode_into_pages, fp16 rows) against the paged decode")
    ap.add_argument("--in-order", action="store_true", help="each sequence's pages consecutive (default: shuffled)")
    ap.add_argument("--identity", action="store_true",
                    help="the contiguous buffers themselves read as pages in order (the paged code path over "
                         "contiguous bytes: separates the path's instructions from the pool's access pattern)")
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

    if a.pages:
        outs, times = {}, {0: [], a.pages: []}
        for r in range(a.rounds):
            for p in (0, a.pages):
                if lib.cqb_set_pages(h, p, 2 if a.identity and p else int(a.in_order)):
                    raise SystemExit(lib.cqb_last_error().decode())
                times[p].append(bench.median_ms(lambda: runs(31), a.reps) / a.chain)
                if r == 0:
                    buf = (ctypes.c_float * (B * hq * 128))()
                    lib.cqb_output(h, buf)
                    outs[p] = list(buf)
        same = outs[0] == outs[a.pages]
        med = {p: sorted(t)[len(t) // 2] for p, t in times.items()}
        print(f"C={a.C} {a.shape}: contiguous {med[0]:.4f} ms, pages of {a.pages}{' in order' if a.in_order else ''} "
              f"{med[a.pages]:.4f} ms, "
              f"pages / contiguous {med[a.pages] / med[0]:.3f}, outputs {'identical' if same else 'DIFFER'} "
              f"(splits {lib.cqb_splits(h)}, medians of {a.rounds} rounds)")
        if a.append:
            for with_rows in (0, 1):
                ms = lib.cqb_append_ms(h, a.reps, stream, with_rows)
                if ms < 0:
                    raise SystemExit(lib.cqb_last_error().decode())
                what = "encode one token per sequence into pages of " + str(a.pages)
                if with_rows:
                    what += " + write its rows into fp16 window pages"
                print(f"C={a.C} {a.shape}: append ({what}) {ms:.4f} ms, {100 * ms / med[a.pages]:.1f}% of the paged decode")
        lib.cqb_destroy(h)
        return
    out = [f"C={a.C} {a.shape}: {bench.median_ms(lambda: runs(31), a.reps) / a.chain:.4f} ms"]
    if a.stages:
        for st in (8, 24, 25, 27, 30, 31):
            out.append(f"stages {st}: {bench.median_ms(lambda: runs(st), a.reps) / a.chain:.4f}")
    print(", ".join(out), f"(splits {lib.cqb_splits(h)})")
    lib.cqb_destroy(h)


if __name__ == "__main__":
    main()
