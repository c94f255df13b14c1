#pragma once
/// The fast path of cq::cuda::FusedAttention for 8-bit codes (CQ-2c8b, 4c8b, 8c8b at D = 128; any
/// configuration with 16, 32 or 64 key and value groups): lane-private tables, no bank conflicts.
///
/// Why: decode attention over codes makes two random shared-memory accesses per (token, group) --
/// a score-table lookup for the key code and a histogram update for the value code. With one
/// table per group shared by the warp, 32 lanes hitting random entries collide on ~3.5 of the 32
/// banks on average, and those wavefronts, not DRAM, bounded the general kernel (NOTES.md v4).
/// Here each lane owns a fixed set of groups (its "slots") and keeps its own copy of their tables
/// in *its own bank*. Every lookup and every histogram atomic of a warp is then one wavefront. The
/// price is a cross-lane reduction of partial scores (warp shuffles: the lanes of a token each
/// hold some of its groups) and, for 16 groups, two copies of each table (two lanes share a group,
/// each for half the tokens).
///
/// Instruction count is what is left to engineer against, so:
///  - Layout: slot i of every lane lives in plane i (64 KiB): 256 rows, one per code, of 64 words
///    -- the 32 lanes' score-table entries, then the 32 lanes' histogram entries. An entry's
///    offset is plane * 64 KiB | code << 8 | lane * 4 (+ 128 for the histogram): one byte permute
///    (PRMT) of the packed code word builds it. With two planes the planes start at a 64
///    KiB-aligned shared-window address and that is the whole address; with one plane (where a
///    64 KiB-aligned start would cost a second block per multiprocessor) one add of the base
///    follows.
///  - Reduction: a lane's partial scores are kept in a lane-dependent token order (position t
///    holds token t ^ mask(lane)), which turns every halving step of the reduction into one
///    shuffle and one add (no selects): the order comes for free from the byte permute's selector
///    and a few word swaps per block.
///
/// Work: the grid is (query heads per KV head, splits, sequences x KV heads); ByteConfig sets the
/// block size (256 threads and two blocks per multiprocessor for one plane of tables, 512 and
/// one for two). Warps take rounds of R 32-token blocks; a round scores its key codes
/// (lookups, then the shuffle reduction leaves one token's score per lane), takes the block-wide
/// maximum, raises the running reference when it grew (rescaling the fixed-point histograms:
/// rare after the first rounds), turns scores into weights exp(s - ref) <= 1 as u32 fixed point,
/// and adds them into the value histograms with shared-memory integer atomics (float atomics are
/// compare-and-swap loops). Codes are loaded as 16-byte chunks into registers, the next round's
/// while this one computes, and L2 is asked (bulk prefetch) for the rounds after that. At the end
/// each block multiplies its histograms by the value centroids and writes (reference, weight sum,
/// partial output); combine_kernel merges the splits (flash-decoding).

#include "cq/cuda/attention_types.cuh"
#include "cq/cuda/warp.cuh"

#include <cuda_runtime.h>

#include <cfloat>
#include <cstdint>

namespace cq::cuda::detail {

/// How a warp's 32 lanes share a 32-token block of G groups of 8-bit codes (G = 16, 32 or 64).
/// The block is G x 32 bytes, group-major: group g's codes for tokens 16h .. 16h + 15 are the
/// 16-byte chunk 2g + h. Lane l has subset l % subsets of the tokens and the groups
/// l / subsets + (32 / subsets) i for i < slots; its chunk loads are contiguous across the warp.
template <int G>
struct ByteLanes {
  static_assert(G == 16 || G == 32 || G == 64, "8-bit fast path: 16, 32 or 64 groups");
  static constexpr int subsets = G == 16 ? 2 : 1;  // lanes per group (token halves)
  static constexpr int tokens = 32 / subsets;      // tokens per lane and block
  static constexpr int slots = G * subsets / 32;   // groups per lane
  static constexpr int chunks = G / 16;            // 16-byte loads per lane and block

