#pragma once
/// The general fused-attention kernel: any code width (1..16 bits) and any group count, after
/// general/lut.cuh has written the score tables.
///
/// The grid is (token splits, KV heads x head groups, sequences), 256 threads per block; a block
/// serves `heads` query heads of one KV head over one split:
///   1. copy its score tables to shared memory (global scratch when they do not fit); zero the
///      value histograms;
///   2. pass 1: each warp stages a 32-token block of key codes into its shared buffer with
///      coalesced 4-byte loads, then lane = token reads its code per key group and sums table
///      entries; scores stay in shared memory; split 0 also scores the full-precision tokens
///      (sinks + window), a warp per token; one block-wide maximum per head;
///   3. pass 2: weights exp(s - max) <= 1 as 2^-20 fixed point go into u32 histograms over value
///      codes with shared-memory integer atomics (float atomics would be compare-and-swap loops);
///   4. the split's (max, weight sum, full-precision part) and its histograms go to global memory;
///      general/merge.cuh merges the splits and multiplies the summed histograms by the value
///      centroids once per (sequence, head) (a product per split block would read the whole value
///      codebook each time).

#include "cq/attention/softmax_state.hpp"
#include "cq/cuda/attention/general/layout.cuh"
#include "cq/cuda/attention/params.cuh"
#include "cq/cuda/warp.cuh"
#include "cq/detail/bit_packing.hpp"

#include <cuda_runtime.h>

#include <cfloat>
#include <cstddef>
#include <cstdint>

