#!/usr/bin/env python3
"""Times PyTorch's fp16 scaled_dot_product_attention and cq's fused CQ attention on the same decode
shapes, in one process with the same CUDA events, and cq's batched GPU calibration.

    python3 bench/cuda/bench.py --lib build-h200/bench/cuda/libcq_cuda_bench.so [--quick | --gqa-grid | --shapes S]
                                [--json OUT.json]

Decode attention: D = 128, one query token per sequence, window 32 (cq) / all tokens (SDPA).
Reported: median of `--reps` timed calls after warm-up; bandwidth = bytes the call must read
(compressed codes + window rows + q/out for cq; fp16 K, V, q, out for SDPA) over time; roofline
= those bytes over the measured device-to-device copy bandwidth (bytes read + written).
"""

import argparse
import ctypes
import json
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F


def load(path):
    lib = ctypes.CDLL(path)
    lib.cqb_create.restype = ctypes.c_void_p
    lib.cqb_create.argtypes = [ctypes.c_int] * 7
    lib.cqb_run.argtypes = [ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint64]
    lib.cqb_bytes.restype = ctypes.c_longlong
    lib.cqb_bytes.argtypes = [ctypes.c_void_p]
    lib.cqb_set_kernel.argtypes = [ctypes.c_void_p, ctypes.c_int]
    if hasattr(lib, "cqb_set_soft_cap"):  # builds from before logit soft-capping lack it
        lib.cqb_set_soft_cap.argtypes = [ctypes.c_void_p, ctypes.c_float]
    for f in ("cqb_splits", "cqb_head_group", "cqb_kernel"):
        getattr(lib, f).argtypes = [ctypes.c_void_p]
    lib.cqb_shared_bytes.restype = ctypes.c_longlong
    lib.cqb_shared_bytes.argtypes = [ctypes.c_void_p]
    lib.cqb_destroy.argtypes = [ctypes.c_void_p]
    lib.cqb_set_split_tokens.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.cqb_set_pages.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    lib.cqb_append_ms.restype = ctypes.c_double
    lib.cqb_append_ms.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64, ctypes.c_int]
    lib.cqb_last_error.restype = ctypes.c_char_p
    lib.cqb_output.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    lib.cqb_calibrate.argtypes = [ctypes.c_int] * 7 + [ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_double)]
    lib.cqb_cpu_mse.restype = ctypes.c_double
    lib.cqb_cpu_mse.argtypes = [ctypes.c_void_p] + [ctypes.c_int] * 4 + [ctypes.c_void_p]
    lib.cqb_cpu_fit_mse.restype = ctypes.c_double
    lib.cqb_cpu_fit_mse.argtypes = [ctypes.c_void_p] + [ctypes.c_int] * 5
    return lib


