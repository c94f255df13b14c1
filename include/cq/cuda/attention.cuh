#pragma once
/// Fused decode attention on CQ codes for a batch of sequences (one query token each), on the GPU.
///
/// Two kernels serve it. 8-bit codes with 16, 32 or 64 groups (CQ-2c8b, 4c8b, 8c8b at D = 128)
/// take the byte-code kernel (attention_byte_codes.cuh: lane-private tables, 2.7-4x faster). Every
/// other configuration takes the general kernel described here.
///
/// General kernel: a first kernel computes every (sequence, query head)'s score tables
/// LUT[g][j] = scale * q_g . centroid_K[g][j] (from the transposed codebook, coalesced) into
/// global memory. The main kernel's grid is (token splits, KV heads x head groups, sequences),
/// 256 threads per block; a block serves HG query heads of one KV head over one split (at most
/// 4096 coded tokens; splits are also sized for about two waves of blocks):
///   1. copy its score tables to shared memory (global scratch when they do not fit); zero the
///      value histograms;
///   2. pass 1: each warp stages a 32-token block of key codes into its shared buffer with
///      coalesced 4-byte loads, then lane = token reads its code per key group and sums table
///      entries; scores stay in shared memory; split 0 also scores the full-precision tokens
///      (sinks + window), a warp per token; one block-wide maximum per head;
///   3. pass 2: weights exp(s - max) <= 1 as 2^-20 fixed point go into u32 histograms over value
///      codes with shared-memory integer atomics (float atomics would be compare-and-swap loops);
///   4. the split's (max, weight sum, full-precision part) and its histograms go to global
///      memory; a last kernel merges the splits (flash-decoding), summing their histograms
///      weighted by exp(max_s - max), and multiplies the result by the value centroids once per
///      (sequence, head) (a product per split block read the whole value codebook each time).
/// `stages` switches steps off for timing experiments (the results are then meaningless); the
/// differences locate the time (bench/cuda/NOTES.md).
///
/// Both kernels are tested against the CPU cache over the same shape grid (tests/cuda).

#include "cq/codebook.hpp"
#include "cq/cuda/attention_byte_codes.cuh"
#include "cq/cuda/attention_types.cuh"
#include "cq/cuda/error.cuh"
#include "cq/cuda/memory.cuh"
#include "cq/cuda/warp.cuh"
#include "cq/detail/bit_packing.hpp"

#include <cuda_runtime.h>

#include <algorithm>
#include <cfloat>
#include <cstdint>
#include <vector>