  /// Which 16-byte chunk of the block is the lane's q-th load, natural token order (values).
  __device__ static int chunk(int lane, int q) { return subsets == 2 ? lane : 2 * lane + 64 * (q / 2) + q % 2; }
  /// The same for keys, whose lanes with mask bit 4 set (one subset of 32 tokens) take their two
  /// 16-token chunks swapped: the first step of the permuted token order.
  __device__ static int key_chunk(int lane, int q) {
    return subsets == 2 ? lane : 2 * lane + 64 * (q / 2) + ((q % 2) ^ ((lane >> 4) & 1));
  }
  /// The lane's mask of the permuted token order: position t of its partial scores holds token
  /// t ^ mask, so that the lanes a halving step pairs hold each other's half in the same place.
  __device__ static unsigned token_mask(int lane) { return subsets == 2 ? unsigned(lane >> 1) & 15u : unsigned(lane); }
  /// The token of the block whose whole score lane `lane` holds after the reduction.
  __device__ static int scored_token(int lane) { return (lane % subsets) * tokens + int(token_mask(lane)); }
  /// The first token of `lane`'s subset (value lanes, natural order).
  __device__ static int first_token(int lane) { return (lane % subsets) * tokens; }
  /// Slot and lane of group g's table for token subset s.
  __host__ __device__ static int slot_of(int g) { return g / (32 / subsets); }
  __host__ __device__ static int lane_of(int g, int s) { return (g % (32 / subsets)) * subsets + s; }
};

/// Word w (0..3) of a 16-byte chunk.
__device__ inline unsigned chunk_word(const uint4& v, int w) { return w == 0 ? v.x : w == 1 ? v.y : w == 2 ? v.z : v.w; }

/// Swaps the chunk's words by `wm` (word index k -> k ^ wm): the middle step of the permuted
/// token order (token bits 2-3).
__device__ inline uint4 permute_words(uint4 v, unsigned wm) {
  if (wm & 2u) v = make_uint4(v.z, v.w, v.x, v.y);
  if (wm & 1u) v = make_uint4(v.y, v.x, v.w, v.z);
  return v;
}

/// Rounds of 32-token blocks per warp: enough 16-byte loads in flight per lane (up to 8) to cover
/// DRAM latency, without spilling registers.
CQ_HOST_DEVICE constexpr int byte_round_blocks(int key_chunks, int value_chunks) {
  const int r = 8 / (key_chunks + value_chunks);
  return r >= 4 ? 4 : r >= 2 ? 2 : 1;
}

/// Sums N partial scores per lane (in the permuted token order) over the lanes that differ in
/// lane bits 5 - log2(N) .. 4: each halving step keeps positions [0, M) and adds the partner's
/// positions [M, 2M), which hold the same tokens. Each lane ends with one token's total, token
/// scored_token(lane). N = 16 or 32: 15 or 31 shuffle-and-add pairs per 32 tokens.
template <int M, int Off, int N>
__device__ inline void halve_partial_scores(float (&p)[N]) {
#pragma unroll
  for (int t = 0; t < M; ++t) p[t] += __shfl_xor_sync(0xFFFFFFFFu, p[t + M], Off);
  if constexpr (M > 1) halve_partial_scores<M / 2, Off / 2>(p);
}
template <int N>
__device__ inline float reduce_partial_scores(float (&p)[N]) {
  halve_partial_scores<N / 2, 16>(p);
  return p[0];
}

/// Shared-memory load and atomic add at a 32-bit shared-window address.
__device__ inline float shared_load(unsigned addr) {
  float v;
  asm volatile("ld.shared.f32 %0, [%1];" : "=f"(v) : "r"(addr));
  return v;
}
__device__ inline void shared_add(unsigned addr, unsigned v) {
  asm volatile("red.shared.add.u32 [%0], %1;" ::"r"(addr), "r"(v) : "memory");
}

/// Planes of lane-private tables (64 KiB each) for GK key and GV value groups.
template <int GK, int GV>
CQ_HOST_DEVICE constexpr int byte_planes() {
  return ByteLanes<GK>::slots > ByteLanes<GV>::slots ? ByteLanes<GK>::slots : ByteLanes<GV>::slots;
}
constexpr int plane_bytes = 65536, plane_words = plane_bytes / 4;
/// Word index, from the first plane, of (plane, code, column); columns 0-31 are the lanes' score
/// table entries, 32-63 their histogram entries.
__host__ __device__ constexpr int table_word(int plane, int code, int column) {
  return plane * plane_words + code * 64 + column;
}
/// The i-th histogram word, i in [0, slots * 256 * 32): (slot, code, lane) in that order.
__host__ __device__ constexpr int hist_word(int i) { return table_word(i / (32 * 256), (i / 32) % 256, 32 + i % 32); }

/// Launch shape for GK key and GV value groups. One plane (16 or 32 groups, 64 KiB of tables):
/// 256 threads, two blocks per multiprocessor, so one block's table fill and final product overlap
/// the other's scan; the planes' base is then added to each table address. Two planes (64
/// groups): one 512-thread block per multiprocessor, and the planes start at a 64 KiB-aligned
/// shared-window address, so the byte permute alone builds each address (see the top).
template <int GK, int GV>
struct ByteConfig {
  static constexpr int planes = byte_planes<GK, GV>();
  static constexpr int threads = planes == 1 ? 256 : 512;
  static constexpr int warps = threads / 32;
  static constexpr bool aligned_planes = planes > 1;
  static constexpr int round = byte_round_blocks(ByteLanes<GK>::chunks, ByteLanes<GV>::chunks);
};

/// Shape and plan of a launch of byte_attention_kernel. Shared memory (bytes from the start of
/// the dynamic allocation): the planes at `tables_at` (chosen by the host so that they start at a
/// 64 KiB-aligned shared-window address), the small buffers at `small_at`.
struct ByteLayout {
  int D, dense_cap, split_tokens;
  int tables_at, small_at;
  float unit;  // fixed-point scale of the histograms: 2^31 / (most tokens one entry can collect)
};

/// Words of byte_attention_kernel<GK, GV>'s small buffers: per-warp weights, reductions, the
/// full-precision tokens' scores and the final product's partial sums.
template <int GK, int GV>
CQ_HOST_DEVICE constexpr int byte_small_words(int dense_cap, int D) {
  using Cfg = ByteConfig<GK, GV>;
  return Cfg::warps * Cfg::round * 32 + 4 * Cfg::warps + dense_cap + Cfg::threads / D * D;
}


/// Loads the lane's chunks of `R` consecutive blocks starting at `blk`; blocks past the end load
/// the last block again (their tokens are masked), so no branch. Code pointers not 16-byte
/// aligned take 4-byte loads.
template <class Lanes, int R, bool Aligned, bool Keys>
__device__ inline void load_code_blocks(uint4 (&dst)[R][Lanes::chunks], const std::uint8_t* base, int blk, int nblocks,
                                        int lane) {
  constexpr int block_bytes = 32 * 16 * Lanes::chunks;  // G x 32 bytes
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const std::uint8_t* b = base + std::size_t(min(blk + r, nblocks - 1)) * block_bytes;
#pragma unroll
    for (int q = 0; q < Lanes::chunks; ++q) {
      const std::uint8_t* src = b + 16 * (Keys ? Lanes::key_chunk(lane, q) : Lanes::chunk(lane, q));
      if constexpr (Aligned) {
        dst[r][q] = __ldg(reinterpret_cast<const uint4*>(src));
      } else {
        const auto* w = reinterpret_cast<const std::uint32_t*>(src);
        dst[r][q] = make_uint4(__ldg(w), __ldg(w + 1), __ldg(w + 2), __ldg(w + 3));
      }
    }
  }
}

