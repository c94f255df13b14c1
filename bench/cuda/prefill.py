#!/usr/bin/env python3
"""Chunked prefill: cq's prefill kernel (a chunk of new tokens over a coded prefix and, causally,
over itself) against PyTorch's fp16 scaled_dot_product_attention with the flash backend over the
same context held in fp16, in one process with the same CUDA events, alternating.

    python3 bench/cuda/prefill.py --lib build-h200/bench/cuda/libcq_cuda_bench.so [--json OUT.json]

Shape: D = 128, batch B, a chunk of `--rows` tokens after a prefix of `--context` - rows tokens
(cq: coded, the last `--window` (32) in full precision; SDPA: fp16), causal with the chunk aligned to the end
of the context (torch.nn.attention.bias.causal_lower_right). Reported: medians over `--rounds`
rounds, each the median of `--reps` calls of one then of the other (`--in-kernel`: then of cq
with no workspace for decoded rows, the coded tiles decoded in the kernel; `--pre-rope`: then of cq
with the keys coded before RoPE, LLaMA-3's theta 500000 with rotate_half, rotated in the kernels --
SDPA's keys are after RoPE, its RoPE not timed).
"""

import argparse
import json
import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from bench import load, median_ms
import ctypes


def sdpa_call(q, k, v, rows, total):
    """The fastest flash-backend call PyTorch accepts for this shape, and how it was called."""
    gqa = q.shape[1] != k.shape[1]
    mask = causal_lower_right(rows, total)
    tries = [
        ("flash, causal lower-right", lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)),
    ]
    if gqa:
        ke = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        ve = v.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        tries.append(("flash, causal lower-right, K/V expanded to the query heads",
                      lambda: F.scaled_dot_product_attention(q, ke, ve, attn_mask=mask)))
    for how, fn in tries:
        try:
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                fn()
            torch.cuda.synchronize()
            return how, fn
        except RuntimeError as e:
            print(f"  (SDPA {how}: {str(e).splitlines()[0][:160]})", flush=True)
    raise RuntimeError("no flash SDPA call worked")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", required=True)
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--heads", default="32/8,32/32")
    ap.add_argument("--configs", default="8,4,2")
    ap.add_argument("--page-tokens", type=int, default=0,
                    help="codes in pages of this many tokens, in shuffled order (0: contiguous buffers)")
    ap.add_argument("--window", type=int, default=32,
                    help="the prefix's last tokens held in full precision (fp32 rows), the rest coded")
    ap.add_argument("--in-kernel", action="store_true",
                    help="also time the kernel decoding the coded tiles itself (no workspace for decoded rows)")
    ap.add_argument("--pre-rope", action="store_true",
                    help="also time cq with the keys coded before RoPE (rotated in the kernels)")
    ap.add_argument("--soft-cap", type=float, default=0.0,
                    help="cq's logits soft-capped at this value (0: none; SDPA is not capped)")
    ap.add_argument("--json")
    a = ap.parse_args()
    lib = load(a.lib)
    lib.cqb_prefill.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64]
    lib.cqb_prefill_output.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    lib.cqb_set_prefill_workspace_limit.argtypes = [ctypes.c_void_p, ctypes.c_uint64]
    if a.pre_rope:
        lib.cqb_set_prefill_rope.argtypes = [ctypes.c_void_p, ctypes.c_double, ctypes.c_int]
    stream = torch.cuda.current_stream().cuda_stream

    def ok(rc):
        if rc != 0:
            raise RuntimeError(lib.cqb_last_error().decode())
    B, R, T, D = a.batch, a.rows, a.context, 128
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"prefill of {R} rows over {T - R} cached tokens ({T} in all), batch {B}, head_dim {D}, "
          f"codes {'in pages of %d tokens' % a.page_tokens if a.page_tokens else 'contiguous'}"
          f"{', cq logits soft-capped at %g' % a.soft_cap if a.soft_cap else ''}")
    print("| q/kv heads | config | SDPA flash fp16 ms | cq ms | cq / SDPA | SDPA call |")
    print("|---|---|---|---|---|---|")
    results = []
    for heads in a.heads.split(","):
        hq, hkv = map(int, heads.split("/"))
        q = torch.randn(B, hq, R, D, device="cuda", dtype=torch.float16)
        k = torch.randn(B, hkv, T, D, device="cuda", dtype=torch.float16)
        v = torch.randn(B, hkv, T, D, device="cuda", dtype=torch.float16)
        how, sdpa = sdpa_call(q, k, v, R, T)
        flops = 4.0 * B * hq * D * (R * (T - R) + R * (R + 1) / 2)
        for C in map(int, a.configs.split(",")):
            h = lib.cqb_create(B, hq, hkv, T - R, C, 8, a.window)
            if not h:
                raise RuntimeError(lib.cqb_last_error().decode())
            if a.page_tokens:
                ok(lib.cqb_set_pages(h, a.page_tokens, 0))
            if a.soft_cap:
                ok(lib.cqb_set_soft_cap(h, a.soft_cap))

            def cq():
                ok(lib.cqb_prefill(h, R, stream))

            def replan(rc):
                """After a setter (its return code): the next call plans again, outside the timing."""
                ok(rc)
                cq()
                torch.cuda.synchronize()

            def limit(bytes_):
                replan(lib.cqb_set_prefill_workspace_limit(h, bytes_))

            def rope(theta):
                replan(lib.cqb_set_prefill_rope(h, theta, 0))

            limit(512 << 20)
            s_t, c_t, k_t, r_t = [], [], [], []
            for _ in range(a.rounds):
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    s_t.append(median_ms(sdpa, a.reps))
                c_t.append(median_ms(cq, a.reps))
                if a.in_kernel:
                    limit(0)
                    k_t.append(median_ms(cq, a.reps))
                    limit(512 << 20)
                if a.pre_rope:
                    rope(500000.0)
                    r_t.append(median_ms(cq, a.reps))
                    rope(0.0)
            s_ms, c_ms = statistics.median(s_t), statistics.median(c_t)
            lib.cqb_destroy(h)
            row = dict(q_heads=hq, kv_heads=hkv, config=f"{C}c8b", batch=B, rows=R, context=T,
                       page_tokens=a.page_tokens, sdpa_ms=s_ms,
                       cq_ms=c_ms, ratio=c_ms / s_ms, sdpa_call=how, cq_tflops=flops / c_ms / 1e9,
                       sdpa_tflops=flops / s_ms / 1e9, rounds_sdpa=s_t, rounds_cq=c_t)
            results.append(row)
            print(f"| {hq}/{hkv} | {C}c8b | {s_ms:.3f} ({row['sdpa_tflops']:.0f} TFLOP/s) | {c_ms:.3f} "
                  f"({row['cq_tflops']:.0f} TFLOP/s) | {c_ms / s_ms:.2f}x | {how} |", flush=True)
            if k_t:
                row.update(in_kernel_ms=statistics.median(k_t), rounds_in_kernel=k_t)
                print(f"  (the same, coded tiles decoded in the kernel: {row['in_kernel_ms']:.3f} ms, "
                      f"{row['in_kernel_ms'] / s_ms:.2f}x SDPA)", flush=True)
            if r_t:
                row.update(pre_rope_ms=statistics.median(r_t), rounds_pre_rope=r_t)
                print(f"  (the same, keys coded before RoPE: {row['pre_rope_ms']:.3f} ms, "
                      f"{row['pre_rope_ms'] / s_ms:.2f}x SDPA, {row['pre_rope_ms'] / c_ms:.3f}x post-RoPE)", flush=True)
        del q, k, v
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