namespace cq::cuda::detail {

constexpr int attn_threads = 256;
constexpr int attn_warps = attn_threads / 32;
/// How far below a full-precision token the general kernel's reference may stay (see pass 1).
constexpr float dense_reach = 60.0f;
/// Fixed-point scale of the histograms: a split of n tokens sums at most n weights <= 1, so the
/// scale is the largest power of two with n x scale < 2^32 (2^19 for 4096 tokens).
inline float hist_unit_for(int split_tokens) {
  int log2n = 0;
  while ((1 << log2n) < split_tokens) ++log2n;
  return float(1ull << (31 - log2n));
}

/// Shared-memory layout of a block (in 4-byte words). Tables (score tables, u32 histograms) are
/// in shared memory when they fit, else in a slice of global scratch.
struct AttnLayout {
  int hg, gk, kk, gv, kv, D, dense_cap, split_tokens, stage_words;
  float unit;  // histogram fixed-point scale (hist_unit_for(split_tokens))
  bool tables_in_shared;
  CQ_HOST_DEVICE int lut_size() const { return gk * kk; }
  CQ_HOST_DEVICE int hist_size() const { return gv * kv; }
  CQ_HOST_DEVICE int tables_per_block() const { return hg * (lut_size() + hist_size()); }
  CQ_HOST_DEVICE int score_stride() const { return split_tokens + dense_cap; }
  CQ_HOST_DEVICE int shared_words() const {
    return (tables_in_shared ? tables_per_block() : 0) + hg * score_stride() + attn_warps * stage_words +
           hg * (attn_warps + 3);
  }
};


/// Score tables of every (sequence, query head): lut[b][hq][g][j] = scale * q_g . centroid_K[g][j].
__global__ void lut_kernel(AttentionBatch p, int gk, int kk, float* __restrict__ lut) {
  const int bh = blockIdx.y, hq = bh % p.q_heads;
  const int kvh = hq / (p.q_heads / p.kv_heads), D = p.head_dim;
  const CodebookView kcb = p.key_codebooks[kvh];
  const int C = int(kcb.channels);
  const float scale = p.scale != 0.0f ? p.scale : rsqrtf(float(D));
  const float* q = p.q + std::size_t(bh) * D;
  for (int e = blockIdx.x * blockDim.x + threadIdx.x; e < gk * kk; e += gridDim.x * blockDim.x) {
    const int g = e / kk, j = e % kk;
    const float* tcol = kcb.transposed + std::size_t(g) * C * kcb.padded_centroids + j;
    float s = 0.0f;
    for (int c = 0; c < C; ++c) s = fmaf(q[g * C + c], tcol[std::size_t(c) * kcb.padded_centroids], s);
    lut[std::size_t(bh) * gk * kk + e] = scale * s;
  }
}

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
__global__ void __launch_bounds__(attn_threads) attention_kernel(AttentionBatch p, AttnLayout L, int head_groups,
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
  const CodebookView vcb = p.value_codebooks[kvh];
  const int kbits = p.key_codebooks[kvh].bits, vbits = vcb.bits;
  const int Kk = L.kk, Kv = L.kv;
  const int c0 = split * L.split_tokens;
  const int c1 = min(int(seq.coded), c0 + L.split_tokens);
  const int n = max(0, c1 - c0), nblocks = (n + 31) / 32;
  const int ndense = split == 0 ? int(seq.dense) : 0;
  const float scale = p.scale != 0.0f ? p.scale : rsqrtf(float(D));

  float* tables;
  if constexpr (TablesShared)
    tables = sm;
  else
    tables = tables_global + (std::size_t(blockIdx.z) * gridDim.y * gridDim.x + std::size_t(blockIdx.y) * gridDim.x +
                              blockIdx.x) * std::size_t(L.tables_per_block());
  float* lut = tables;                                                    // [HG][gk][kk]
  unsigned* hist = reinterpret_cast<unsigned*>(lut + HG * L.lut_size());  // [HG][gv][kv], fixed point
  float* score = sm + (TablesShared ? L.tables_per_block() : 0);          // [HG][split + dense]
  std::uint32_t* stage = reinterpret_cast<std::uint32_t*>(score + HG * L.score_stride()) + warp * L.stage_words;
  float* red = reinterpret_cast<float*>(reinterpret_cast<std::uint32_t*>(score + HG * L.score_stride()) +
                                        attn_warps * L.stage_words);  // [HG][warps]
  float* ref = red + HG * attn_warps;                                   // [HG]

  // Tables: copy this block's score tables (computed once per head by lut_kernel), zero histograms.
  if (n > 0 && (stages & stage_lut)) {
    const float4* src = reinterpret_cast<const float4*>(luts + (std::size_t(b) * p.q_heads + h0) * L.lut_size());
    float4* dst = reinterpret_cast<float4*>(lut);
    for (int i = tid; i < HG * L.lut_size() / 4; i += attn_threads) dst[i] = src[i];
  }
  for (int i = tid; i < HG * L.hist_size(); i += attn_threads) hist[i] = 0u;
  __syncthreads();

  // Pass 1: scores of the split's coded tokens. A warp stages each 32-token block of key codes
  // with coalesced 4-byte loads (the next block's words are loaded while this one is scored),
  // then lane = token reads its codes from shared memory and sums table entries.
  const int kwords = L.gk * kbits, vwords = L.gv * vbits;  // 4-byte words per 32-token block
  const std::uint32_t* kbase = reinterpret_cast<const std::uint32_t*>(codes.key_codes) + std::size_t(c0 / 32) * kwords;
  const std::uint32_t* vbase = reinterpret_cast<const std::uint32_t*>(codes.value_codes) + std::size_t(c0 / 32) * vwords;
  float lmax[HG];
#pragma unroll
  for (int h = 0; h < HG; ++h) lmax[h] = -FLT_MAX;
  if (stages & stage_scan) {
    CodePipe pipe(kwords, lane);
    if (warp < nblocks) pipe.load(kbase + std::size_t(warp) * kwords);
    for (int blk = warp; blk < nblocks; blk += attn_warps) {
      pipe.stage(kbase + std::size_t(blk) * kwords, stage);
      if (blk + attn_warps < nblocks) pipe.load(kbase + std::size_t(blk + attn_warps) * kwords);
      const std::uint8_t* st = reinterpret_cast<const std::uint8_t*>(stage);
      float s[HG];
#pragma unroll
      for (int h = 0; h < HG; ++h) s[h] = 0.0f;
      if (kbits == 8) {
#pragma unroll 4
        for (int g = 0; g < L.gk; ++g) {
          const unsigned code = st[g * 32 + lane];
#pragma unroll
          for (int h = 0; h < HG; ++h) s[h] += lut[(h * L.gk + g) * Kk + code];
        }
      } else {
        for (int g = 0; g < L.gk; ++g) {
          const unsigned code = cq::detail::read_code(st + g * 4 * kbits, unsigned(lane), kbits);
#pragma unroll
          for (int h = 0; h < HG; ++h) s[h] += lut[(h * L.gk + g) * Kk + code];
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
  } else {
    for (int i = tid; i < nblocks * 32; i += attn_threads)
#pragma unroll
      for (int h = 0; h < HG; ++h) score[h * L.score_stride() + i] = i < n ? 0.0f : -FLT_MAX;
    if (n > 0)
#pragma unroll
      for (int h = 0; h < HG; ++h) lmax[h] = 0.0f;
  }
  // Full-precision tokens (split 0): a warp per token, lanes over head_dim.
  for (int j = warp; j < ndense; j += attn_warps) {
    const float* k = seq.dense_keys + (std::size_t(kvh) * seq.dense + j) * D;
#pragma unroll
    for (int h = 0; h < HG; ++h) {
      float s = 0.0f;
      if (stages & stage_dense) {
        const float* q = p.q + (std::size_t(b) * p.q_heads + h0 + h) * D;
        for (int d = lane; d < D; d += 32) s = fmaf(q[d], k[d], s);
        s = scale * warp_sum(s);
      }
      if (lane == 0) score[h * L.score_stride() + L.split_tokens + j] = s;
      // A full-precision token raises the reference only to within dense_reach of itself: the
      // coded tokens' fixed-point weights stay relative to their own maximum (a dominant sink
      // would round them all to zero), and the dense weights, in float, stay below e^dense_reach.
      lmax[h] = fmaxf(lmax[h], s - dense_reach);
    }
  }
  // Block maximum per head: the reference the weights are taken against (coded weights <= 1).
#pragma unroll
  for (int h = 0; h < HG; ++h) {
    const float m = warp_max(lmax[h]);
    if (lane == 0) red[h * attn_warps + warp] = m;
  }
  __syncthreads();
  if (tid < HG) {
    float m = -FLT_MAX;
    for (int w = 0; w < attn_warps; ++w) m = fmaxf(m, red[tid * attn_warps + w]);
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
  if ((stages & stage_hist) && warp < nblocks) vpipe.load(vbase + std::size_t(warp) * vwords);
  for (int blk = warp; blk < nblocks; blk += attn_warps) {
    if (stages & stage_hist) {
      vpipe.stage(vbase + std::size_t(blk) * vwords, stage);
      if (blk + attn_warps < nblocks) vpipe.load(vbase + std::size_t(blk + attn_warps) * vwords);
    }
    const std::uint8_t* st = reinterpret_cast<const std::uint8_t*>(stage);
    unsigned w[HG];
    bool any = false;
#pragma unroll
    for (int h = 0; h < HG; ++h) {
      const float e = __expf(score[h * L.score_stride() + blk * 32 + lane] - r[h]);
      w[h] = blk * 32 + lane < n ? __float2uint_rn(e * L.unit) : 0u;
      wsum[h] += float(w[h]);
      any = any || w[h] != 0u;
    }
    if ((stages & stage_hist) && any) {
      for (int g = 0; g < L.gv; ++g) {
        const unsigned code = vbits == 8 ? st[g * 32 + lane] : cq::detail::read_code(st + g * 4 * vbits, unsigned(lane), vbits);
#pragma unroll
        for (int h = 0; h < HG; ++h)
          if (w[h]) atomicAdd(&hist[(h * L.gv + g) * Kv + code], w[h]);
      }
    }
    __syncwarp();
  }
#pragma unroll
  for (int h = 0; h < HG; ++h) {
    const float v = warp_sum(wsum[h]);
    if (lane == 0) red[h * attn_warps + warp] = v;
  }
  __syncthreads();

  // Partial results, relative to the block's reference maximum: (max, weight sum, the
  // full-precision tokens' weighted values) and the value histograms; merge_kernel combines the
  // splits and multiplies the histograms by the value centroids once per (sequence, head).
  const std::size_t slot0 = (std::size_t(b) * p.q_heads + h0) * gridDim.x + split;  // head h: slot0 + h * splits
  for (int i = tid; i < HG * L.hist_size(); i += attn_threads) {
    const int h = i / L.hist_size(), k = i % L.hist_size();
    partial_hist[(slot0 + std::size_t(h) * gridDim.x) * L.hist_size() + k] = n > 0 ? hist[i] : 0u;
  }
  for (int e = tid; e < HG * D; e += attn_threads) {
    const int h = e / D, d = e % D;
    float total = 0.0f;
    for (int w2 = 0; w2 < attn_warps; ++w2) total += red[h * attn_warps + w2];
    total *= 1.0f / L.unit;
    float o = 0.0f;
    const float* sd = score + h * L.score_stride() + L.split_tokens;
    for (int j = 0; j < ndense; ++j) {
      const float wj = __expf(sd[j] - ref[h]);
      total += wj;
      o = fmaf(wj, seq.dense_values[(std::size_t(kvh) * seq.dense + j) * D + d], o);
    }
    float* dst = partial + (slot0 + std::size_t(h) * gridDim.x) * (2 + D);
    if (d == 0) {
      dst[0] = total > 0.0f ? ref[h] : -FLT_MAX;
      dst[1] = total;
    }
    dst[2 + d] = o;
  }
}

/// Per (sequence, query head): weights of the splits relative to the largest maximum, the
/// weighted sum of their histograms (shared memory), then out = (sum of full-precision parts +
/// histogram x value centroids) / total weight.
template <bool HistShared>
__global__ void merge_kernel(AttentionBatch p, int splits, int gv, int kv, float unit, const float* __restrict__ partial,
                             const unsigned* __restrict__ partial_hist, float* __restrict__ hist_global) {
  extern __shared__ float sm[];
  const int bh = blockIdx.x, D = p.head_dim, hq = bh % p.q_heads;
  float* hist;  // [gv][kv]: shared memory, or this head's slice of global scratch when too large
  if constexpr (HistShared)
    hist = sm;
  else
    hist = hist_global + std::size_t(bh) * gv * kv;
  const CodebookView vcb = p.value_codebooks[hq / (p.q_heads / p.kv_heads)];
  const int Cv = int(vcb.channels);
  const float* src = partial + std::size_t(bh) * splits * (2 + D);
  const float m = largest_split_reference(src, splits, D);
  const int hsize = gv * kv;
  for (int i = threadIdx.x; i < hsize; i += blockDim.x) {
    float h = 0.0f;
    for (int s = 0; s < splits; ++s) {
      const float* ps = src + s * (2 + D);
      if (ps[1] <= 0.0f) continue;
      h = fmaf(__expf(ps[0] - m), float(partial_hist[(std::size_t(bh) * splits + s) * hsize + i]), h);
    }
    hist[i] = h * (1.0f / unit);
  }
  __syncthreads();
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float num = 0.0f, den = 0.0f;
    merge_splits(src, splits, D, d, m, num, den);
    const int g = d / Cv, c = d % Cv;
    const float* hrow = hist + g * kv;
    const float* tcol = vcb.transposed + (std::size_t(g) * Cv + c) * vcb.padded_centroids;
    for (int j = 0; j < kv; ++j) num = fmaf(hrow[j], tcol[j], num);
    p.out[std::size_t(bh) * D + d] = den > 0.0f ? num / den : 0.0f;
  }
}

}  // namespace cq::cuda::detail

namespace cq::cuda {

/// Plans and runs fused attention for one batch. Holds the scratch for partial results; reuse one
/// object across calls (it grows as needed). Not thread-safe; one per stream.
class FusedAttention {
 public:
  /// Shape of the batch's codebooks and sequences, needed to plan shared memory.
  struct Shape {
    int q_heads, kv_heads, head_dim;
    int key_channels, key_bits, value_channels, value_bits;
    int max_coded;  // longest coded length in the batch
    int max_dense;  // most full-precision tokens of any sequence
  };

  /// Which kernel runs: the byte-code kernel (8-bit codes, lane-private tables; see
  /// attention_byte_codes.cuh) where it applies, else the general one; or one of them forced
  /// (forcing the byte-code kernel on a shape it does not serve throws).
  enum class Kernel { automatic, general, byte_codes };

  /// Runs attention for `batch` on `stream`. Code pointers must be 4-byte aligned (16-byte
  /// aligned ones, as cudaMalloc returns, take the byte-code kernel's wide loads).
  void run(const AttentionBatch& batch, const Shape& s, cudaStream_t stream = nullptr, unsigned stages = stage_all) {
    CQ_CHECK(s.q_heads > 0 && s.kv_heads > 0 && s.q_heads % s.kv_heads == 0, "cuda attention: q_heads ", s.q_heads,
             " is not a positive multiple of kv_heads ", s.kv_heads);
    CQ_CHECK(s.head_dim % s.key_channels == 0 && s.head_dim % s.value_channels == 0, "cuda attention: head_dim ",
             s.head_dim, " is not a multiple of C");
    CQ_CHECK(s.key_bits >= 1 && s.key_bits <= 16 && s.value_bits >= 1 && s.value_bits <= 16,
             "cuda attention: bits must be in 1..16");
    if (!props_ready_) {
      int device = 0;
      CQ_CUDA_CHECK(cudaGetDevice(&device));
      CQ_CUDA_CHECK(cudaDeviceGetAttribute(&smem_max_, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
      CQ_CUDA_CHECK(cudaDeviceGetAttribute(&sms_, cudaDevAttrMultiProcessorCount, device));
      CQ_CUDA_CHECK(cudaDeviceGetAttribute(&reserved_smem_, cudaDevAttrReservedSharedMemoryPerBlock, device));
      props_ready_ = true;
    }
    const bool bytes_ok = byte_codes_apply(s);
    CQ_CHECK(kernel_ != Kernel::byte_codes || bytes_ok, "cuda attention: the byte-code kernel needs 8-bit key and value ",
             "codes with 16, 32 or 64 groups, head_dim <= 256, the shared memory and 1 KiB of reserved shared ",
             "memory per block; got ", s.key_bits, "/", s.value_bits, " bits, ", s.head_dim / s.key_channels, "/",
             s.head_dim / s.value_channels, " groups, ", reserved_smem_, " reserved bytes");
    if (kernel_ != Kernel::general && bytes_ok)
      run_byte_codes(batch, s, stream, stages);
    else
      run_general(batch, s, stream, stages);
  }

  /// Forces a kernel (benchmarks, tests); Kernel::automatic by default.
  void set_kernel(Kernel k) { kernel_ = k; }
  Kernel last_kernel() const { return last_kernel_; }

 private:
  void run_general(const AttentionBatch& batch, const Shape& s, cudaStream_t stream, unsigned stages) {
    const int group = s.q_heads / s.kv_heads;
    detail::AttnLayout L{};
    L.D = s.head_dim;
    L.gk = s.head_dim / s.key_channels;
    L.kk = 1 << s.key_bits;
    L.gv = s.head_dim / s.value_channels;
    L.kv = 1 << s.value_bits;
    L.dense_cap = s.max_dense;
    L.stage_words = std::max(L.gk * s.key_bits, L.gv * s.value_bits);
    // Longest split: scales with the histogram size (16 value groups: 4096 tokens, 32: 8192, 64:
    // 16384; measured best on the H200, bench/cuda/NOTES.md), unless set explicitly.
    L.split_tokens = max_split_tokens_ ? max_split_tokens_ : std::clamp(4096 * std::max(1, L.gv / 16), 512, 16384);
    L.tables_in_shared = true;
    // Heads per block: a power of two up to 8 (the kernel is instantiated for 1, 2, 4, 8), halved
    // until two blocks fit a multiprocessor's shared memory; tables go to global memory if even
    // one head's do not fit.
    L.hg = 1;
    while (L.hg * 2 <= std::min(group, 8)) L.hg *= 2;
    auto bytes = [&] { return std::size_t(L.shared_words()) * 4; };
    while (L.hg > 1 && bytes() * 2 > std::size_t(smem_max_)) L.hg /= 2;
    while (bytes() > std::size_t(smem_max_) && L.split_tokens > 512) L.split_tokens /= 2;
    if (bytes() > std::size_t(smem_max_)) L.tables_in_shared = false;
    CQ_CHECK(bytes() <= std::size_t(smem_max_), "cuda attention: ", bytes(), " bytes of shared memory per block needed, ",
             smem_max_, " available");
    const int head_groups = (group + L.hg - 1) / L.hg;
    // Splits: whole 32-token blocks, at most split_tokens, and enough blocks for about two waves.
    const int blocks_per_sm = std::max(1, std::min(8, int(std::size_t(smem_max_) / bytes())));
    const long long items = (long long)batch.batch * s.kv_heads * head_groups;
    int splits = std::max(1, (s.max_coded + L.split_tokens - 1) / L.split_tokens);
    const long long want = 2LL * sms_ * blocks_per_sm;
    splits = std::max<long long>(splits, std::min<long long>((want + items - 1) / items, (s.max_coded + 1023) / 1024));
    L.split_tokens = std::max(32, ((s.max_coded + splits - 1) / splits + 31) / 32 * 32);
    splits = std::max(1, (s.max_coded + L.split_tokens - 1) / L.split_tokens);
    L.unit = detail::hist_unit_for(L.split_tokens);
    const std::size_t need = std::size_t(batch.batch) * s.q_heads * splits * (2 + s.head_dim);
    if (partial_.size() < need) partial_ = DeviceBuffer<float>(need);
    const std::size_t hist_need = std::size_t(batch.batch) * s.q_heads * splits * L.hist_size();
    if (partial_hist_.size() < hist_need) partial_hist_ = DeviceBuffer<unsigned>(hist_need);
    const std::size_t lut_need = std::size_t(batch.batch) * s.q_heads * L.gk * L.kk;
    if (luts_.size() < lut_need) luts_ = DeviceBuffer<float>(lut_need);
    const dim3 grid(unsigned(splits), unsigned(s.kv_heads * head_groups), unsigned(batch.batch));
    if (!L.tables_in_shared) {
      const std::size_t t = std::size_t(grid.x) * grid.y * grid.z * L.tables_per_block();
      if (tables_.size() < t) tables_ = DeviceBuffer<float>(t);
    }
    if (s.max_coded > 0) {
      const unsigned lut_blocks = unsigned(std::min(64, (L.gk * L.kk + 255) / 256));
      detail::lut_kernel<<<dim3(lut_blocks, unsigned(batch.batch * s.q_heads)), 256, 0, stream>>>(batch, L.gk, L.kk, luts_.data());
      CQ_CUDA_CHECK_LAUNCH(lut_kernel);
    }
    auto launch = [&](auto kernel) {
      const int key = (L.hg << 1) | (L.tables_in_shared ? 1 : 0);
      if (configured_[key] < bytes()) {
        CQ_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared));
        CQ_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes())));
        configured_[key] = bytes();
      }
      kernel<<<grid, detail::attn_threads, bytes(), stream>>>(batch, L, head_groups, luts_.data(), partial_.data(),
                                                              partial_hist_.data(), tables_.data(), stages);
      CQ_CUDA_CHECK_LAUNCH(attention_kernel);
    };
    switch ((L.hg << 1) | (L.tables_in_shared ? 1 : 0)) {
      case 3: launch(detail::attention_kernel<1, true>); break;
      case 2: launch(detail::attention_kernel<1, false>); break;
      case 5: launch(detail::attention_kernel<2, true>); break;
      case 4: launch(detail::attention_kernel<2, false>); break;
      case 9: launch(detail::attention_kernel<4, true>); break;
      case 8: launch(detail::attention_kernel<4, false>); break;
      case 17: launch(detail::attention_kernel<8, true>); break;
      default: launch(detail::attention_kernel<8, false>); break;
    }
    const std::size_t merge_smem = std::size_t(L.hist_size()) * sizeof(float);
    if (merge_smem <= std::size_t(smem_max_)) {
      if (merge_smem > merge_configured_) {
        CQ_CUDA_CHECK(cudaFuncSetAttribute(detail::merge_kernel<true>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           int(merge_smem)));
        merge_configured_ = merge_smem;
      }
      detail::merge_kernel<true><<<unsigned(batch.batch * s.q_heads), 256, merge_smem, stream>>>(
          batch, splits, L.gv, L.kv, L.unit, partial_.data(), partial_hist_.data(), nullptr);
    } else {
      const std::size_t scratch = std::size_t(batch.batch) * s.q_heads * L.hist_size();
      if (merge_hist_.size() < scratch) merge_hist_ = DeviceBuffer<float>(scratch);
      detail::merge_kernel<false><<<unsigned(batch.batch * s.q_heads), 256, 0, stream>>>(
          batch, splits, L.gv, L.kv, L.unit, partial_.data(), partial_hist_.data(), merge_hist_.data());
    }
    CQ_CUDA_CHECK_LAUNCH(merge_kernel);
    last_splits_ = splits;
    last_hg_ = L.hg;
    last_smem_ = bytes();
    last_kernel_ = Kernel::general;
  }

  /// Shared memory of the byte-code kernel: the planes, then the small buffers.
  template <int GK, int GV>
  detail::ByteLayout byte_layout(const Shape& s, std::size_t* bytes) const {
    detail::ByteLayout L{};
    L.D = s.head_dim;
    L.dense_cap = s.max_dense;
    L.small_at = detail::ByteConfig<GK, GV>::planes * detail::plane_bytes;
    *bytes = std::size_t(L.small_at) + std::size_t(detail::byte_small_words<GK, GV>(s.max_dense, s.head_dim)) * 4;
    return L;
  }
  template <int GK, int GV>
  std::size_t byte_shared_bytes(const Shape& s) const {
    std::size_t bytes = 0;
    byte_layout<GK, GV>(s, &bytes);
    return bytes;
  }
  /// Calls f.template operator()<GK, GV>() for the shape's group counts; false if not 16/32/64.
  template <class F>
  static bool with_byte_groups(const Shape& s, F&& f) {
    const int gk = s.head_dim / s.key_channels, gv = s.head_dim / s.value_channels;
    auto inner = [&]<int GK>() {
      switch (gv) {
        case 16: f.template operator()<GK, 16>(); return true;
        case 32: f.template operator()<GK, 32>(); return true;
        case 64: f.template operator()<GK, 64>(); return true;
        default: return false;
      }
    };
    switch (gk) {
      case 16: return inner.template operator()<16>();
      case 32: return inner.template operator()<32>();
      case 64: return inner.template operator()<64>();
      default: return false;
    }
  }
  bool byte_codes_apply(const Shape& s) const {
    if (s.head_dim > 256) return false;
    if (s.key_bits != 8 || s.value_bits != 8) return false;
    // Its table addresses carry the start of dynamic shared memory as an immediate.
    if (reserved_smem_ != detail::byte_shared_base) return false;
    std::size_t need = 0;
    const bool groups_ok = with_byte_groups(s, [&]<int GK, int GV>() { need = byte_shared_bytes<GK, GV>(s); });
    return groups_ok && need <= std::size_t(smem_max_);
  }

  void run_byte_codes(const AttentionBatch& batch, const Shape& s, cudaStream_t stream, unsigned stages) {
    with_byte_groups(s, [&]<int GK, int GV>() {
      // 2-channel value groups at D = 128: value rows summed in registers (no histograms).
      if constexpr (GV == 64)
        if (s.value_channels == 2) return launch_byte_codes<GK, GV, true>(batch, s, stream, stages);
      launch_byte_codes<GK, GV, false>(batch, s, stream, stages);
    });
  }

  template <int GK, int GV, bool Rows>
  void launch_byte_codes(const AttentionBatch& batch, const Shape& s, cudaStream_t stream, unsigned stages) {
    auto* kernel = detail::byte_attention_kernel<GK, GV, Rows>;
    std::size_t smem = 0;
    detail::ByteLayout L = byte_layout<GK, GV>(s, &smem);
    const int key = (GK / 16) * 8 + GV / 16 + (Rows ? 64 : 0);
    constexpr int threads = detail::ByteConfig<GK, GV>::threads;
    // Attributes and occupancy are asked once per (kernel, shared size): host time per decode
    // step counts when the GPU would otherwise wait for the launch.
    if (byte_configured_[key] != smem) {
      CQ_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared));
      CQ_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
      int blocks = 0;
      CQ_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, smem));
      CQ_CHECK(blocks > 0, "cuda attention: the byte-code kernel does not fit a multiprocessor (", smem, " bytes)");
      byte_configured_[key] = smem;
      byte_per_sm_[key] = blocks;
    }
    const int per_sm = byte_per_sm_[key];
    const int group = s.q_heads / s.kv_heads;
    CQ_CHECK(std::size_t(batch.batch) * s.kv_heads <= 65535, "cuda attention: batch x kv_heads ",
             std::size_t(batch.batch) * s.kv_heads, " exceeds 65535");
    // Splits: with histograms at most 16384 tokens per entry (fixed point keeps 2^-17 of the
    // running reference; 8192 cost 4c8b a second split, 0.42 -> 0.37 ms; value rows sum floats,
    // no limit), at least 512 tokens each; among those, the count that minimises waves x split
    // length (a wave is every multiprocessor's resident blocks).
    const int subsets = detail::ByteLanes<GV>::subsets;
    const long long blocks32 = std::max(1, (s.max_coded + 31) / 32);
    const long long items = (long long)batch.batch * s.q_heads, resident = (long long)per_sm * sms_;
    constexpr long long entry_tokens = 16384;
    long long lo = Rows ? 1 : (s.max_coded + entry_tokens * subsets - 1) / (entry_tokens * subsets), hi;
    if (max_split_tokens_) {
      lo = std::max(lo, (s.max_coded + max_split_tokens_ - 1LL) / max_split_tokens_);
      hi = lo;
    } else {
      hi = std::max(lo, std::min(lo * 32, blocks32 / 16));
    }
    lo = std::max(1LL, lo);
    hi = std::max(lo, hi);
    // A split also costs its score tables and its histogram x codebook product (L2 reads of the
    // key and value codebooks), counted as half as many 32-token blocks of codes.
    const long long overhead = 256LL * 4 * (GK * s.key_channels + GV * s.value_channels) / (2LL * 32 * (GK + GV));
    long long splits = lo, best = -1;
    for (long long sp = lo; sp <= hi; ++sp) {
      const long long cost = (items * sp + resident - 1) / resident * ((blocks32 + sp - 1) / sp + overhead);
      if (best < 0 || cost < best) best = cost, splits = sp;
    }
    L.split_tokens = int((blocks32 + splits - 1) / splits * 32);
    splits = std::max(1, (s.max_coded + L.split_tokens - 1) / L.split_tokens);
    CQ_CHECK(splits <= 65535, "cuda attention: ", splits, " splits exceed 65535");
    L.unit = Rows ? 1.0f : detail::hist_unit_for(L.split_tokens / subsets);
    const std::size_t need = std::size_t(items) * splits * (2 + s.head_dim);
    if (partial_.size() < need) partial_ = DeviceBuffer<float>(need);
    kernel<<<dim3(unsigned(group), unsigned(splits), unsigned(batch.batch * s.kv_heads)), threads, smem, stream>>>(
        batch, L, partial_.data(), stages);
    CQ_CUDA_CHECK_LAUNCH(byte_attention_kernel);
    if (splits > 1) {  // one split writes the output itself
      detail::combine_kernel<<<unsigned(items), 128, 0, stream>>>(batch, int(splits), partial_.data());
      CQ_CUDA_CHECK_LAUNCH(combine_kernel);
    }
    last_splits_ = int(splits);
    last_hg_ = 1;
    last_smem_ = smem;
    last_kernel_ = Kernel::byte_codes;
  }

 public:

  /// Longest split in tokens (a tuning knob; power of two, 512..16384; 0 restores the default,
  /// chosen by histogram size for the general kernel and by waves of blocks for the byte-code
  /// kernel). In the general kernel longer splits mean fewer partial histograms to write and
  /// merge, and larger shared score buffers (fewer blocks per SM).
  void set_max_split_tokens(int t) {
    CQ_CHECK(t == 0 || (t >= 512 && t <= 16384 && (t & (t - 1)) == 0), "cuda attention: max split tokens ", t,
             " must be 0 (the default) or a power of two in 512..16384");
    max_split_tokens_ = t;
  }
  int last_splits() const { return last_splits_; }
  int last_head_group() const { return last_hg_; }
  std::size_t last_shared_bytes() const { return last_smem_; }

 private:
  DeviceBuffer<float> partial_, tables_, luts_;
  DeviceBuffer<unsigned> partial_hist_;
  DeviceBuffer<float> merge_hist_;
  int max_split_tokens_ = 0;  // 0: by the histogram size
  std::size_t merge_configured_ = 0;
  bool props_ready_ = false;
  int smem_max_ = 0, sms_ = 0, reserved_smem_ = 0;
  std::size_t configured_[32] = {};
  int last_splits_ = 0, last_hg_ = 0;
  std::size_t last_smem_ = 0;
  Kernel kernel_ = Kernel::automatic, last_kernel_ = Kernel::automatic;
  std::size_t byte_configured_[128] = {};  // dynamic shared size set, per byte-code kernel
  int byte_per_sm_[128] = {};               // its resident blocks per multiprocessor at that size
};

}  // namespace cq::cuda