/// Asks L2 to fetch `R` consecutive code blocks (G x 32 bytes each) starting at block `blk`, without
/// registers (a bulk prefetch, sm_90): the register loads of later rounds then hit L2, so fewer
/// DRAM round trips are exposed than the registers alone could cover.
template <class Lanes, int R>
__device__ inline void prefetch_code_blocks(const std::uint8_t* base, int blk, int nblocks) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const int count = min(R, nblocks - blk);
  if (count <= 0) return;
  const std::uint8_t* p = base + std::size_t(blk) * (32 * 16 * Lanes::chunks);
  if ((reinterpret_cast<std::uintptr_t>(p) & 15u) != 0) return;
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p), "r"(unsigned(count * 32 * 16 * Lanes::chunks))
               : "memory");
#endif
}

template <int GK, int GV>
__global__ void __launch_bounds__(ByteConfig<GK, GV>::threads, 512 / ByteConfig<GK, GV>::threads)
    byte_attention_kernel(AttentionBatch p, ByteLayout L, const float* __restrict__ luts, float* __restrict__ partial,
                          unsigned stages) {
  using KL = ByteLanes<GK>;
  using VL = ByteLanes<GV>;
  using Cfg = ByteConfig<GK, GV>;
  constexpr int R = Cfg::round, byte_threads = Cfg::threads, byte_warps = Cfg::warps;
  constexpr int round_blocks = byte_warps * R;
  extern __shared__ __align__(16) unsigned char byte_smem[];
  float* tab = reinterpret_cast<float*>(byte_smem + L.tables_at);  // the planes (layout at the top)
  unsigned* wbuf = reinterpret_cast<unsigned*>(byte_smem + L.small_at);  // [warps][R * 32]
  float* red = reinterpret_cast<float*>(wbuf + byte_warps * R * 32);  // [4][warps]
  float* dense_score = red + 4 * byte_warps;                          // [dense_cap]
  float* product = dense_score + L.dense_cap;                         // [threads / D][D]
  const unsigned tables = unsigned(__cvta_generic_to_shared(tab));
  if (Cfg::aligned_planes && tables % plane_bytes != 0) __trap();  // the host's placement assumption broke
  const unsigned tbase = Cfg::aligned_planes ? 0u : tables;

  const int group = p.q_heads / p.kv_heads;
  const int split = blockIdx.y, b = blockIdx.z / p.kv_heads, kvh = blockIdx.z % p.kv_heads;
  const int hq = kvh * group + blockIdx.x, bh = b * p.q_heads + hq;
  const int D = L.D, tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const DeviceSequence seq = p.sequences[b];
  const DeviceKVCodes codes = p.codes[b * p.kv_heads + kvh];
  const int c0 = split * L.split_tokens;
  const int n = max(0, min(int(seq.coded), c0 + L.split_tokens) - c0), nblocks = (n + 31) / 32;
  const int ndense = split == 0 ? int(seq.dense) : 0;
  const float scale = p.scale != 0.0f ? p.scale : rsqrtf(float(D));
  const float* q = p.q + std::size_t(bh) * D;

  // Tables: this head's score tables (lut_code_major_kernel wrote them code-major: [code][group])
  // into the lanes' columns; histograms zeroed.
  if (n > 0 && (stages & stage_lut)) {
    // All of a thread's loads are issued before its stores: one L2 round trip, not one per entry.
    const float* src = luts + std::size_t(bh) * 256 * GK;
    constexpr int per_thread = KL::slots * 256 * 32 / byte_threads;  // 16 .. 64
    float v[per_thread];
#pragma unroll
    for (int k = 0; k < per_thread; ++k) {
      const int i = tid + k * byte_threads, l = i % 32, j = (i / 32) % 256, slot = i / (32 * 256);
      v[k] = __ldg(src + j * GK + l / KL::subsets + (32 / KL::subsets) * slot);
    }
#pragma unroll
    for (int k = 0; k < per_thread; ++k) {
      const int i = tid + k * byte_threads;
      tab[table_word(i / (32 * 256), (i / 32) % 256, i % 32)] = v[k];
    }
  }
  for (int i = tid; i < VL::slots * 256 * 32; i += byte_threads) tab[hist_word(i)] = 0.0f;

  // Full-precision tokens (sinks and window; split 0): a warp per token, four tokens' loads in
  // flight at once. Their maximum starts the running reference.
  float dmax = -FLT_MAX;
  for (int j0 = warp; j0 < ndense; j0 += 4 * byte_warps) {
    float s[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (stages & stage_dense)
      for (int d = lane; d < D; d += 32) {
        const float qd = q[d];
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const int j = j0 + k * byte_warps;
          if (j < ndense) s[k] = fmaf(qd, __ldg(seq.dense_keys + (std::size_t(kvh) * seq.dense + j) * D + d), s[k]);
        }
      }
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int j = j0 + k * byte_warps;
      const float sk = scale * warp_sum(s[k]);
      if (j < ndense) {
        if (lane == 0) dense_score[j] = sk;
        dmax = fmaxf(dmax, sk);
      }
    }
  }
  if (lane == 0) red[2 * byte_warps + warp] = dmax;
  __syncthreads();
  float ref = -FLT_MAX;
  for (int w = 0; w < byte_warps; ++w) ref = fmaxf(ref, red[2 * byte_warps + w]);

  const std::uint8_t* kbase = codes.key_codes + std::size_t(c0 / 32) * GK * 32;
  const std::uint8_t* vbase = codes.value_codes + std::size_t(c0 / 32) * GV * 32;
  const bool aligned = ((reinterpret_cast<std::uintptr_t>(codes.key_codes) |
                         reinterpret_cast<std::uintptr_t>(codes.value_codes)) & 15u) == 0;
  const bool scan = stages & stage_scan, accumulate = stages & stage_hist;
  // Per-lane constants of the addressing: the byte permute keeps bytes 0, 2, 3 of `base` (plane
  // base | column * 4) and puts the code in byte 1. Key selectors carry the token permutation's
  // low two bits; its bits 2-3 are word swaps.
  const unsigned kmask = KL::token_mask(lane), kwords = (kmask >> 2) & 3u;
  unsigned ksel[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) ksel[k] = 0x7604u | ((unsigned(k) ^ (kmask & 3u)) << 4);
  const unsigned kcol = (Cfg::aligned_planes ? tables : 0u) + unsigned(lane) * 4, vcol = kcol + 128;
  float wsum = 0.0f;  // this lane's fixed-point weights, as float
  unsigned* my_weights = wbuf + warp * R * 32;
  // Rounds ahead of the register loads that L2 is asked to fetch.
  constexpr int prefetch_rounds = 2;
  // The scan, compiled for 16-byte and for 4-byte aligned code pointers (block-uniform choice).
  // Thread 0 asks for a whole round, one bulk request per codes array that the stages read.
  auto prefetch_round = [&](int r) {
    if (tid != 0) return;
    if (scan) prefetch_code_blocks<KL, round_blocks>(kbase, r * round_blocks, nblocks);
    if (accumulate) prefetch_code_blocks<VL, round_blocks>(vbase, r * round_blocks, nblocks);
  };
  auto scan_split = [&]<bool Aligned>() {
    uint4 kq[R][KL::chunks], vq[R][VL::chunks];
    if (n > 0) {
      if (scan) load_code_blocks<KL, R, Aligned, true>(kq, kbase, warp * R, nblocks, lane);
      if (accumulate) load_code_blocks<VL, R, Aligned, false>(vq, vbase, warp * R, nblocks, lane);
      for (int ahead = 1; ahead <= prefetch_rounds; ++ahead) prefetch_round(ahead);
    }
    for (int round = 0; round * round_blocks < nblocks; ++round) {
      const int blk0 = round * round_blocks + warp * R;
      prefetch_round(round + prefetch_rounds + 1);
      // Scores: lookups into the lane's own tables in the permuted token order, then the
      // shuffle reduction.
      float s[R];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        float part[KL::tokens];
#pragma unroll
        for (int i = 0; i < KL::slots; ++i) {
          const unsigned plane = kcol + unsigned(i) * plane_bytes;
#pragma unroll
          for (int c = 0; c < KL::tokens / 16; ++c) {  // 16-token chunks of slot i
            const uint4 v = permute_words(kq[r][KL::subsets == 2 ? 0 : 2 * i + c], kwords);
#pragma unroll
            for (int t = 0; t < 16; ++t) {
              const float e = scan ? shared_load(tbase + __byte_perm(chunk_word(v, t / 4), plane, ksel[t % 4])) : 0.0f;
              part[16 * c + t] = i == 0 ? e : part[16 * c + t] + e;
            }
          }
        }
        const float total = reduce_partial_scores(part);
        const int token = (blk0 + r) * 32 + KL::scored_token(lane);
        s[r] = token < n ? total : -FLT_MAX;
      }
      if (scan) load_code_blocks<KL, R, Aligned, true>(kq, kbase, blk0 + round_blocks, nblocks, lane);
      // Block maximum of the round; raise the reference (and rescale what is accumulated) if needed.
      float m = s[0];
#pragma unroll
      for (int r = 1; r < R; ++r) m = fmaxf(m, s[r]);
      m = warp_max(m);
      float* round_red = red + (round & 1) * byte_warps;
      if (lane == 0) round_red[warp] = m;
      __syncthreads();
      float M = -FLT_MAX;
      for (int w = 0; w < byte_warps; ++w) M = fmaxf(M, round_red[w]);
      if (M > ref) {  // block-uniform
        if (ref > -FLT_MAX) {
          const float f = __expf(ref - M);
          for (int i = tid; i < VL::slots * 256 * 32; i += byte_threads) {
            unsigned& h = reinterpret_cast<unsigned*>(tab)[hist_word(i)];
            h = __float2uint_rn(float(h) * f);
          }
          wsum *= f;
          __syncthreads();
        }
        ref = M;
      }
      // Weights as fixed point, published per warp in token order for the value lanes.
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const unsigned u = s[r] > -FLT_MAX ? __float2uint_rn(__expf(s[r] - ref) * L.unit) : 0u;
        wsum += float(u);
        my_weights[r * 32 + KL::scored_token(lane)] = u;
      }
      __syncwarp();
      if (accumulate) {
#pragma unroll
        for (int r = 0; r < R; ++r) {
          unsigned u[VL::tokens];
          const uint4* w4 = reinterpret_cast<const uint4*>(my_weights + r * 32 + VL::first_token(lane));
#pragma unroll
          for (int t = 0; t < VL::tokens / 4; ++t) {
            const uint4 v = w4[t];
            u[4 * t] = v.x;
            u[4 * t + 1] = v.y;
            u[4 * t + 2] = v.z;
            u[4 * t + 3] = v.w;
          }
          // Unconditional: skipping zero weights costs a divergent branch per token, more than
          // the atomic it saves.
#pragma unroll
          for (int i = 0; i < VL::slots; ++i) {
            const unsigned plane = vcol + unsigned(i) * plane_bytes;
#pragma unroll
            for (int t = 0; t < VL::tokens; ++t) {
              const uint4& v = vq[r][VL::subsets == 2 ? 0 : 2 * i + t / 16];
              shared_add(tbase + __byte_perm(chunk_word(v, (t % 16) / 4), plane, 0x7604u | unsigned(t % 4) << 4), u[t]);
            }
          }
        }
        load_code_blocks<VL, R, Aligned, false>(vq, vbase, blk0 + round_blocks, nblocks, lane);
      }
      __syncwarp();  // my_weights is rewritten next round
    }
  };
  if (aligned)
    scan_split.template operator()<true>();
  else
    scan_split.template operator()<false>();

  // Weight sum, then out = (histograms x value centroids + full-precision part) / unit-scaled.
  wsum = warp_sum(wsum);
  if (lane == 0) red[3 * byte_warps + warp] = wsum;
  __syncthreads();
  float total = 0.0f;
  for (int w = 0; w < byte_warps; ++w) total += red[3 * byte_warps + w];
  total *= 1.0f / L.unit;
  const CodebookView vcb = p.value_codebooks[kvh];
  const int Cv = int(vcb.channels), parts = byte_threads / D;
  for (int e = tid; e < parts * D; e += byte_threads) {
    const int part = e / D, d = e % D, g = d / Cv, c = d % Cv;
    const int slot = VL::slot_of(g);
    const float* cent = vcb.centroids + std::size_t(g) * 256 * Cv + c;
    float acc = 0.0f;
    // Codes part, part + parts, ...: 32 centroid loads issued before their products (one L2
    // round trip per 32 codes, not per code).
    if (n > 0 && (stages & stage_product))
      for (int k0 = 0; k0 < 256 / parts; k0 += 32) {
        float cv[32], hv[32];
#pragma unroll
        for (int k = 0; k < 32; ++k) cv[k] = __ldg(cent + std::size_t(part + parts * (k0 + k)) * Cv);
#pragma unroll
        for (int k = 0; k < 32; ++k) {
          hv[k] = 0.0f;
#pragma unroll
          for (int sub = 0; sub < VL::subsets; ++sub)
            hv[k] += float(reinterpret_cast<const unsigned*>(
                tab)[table_word(slot, part + parts * (k0 + k), 32 + VL::lane_of(g, sub))]);
        }
#pragma unroll
        for (int k = 0; k < 32; ++k) acc = fmaf(hv[k], cv[k], acc);
      }
    acc *= 1.0f / L.unit;
    // The full-precision tokens part, part + parts, ...: loads in batches of 8, ahead of use.
    const float* dv = seq.dense_values + std::size_t(kvh) * seq.dense * D + d;
    for (int j0 = part; j0 < ndense; j0 += 8 * parts) {
      float vv[8];
#pragma unroll
      for (int k = 0; k < 8; ++k) vv[k] = j0 + k * parts < ndense ? __ldg(dv + std::size_t(j0 + k * parts) * D) : 0.0f;
#pragma unroll
      for (int k = 0; k < 8; ++k)
        if (j0 + k * parts < ndense) acc = fmaf(__expf(dense_score[j0 + k * parts] - ref), vv[k], acc);
    }
    product[e] = acc;
  }
  __syncthreads();
  for (int d = tid; d < D; d += byte_threads) {
    float o = 0.0f;
    for (int part = 0; part < parts; ++part) o += product[part * D + d];
    float* dst = partial + (std::size_t(bh) * gridDim.y + split) * (2 + D);
    if (d == 0) {  // the weight sum, with the full-precision tokens' weights
      float t = total;
      for (int j = 0; j < ndense; ++j) t += __expf(dense_score[j] - ref);
      dst[0] = t > 0.0f ? ref : -FLT_MAX;
      dst[1] = t;
    }
    dst[2 + d] = o;
  }
}

