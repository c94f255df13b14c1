#!/usr/bin/env python3
"""A/B of two builds of the benchmark library (bench/cuda/cq_cuda_bench.cu) in one process: per shape
and code width, both libraries run fused attention on the same synthetic batch (same seeds), in turn
for --rounds rounds; prints each library's median over the rounds of its per-round medians, the
ratio b / a (the two take turns to go first in a round; A's buffers are always allocated before
B's), and how far the two outputs are apart (largest difference over the largest magnitude;
0 = identical bit for bit; kernels whose warps raise a shared softmax reference in the order they
arrive differ in the last bits from run to run). One device call, one torch
start, the two builds interleaved (the method of bench/RESULTS.md).

    python3 bench/cuda/ab_libs.py --a OLD.so --b NEW.so --shapes 1,32,8,32768 16,32,32,32768 \
        [--C 8 2] [--kernel 0] [--chain 20] [--rounds 3] [--reps 20] [--soft-cap-b 50]

--soft-cap-a / --soft-cap-b: that library's runs soft-cap the logits (A and B may be the same build,
to time the cap itself).

--chain N times N runs issued back to back between two events (the GPU's time per run, without the
host's launch latency; see time_cq.py).

--pages P also times each library with the same codes in shuffled pages of P tokens (cqb_set_pages),
the four runs of a round taking turns, and prints each library's paged time and paged / contiguous
beside the contiguous line.
"""

import argparse
import ctypes
import statistics

import torch

import bench


def apart(x, y):
    scale = max(max(abs(v) for v in x), 1e-30)
    return max(abs(u - v) for u, v in zip(x, y)) / scale


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--a", required=True, help="library A (e.g. before a change)")
    ap.add_argument("--b", required=True, help="library B (after)")
    ap.add_argument("--shapes", nargs="+", required=True, help="batch,query heads,KV heads,context")
    ap.add_argument("--C", type=int, nargs="+", default=[8], help="channels per group (8-bit codes)")
    ap.add_argument("--kernel", type=int, default=0, help="0: automatic, 1: general, 2: lane tables, 3: grouped rows")
    ap.add_argument("--chain", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--soft-cap-a", type=float, default=0.0)
    ap.add_argument("--soft-cap-b", type=float, default=0.0)
    ap.add_argument("--pages", type=int, default=0, help="also time the codes in shuffled pages of this many tokens")
    a = ap.parse_args()
    libs = {"a": bench.load(a.a), "b": bench.load(a.b)}
    stream = torch.cuda.current_stream().cuda_stream
    print(f"a = {a.a}, b = {a.b}, kernel {a.kernel}, chain {a.chain}, {a.rounds} rounds of {a.reps} timings, "
          f"soft caps a {a.soft_cap_a} b {a.soft_cap_b}")
    for shape in a.shapes:
        B, hq, hkv, ctx = (int(x) for x in shape.split(","))
        for C in a.C:
            handles = {}
            for k, lib in libs.items():
                h = lib.cqb_create(B, hq, hkv, ctx, C, 8, 32)
                if not h:
                    raise SystemExit(f"{k}: " + lib.cqb_last_error().decode())
                lib.cqb_set_kernel(h, a.kernel)
                cap = a.soft_cap_a if k == "a" else a.soft_cap_b
                if cap and lib.cqb_set_soft_cap(h, cap):
                    raise SystemExit(f"{k}: " + lib.cqb_last_error().decode())
                handles[k] = h
            modes = (0, a.pages) if a.pages else (0,)
            times = {(k, p): [] for k in libs for p in modes}
            outs = {}
            for r in range(a.rounds):
                order = [(k, p) for k in ("a", "b") for p in modes]
                for k, p in order if r % 2 == 0 else order[::-1]:  # each first every other round
                    lib = libs[k]
                    h = handles[k]
                    if a.pages and lib.cqb_set_pages(h, p, 0):
                        raise SystemExit(f"{k}: " + lib.cqb_last_error().decode())

                    def runs():
                        for _ in range(a.chain):
                            lib.cqb_run(h, 31, stream)

                    times[(k, p)].append(bench.median_ms(runs, a.reps) / a.chain)
                    if r == 0:
                        buf = (ctypes.c_float * (B * hq * 128))()
                        lib.cqb_output(h, buf)
                        outs[(k, p)] = list(buf)
            medp = {kp: statistics.median(t) for kp, t in times.items()}
            med = {k: medp[(k, 0)] for k in libs}  # contiguous
            splits = libs["b"].cqb_splits(handles["b"])
            print(f"{shape} {C}c8b: a {med['a']:.4f} ms, b {med['b']:.4f} ms, b / a {med['b'] / med['a']:.3f}, "
                  f"outputs apart {apart(outs[('a', 0)], outs[('b', 0)]):.1e} (splits {splits}; rounds a "
                  f"{' '.join(f'{t:.4f}' for t in times[('a', 0)])}, b {' '.join(f'{t:.4f}' for t in times[('b', 0)])})",
                  flush=True)
            if a.pages:
                pa, pb = medp[("a", a.pages)], medp[("b", a.pages)]
                same = all(outs[(k, 0)] == outs[(k, a.pages)] for k in libs)
                print(f"{shape} {C}c8b pages of {a.pages}: a {pa:.4f} ms ({pa / med['a']:.3f} of contiguous), "
                      f"b {pb:.4f} ms ({pb / med['b']:.3f} of contiguous; {pb / med['a']:.3f} of a's contiguous), "
                      f"b / a {pb / pa:.3f}, paged outputs {'identical to' if same else 'DIFFER from'} contiguous",
                      flush=True)
            for k, lib in libs.items():
                lib.cqb_destroy(handles[k])


if __name__ == "__main__":
    main()