namespace cq::cuda::detail {

/// Software pipeline of a warp's 32-token code blocks: the next block's words are loaded into
/// registers (coalesced 4-byte loads, up to 16 per lane) while the current block is processed from
/// the warp's shared staging buffer. Blocks larger than 512 words are staged without prefetch.
struct CodePipe {
  static constexpr int max_words_per_lane = 16;
  std::uint32_t next[max_words_per_lane];
  int words, lane;
  __device__ CodePipe(int block_words, int lane_id) : words(block_words), lane(lane_id) {}
  __device__ bool prefetching() const { return words <= 32 * max_words_per_lane; }
  __device__ void load(const std::uint32_t* __restrict__ src) {
    if (!prefetching()) return;
#pragma unroll
    for (int i = 0; i < max_words_per_lane; ++i)
      if (lane + 32 * i < words) next[i] = src[lane + 32 * i];
  }
  /// Puts block `src` (whose words load() fetched, if prefetching) into `stage`.
  __device__ void stage(const std::uint32_t* __restrict__ src, std::uint32_t* stage_buf) const {
    if (prefetching()) {
#pragma unroll
      for (int i = 0; i < max_words_per_lane; ++i)
        if (lane + 32 * i < words) stage_buf[lane + 32 * i] = next[i];
    } else {
      for (int i = lane; i < words; i += 32) stage_buf[i] = src[i];
    }
    __syncwarp();
  }
};

template <int HG, bool TablesShared>
__global__ void __launch_bounds__(general_threads) general_kernel(AttentionBatch p, GeneralLayout L, int head_groups,
                                                                  const float* __restrict__ luts, float* __restrict__ partial,
                                                                  unsigned* __restrict__ partial_hist,
                                                                  float* __restrict__ tables_global, unsigned stages) {
  extern __shared__ float sm[];
  const int split = blockIdx.x, b = blockIdx.z;
  const int kvh = blockIdx.y / head_groups, sub = blockIdx.y % head_groups;
  const int group = p.q_heads / p.kv_heads;
  const int h0 = kvh * group + sub * HG;
  const int D = p.head_dim, tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const DeviceSequence seq = p.sequences[b];
  const DeviceKVCodes codes = p.codes[b * p.kv_heads + kvh];
  const DeviceCodebookView vcb = p.value_codebooks[kvh];
  const int kbits = p.key_codebooks[kvh].bits, vbits = vcb.bits;
  const int key_centroids = L.key_centroids, value_centroids = L.value_centroids;
  const int c0 = split * L.split_tokens;
  const int c1 = min(int(seq.coded), c0 + L.split_tokens);
  const int n = max(0, c1 - c0), nblocks = (n + 31) / 32;
  const int nfull = split == 0 ? int(seq.full) : 0;
  const float scale = p.scale != 0.0f ? p.scale : rsqrtf(float(D));

  float* tables;
  if constexpr (TablesShared)
    tables = sm;
  else
    tables = tables_global + (std::size_t(blockIdx.z) * gridDim.y * gridDim.x + std::size_t(blockIdx.y) * gridDim.x +
                              blockIdx.x) * std::size_t(L.tables_per_block());
  float* lut = tables;                                                    // [HG][key groups][key centroids]
  unsigned* hist = reinterpret_cast<unsigned*>(lut + HG * L.lut_size());  // [HG][value groups][value centroids]
  float* score = sm + (TablesShared ? L.tables_per_block() : 0);          // [HG][split + full]
  std::uint32_t* stage = reinterpret_cast<std::uint32_t*>(score + HG * L.score_stride()) + warp * L.stage_words;
  float* red = reinterpret_cast<float*>(reinterpret_cast<std::uint32_t*>(score + HG * L.score_stride()) +
                                        general_warps * L.stage_words);  // [HG][warps]
  float* ref = red + HG * general_warps;                                 // [HG]

  // Tables: copy this block's score tables (computed once per head by score_table_kernel), zero
  // the histograms.
  if (n > 0 && (stages & stage_lut)) {
    const float4* src = reinterpret_cast<const float4*>(luts + (std::size_t(b) * p.q_heads + h0) * L.lut_size());
    float4* dst = reinterpret_cast<float4*>(lut);
    for (int i = tid; i < HG * L.lut_size() / 4; i += general_threads) dst[i] = src[i];
  }
  for (int i = tid; i < HG * L.hist_size(); i += general_threads) hist[i] = 0u;
  __syncthreads();

  // Pass 1: scores of the split's coded tokens. A warp stages each 32-token block of key codes
  // with coalesced 4-byte loads (the next block's words are loaded while this one is scored),
  // then lane = token reads its codes from shared memory and sums table entries.
  const int kwords = L.key_groups * kbits, vwords = L.value_groups * vbits;  // 4-byte words per 32-token block
  const CodeRun kruns = codes.keys(p.page_shift()), vruns = codes.values(p.page_shift());
  auto kblock = [&](int blk) { return reinterpret_cast<const std::uint32_t*>(kruns.block(c0 / 32 + blk, 4 * kwords)); };
  auto vblock = [&](int blk) { return reinterpret_cast<const std::uint32_t*>(vruns.block(c0 / 32 + blk, 4 * vwords)); };
  float lmax[HG];
#pragma unroll
  for (int h = 0; h < HG; ++h) lmax[h] = -FLT_MAX;
  if (stages & stage_scan) {
    CodePipe pipe(kwords, lane);
    if (warp < nblocks) pipe.load(kblock(warp));
    for (int blk = warp; blk < nblocks; blk += general_warps) {
      pipe.stage(kblock(blk), stage);
      if (blk + general_warps < nblocks) pipe.load(kblock(blk + general_warps));
      const std::uint8_t* st = reinterpret_cast<const std::uint8_t*>(stage);
      float s[HG];
#pragma unroll
      for (int h = 0; h < HG; ++h) s[h] = 0.0f;
      if (kbits == 8) {
#pragma unroll 4
        for (int g = 0; g < L.key_groups; ++g) {
          const unsigned code = st[g * 32 + lane];
#pragma unroll
          for (int h = 0; h < HG; ++h) s[h] += lut[(h * L.key_groups + g) * key_centroids + code];
        }
      } else {
        for (int g = 0; g < L.key_groups; ++g) {
          const unsigned code = cq::detail::read_code(st + g * 4 * kbits, unsigned(lane), kbits);
#pragma unroll
          for (int h = 0; h < HG; ++h) s[h] += lut[(h * L.key_groups + g) * key_centroids + code];
        }
      }
      __syncwarp();  // the staging buffer is reused by the next block
      const bool valid = blk * 32 + lane < n;
#pragma unroll
      for (int h = 0; h < HG; ++h) {
        score[h * L.score_stride() + blk * 32 + lane] = valid ? s[h] : -FLT_MAX;
        if (valid) lmax[h] = fmaxf(lmax[h], s[h]);
      }
    }
    // Soft-capped logits: each warp caps its own blocks' scores and its maxima (tanh is increasing)
    // after the loop above, which stays the same with or without a cap (softmax_state.hpp, SoftCap).
    if (p.logits_soft_cap > 0.0f) {
      const SoftCap cap(p.logits_soft_cap);
      for (int blk = warp; blk < nblocks; blk += general_warps)
        if (blk * 32 + lane < n)
          for (int h = 0; h < HG; ++h) {
            float& x = score[h * L.score_stride() + blk * 32 + lane];
            x = cap(x);
          }
#pragma unroll
      for (int h = 0; h < HG; ++h) lmax[h] = lmax[h] > -FLT_MAX ? cap(lmax[h]) : lmax[h];
    }
  } else {
    for (int i = tid; i < nblocks * 32; i += general_threads)
#pragma unroll
      for (int h = 0; h < HG; ++h) score[h * L.score_stride() + i] = i < n ? 0.0f : -FLT_MAX;
    if (n > 0)
#pragma unroll
      for (int h = 0; h < HG; ++h) lmax[h] = 0.0f;
  }
  // Full-precision tokens (split 0): a warp per token, lanes over head_dim.
  if (nfull > 0) visit_full_rows(p, b, kvh, [&](const auto& rows) {
    for (int j = warp; j < nfull; j += general_warps) {
      const auto* k = rows.key(j);
#pragma unroll
      for (int h = 0; h < HG; ++h) {
        float s = 0.0f;
        if (stages & stage_full) {
          const std::size_t q0 = (std::size_t(b) * p.q_heads + h0 + h) * D;
          for (int d = lane; d < D; d += 32) s = fmaf(p.query(q0 + d), rows.at(k, d), s);
          s = soft_cap(scale * warp_sum(s), p.logits_soft_cap);
        }
        if (lane == 0) score[h * L.score_stride() + L.split_tokens + j] = s;
        // A full-precision token raises the reference only to within full_reach of itself: the
        // coded tokens' fixed-point weights stay relative to their own maximum (a dominant sink
        // would round them all to zero), and the full-precision weights, in float, stay below
        // e^full_reach.
        lmax[h] = fmaxf(lmax[h], s - full_reach);
      }
    }
  });
  // Block maximum per head: the reference the weights are taken against (coded weights <= 1).
#pragma unroll
  for (int h = 0; h < HG; ++h) {
    const float m = warp_max(lmax[h]);
    if (lane == 0) red[h * general_warps + warp] = m;
  }
  __syncthreads();
  if (tid < HG) {
    float m = -FLT_MAX;
    for (int w = 0; w < general_warps; ++w) m = fmaxf(m, red[tid * general_warps + w]);
    ref[tid] = m;
  }
  __syncthreads();
  float r[HG];
#pragma unroll
  for (int h = 0; h < HG; ++h) r[h] = ref[h];

  // Pass 2: weights as fixed point, accumulated per value group and code with shared-memory
  // integer atomics (float atomics are compare-and-swap loops). Tokens whose weight rounds to
  // zero (< 2^-21 of the largest) skip their value codes' atomics.
  float wsum[HG];
#pragma unroll
  for (int h = 0; h < HG; ++h) wsum[h] = 0.0f;
  CodePipe vpipe(vwords, lane);
  if ((stages & stage_hist) && warp < nblocks) vpipe.load(vblock(warp));
  for (int blk = warp; blk < nblocks; blk += general_warps) {
    if (stages & stage_hist) {
      vpipe.stage(vblock(blk), stage);
      if (blk + general_warps < nblocks) vpipe.load(vblock(blk + general_warps));
    }
    const std::uint8_t* st = reinterpret_cast<const std::uint8_t*>(stage);
    unsigned w[HG];
    bool any = false;
#pragma unroll
    for (int h = 0; h < HG; ++h) {
      const float e = softmax_exp(score[h * L.score_stride() + blk * 32 + lane] - r[h]);
      w[h] = blk * 32 + lane < n ? __float2uint_rn(e * L.unit) : 0u;
      wsum[h] += float(w[h]);
      any = any || w[h] != 0u;
    }
    if ((stages & stage_hist) && any) {
      for (int g = 0; g < L.value_groups; ++g) {
        const unsigned code = vbits == 8 ? st[g * 32 + lane] : cq::detail::read_code(st + g * 4 * vbits, unsigned(lane), vbits);
#pragma unroll
        for (int h = 0; h < HG; ++h)
          if (w[h]) atomicAdd(&hist[(h * L.value_groups + g) * value_centroids + code], w[h]);
      }
    }
    __syncwarp();
  }
#pragma unroll
  for (int h = 0; h < HG; ++h) {
    const float v = warp_sum(wsum[h]);
    if (lane == 0) red[h * general_warps + warp] = v;
  }
  __syncthreads();

  // Partial results, relative to the block's reference maximum: (max, weight sum, the
  // full-precision tokens' weighted values) and the value histograms; the merge kernel combines
  // the splits and multiplies the histograms by the value centroids once per (sequence, head).
  const std::size_t slot0 = (std::size_t(b) * p.q_heads + h0) * gridDim.x + split;  // head h: slot0 + h * splits
  for (int i = tid; i < HG * L.hist_size(); i += general_threads) {
    const int h = i / L.hist_size(), k = i % L.hist_size();
    partial_hist[(slot0 + std::size_t(h) * gridDim.x) * L.hist_size() + k] = n > 0 ? hist[i] : 0u;
  }
  for (int e = tid; e < HG * D; e += general_threads) {
    const int h = e / D, d = e % D;
    float total = 0.0f;
    for (int w2 = 0; w2 < general_warps; ++w2) total += red[h * general_warps + w2];
    total *= 1.0f / L.unit;
    float o = 0.0f;
    const float* sd = score + h * L.score_stride() + L.split_tokens;
    if (nfull > 0) visit_full_rows(p, b, kvh, [&](const auto& rows) {
      for (int j = 0; j < nfull; ++j) {
        const float wj = softmax_exp(sd[j] - ref[h]);
        total += wj;
        o = fmaf(wj, rows.at(rows.value(j), d), o);
      }
    });
    float* dst = partial + (slot0 + std::size_t(h) * gridDim.x) * (2 + D);
    if (d == 0) {
      dst[0] = total > 0.0f ? ref[h] : -FLT_MAX;
      dst[1] = total;
    }
    dst[2 + d] = o;
  }
}

}  // namespace cq::cuda::detail