/// Flash-decoding merge of a (sequence, query head)'s split partials, laid out [split][2 + D] as
/// (reference max, weight sum, D partial outputs): the largest reference of the splits that have
/// weight, then for output d the numerator and denominator sum_s e^(m_s - m) (o_s[d], l_s).
__device__ inline float largest_split_reference(const float* src, int splits, int D) {
  float m = -FLT_MAX;
  for (int s = 0; s < splits; ++s)
    if (src[s * (2 + D) + 1] > 0.0f) m = fmaxf(m, src[s * (2 + D)]);
  return m;
}
__device__ inline void merge_splits(const float* src, int splits, int D, int d, float m, float& num, float& den) {
  for (int s = 0; s < splits; ++s) {
    const float* ps = src + s * (2 + D);
    if (ps[1] <= 0.0f) continue;
    const float f = __expf(ps[0] - m);
    num = fmaf(f, ps[2 + d], num);
    den = fmaf(f, ps[1], den);
  }
}

/// Merges the splits of every (sequence, query head): out = sum_s e^(m_s - m) o_s / sum_s e^(m_s - m) l_s.
__global__ void combine_kernel(AttentionBatch p, int splits, const float* __restrict__ partial) {
  const int bh = blockIdx.x, D = p.head_dim;
  const float* src = partial + std::size_t(bh) * splits * (2 + D);
  const float m = largest_split_reference(src, splits, D);
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float num = 0.0f, den = 0.0f;
    merge_splits(src, splits, D, d, m, num, den);
    p.out[std::size_t(bh) * D + d] = den > 0.0f ? num / den : 0.0f;
  }
}

}  // namespace cq::cuda::detail