def median_ms(fn, reps, warmup=5):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def copy_bandwidth():
    x = torch.empty(4 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    t = median_ms(lambda: y.copy_(x), 20)
    del x, y
    return 2 * (4 << 30) / (t / 1e3)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", required=True)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--quick", action="store_true", help="B=16, 32K, MHA only, plus the time split")
    ap.add_argument("--gqa-grid", action="store_true",
                    help="the model-shape grid: batch 1/4/16/64 x heads 32/32, 32/8, 64/8, 28/4 x 4K/32K/128K")
    ap.add_argument("--shapes", help="only these shapes: B,HQ,HKV,CTX[;B,HQ,HKV,CTX...] (e.g. rows of the grid)")
    ap.add_argument("--json")
    ap.add_argument("--no-calibration", action="store_true")
    ap.add_argument("--split-tokens", type=int, default=0, help="cq's longest split (0: its default)")
    ap.add_argument("--sweep-splits", action="store_true", help="time B=16 MHA 32K at several split lengths")
    ap.add_argument("--kernel", type=int, default=0, help="0: automatic, 1: general, 2: lane-tables, 3: grouped-rows kernel")
    a = ap.parse_args()
    lib = load(a.lib)
    dev = torch.cuda.get_device_properties(0)
    print(f"device: {dev.name}, {dev.multi_processor_count} SMs, torch {torch.__version__}, CUDA {torch.version.cuda}", flush=True)
    bw = copy_bandwidth()
    print(f"device-to-device copy bandwidth (read + write): {bw / 1e12:.2f} TB/s", flush=True)
    stream = torch.cuda.current_stream().cuda_stream
    results = {"device": dev.name, "copy_bw": bw, "rows": [], "split": None}

    if a.shapes:
        shapes = [tuple(int(x) for x in sh.split(",")) for sh in a.shapes.split(";")]
    elif a.quick:
        shapes = [(16, 32, 32, 32768)]
    elif a.gqa_grid:  # GQA as LLaMA-3-8B (32/8), LLaMA-3-70B (64/8), Qwen2-7B (28/4)
        shapes = [(b, hq, hkv, ctx) for (hq, hkv) in ((32, 32), (32, 8), (64, 8), (28, 4)) for b in (1, 4, 16, 64)
                  for ctx in (4096, 32768, 131072)]
    else:
        shapes = [(b, hq, hkv, ctx) for b in (1, 16, 64) for (hq, hkv) in ((32, 32), (32, 8))
                  for ctx in (4096, 32768, 131072)]
    configs = [(8, 8), (4, 8), (2, 8)]
    print("\n| B | q/kv heads | ctx | SDPA fp16 ms | config | cq ms | speedup | cq GB/s | % of roofline | splits |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (B, hq, hkv, ctx) in shapes:
        free = torch.cuda.mem_get_info()[0]
        sdpa_ms = None
        kv_bytes = 2 * B * hkv * ctx * 128 * 2
        if kv_bytes < 0.8 * free:
            q = torch.randn(B, hq, 1, 128, dtype=torch.float16, device="cuda")
            k = torch.randn(B, hkv, ctx, 128, dtype=torch.float16, device="cuda")
            v = torch.randn_like(k)
            gqa = hq != hkv
            sdpa_ms = median_ms(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa), a.reps)
            del q, k, v
            torch.cuda.empty_cache()
        for (C, bits) in configs:
            h = lib.cqb_create(B, hq, hkv, ctx, C, bits, 32)
            if h and a.split_tokens:
                lib.cqb_set_split_tokens(h, a.split_tokens)
            if h and a.kernel:
                lib.cqb_set_kernel(h, a.kernel)
            if not h:
                print(f"| {B} | {hq}/{hkv} | {ctx} | | {C}c{bits}b | error: {lib.cqb_last_error().decode()} |", flush=True)
                continue
            ms = median_ms(lambda: lib.cqb_run(h, 31, stream), a.reps)
            nbytes = lib.cqb_bytes(h)
            gbs = nbytes / (ms / 1e3) / 1e9
            roof = nbytes / bw * 1e3
            row = dict(B=B, q_heads=hq, kv_heads=hkv, ctx=ctx, config=f"{C}c{bits}b", sdpa_ms=sdpa_ms, cq_ms=ms,
                       bytes=nbytes, gbs=gbs, roofline_ms=roof, splits=lib.cqb_splits(h), head_group=lib.cqb_head_group(h),
                       shared_bytes=lib.cqb_shared_bytes(h), kernel=["auto", "general", "lane-tables", "grouped-rows"][lib.cqb_kernel(h)])
            results["rows"].append(row)
            sp = f"{sdpa_ms / ms:.1f}x" if sdpa_ms else "—"
            sd = f"{sdpa_ms:.3f}" if sdpa_ms else "(no memory)"
            print(f"| {B} | {hq}/{hkv} | {ctx // 1024}K | {sd} | {C}c{bits}b | {ms:.3f} | {sp} | {gbs:.0f} | "
                  f"{100 * roof / ms:.0f}% | {row['splits']} |", flush=True)
            if (B, hq, hkv, ctx) == (16, 32, 32, 32768) and row["kernel"] == "lane-tables":
                # The general kernel (bank-conflicted shared tables) on the same shape, for comparison.
                lib.cqb_set_kernel(h, 1)
                gms = median_ms(lambda: lib.cqb_run(h, 31, stream), a.reps)
                row["general_kernel_ms"] = gms
                print(f"  general kernel on the same shape: {gms:.3f} ms ({sdpa_ms / gms:.1f}x SDPA)", flush=True)
                lib.cqb_set_kernel(h, a.kernel)
            if a.sweep_splits and (B, hq, hkv, ctx) == (16, 32, 32, 32768):
                for t in (1024, 2048, 4096, 8192, 16384):
                    lib.cqb_set_split_tokens(h, t)
                    print(f"  split tokens {t}: {median_ms(lambda: lib.cqb_run(h, 31, stream), a.reps):.3f} ms "
                          f"({lib.cqb_splits(h)} splits)", flush=True)
                lib.cqb_set_split_tokens(h, a.split_tokens or 0)
            if (B, hq, hkv, ctx, C) == (16, 32, 32, 32768, 8):
                # Time split by leaving stages out (cq::cuda::detail::AttentionStage): 8 = window and the
                # loop's skeleton, 24 = + histogram x codebook product, 25 = + score tables,
                # 27 = + key scan, 31 = + value histograms (everything).
                t = {s: median_ms(lambda: lib.cqb_run(h, s, stream), a.reps) for s in (8, 24, 25, 27, 31)}
                results["split"] = t
            lib.cqb_destroy(h)
    if results["split"]:
        t = results["split"]
        print(f"\ntime split, B=16 MHA 32K CQ-8c8b: window+softmax+loop skeleton {t[8]:.3f} ms, "
              f"histogram x codebook {t[24] - t[8]:.3f} ms, score tables {t[25] - t[24]:.3f} ms, "
              f"key scan {t[27] - t[25]:.3f} ms, value histograms {t[31] - t[27]:.3f} ms, total {t[31]:.3f} ms", flush=True)

    if not a.no_calibration:
        # LLaMA-7B-sized: 32 layers x (K, V) x 32 heads = 2048 jobs of 32768 x 128, CQ-8c8b, 100 iterations.
        jobs, n, dim, C, bits, iters, keep = (64, 8192, 128, 8, 8, 25, 2) if a.quick else (2048, 32768, 128, 8, 8, 100, 2)
        G, K = dim // C, 1 << bits
        hx = np.zeros(keep * n * dim, dtype=np.float32)
        hc = np.zeros(keep * G * K * C, dtype=np.float32)
        secs = ctypes.c_double()
        rc = lib.cqb_calibrate(jobs, n, dim, C, bits, iters, keep, hx.ctypes.data, hc.ctypes.data, ctypes.byref(secs))
        if rc:
            print("calibration error:", lib.cqb_last_error().decode())
        else:
            print(f"\nGPU calibration: {jobs} jobs (codebooks of {G} groups) x {n} tokens x {dim}, CQ-{C}c{bits}b, "
                  f"{iters} iterations: {secs.value:.2f} s", flush=True)
            results["calibration"] = dict(jobs=jobs, n=n, dim=dim, C=C, bits=bits, iterations=iters, seconds=secs.value, jobs_checked=[])
            for j in range(keep):
                x = np.ascontiguousarray(hx[j * n * dim:(j + 1) * n * dim])
                c = np.ascontiguousarray(hc[j * G * K * C:(j + 1) * G * K * C])
                t0 = time.time()
                gpu_mse = lib.cqb_cpu_mse(x.ctypes.data, n, dim, C, bits, c.ctypes.data)
                cpu_mse = lib.cqb_cpu_fit_mse(x.ctypes.data, n, dim, C, bits, iters)
                print(f"  job {j}: MSE of the GPU codebooks {gpu_mse:.5f}, CPU fit {cpu_mse:.5f} "
                      f"(ratio {gpu_mse / cpu_mse:.4f}; CPU fit {time.time() - t0:.1f} s)", flush=True)
                results["calibration"]["jobs_checked"].append(dict(gpu_mse=gpu_mse, cpu_mse=cpu_mse))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
