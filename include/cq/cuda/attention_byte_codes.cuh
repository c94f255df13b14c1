#pragma once
/// The fast path of cq::cuda::FusedAttention for 8-bit codes (CQ-2c8b, 4c8b, 8c8b at D = 128; any
/// configuration with 16, 32 or 64 key and value groups): lane-private tables, no bank conflicts.
///
/// Why: decode attention over codes makes two random shared-memory accesses per (token, group) --
/// a score-table lookup for the key code and a histogram update for the value code. With one
/// table per group shared by the warp, 32 lanes hitting random entries collide on ~3.5 of the 32
/// banks on average, and those wavefronts, not DRAM, bounded the general kernel (NOTES.md v4).
/// Here each lane owns two groups (its "slots") for a subset of the tokens and keeps its own copy
/// of their tables in *its own bank*. Every lookup and every histogram atomic of a warp is then one
/// wavefront. The price is a cross-lane reduction of partial scores (warp shuffles: the G / 2
/// lanes of a token subset each hold two of its groups) and 64 / G copies of each table.
///
/// Shared-memory operations per token (lookups, atomics, shuffles, weight loads) are what is left
/// to engineer against (ncu: the L1/shared pipe is the busiest unit), then instructions:
///  - Layout: slot i of every lane lives in plane i (64 KiB): 256 rows, one per code, of 64 words
///    -- the 32 lanes' score-table entries, then the 32 lanes' histogram entries. An entry's
///    offset from the first plane is plane * 64 KiB | code << 8 | lane * 4 (+ 128 for the
///    histogram): one byte permute (PRMT) of the packed code word builds it. The planes start the
///    dynamic shared memory, whose shared-window address is the driver's reserved bytes (1 KiB on
///    sm_90; the host checks, the kernel traps otherwise): that base and the + 128 ride in the
///    load's immediate offset, so the permute is the only address instruction per access.
///  - Reduction: a lane's partial scores are kept in a lane-dependent token order (position t
///    holds token t ^ mask(lane)), which turns every halving step of the reduction into one
///    shuffle and one add (no selects): the order comes from the byte permute's selector, the
///    order of a lane's loads and a few word swaps per block.
///  - Two groups per lane rather than one: half the shuffles of the reduction and half the
///    weights each value lane reads, for the same lookups (NOTES.md, byte-code kernel v9).
///
/// Work: the grid is (query heads per KV head, splits, sequences x KV heads), one 512-thread block
/// per multiprocessor (two planes, 128 KiB). A block first computes its head's score tables
/// (q . centroid for every group and code, staged code-major, then copied into the lanes'
/// columns) and zeroes the histograms. Warps take rounds of R 32-token blocks; a round scores its
/// key codes (lookups, then the shuffle reduction leaves one token's score per lane), takes the
/// block-wide maximum, raises the running reference -- with headroom -- when a score overtook it
/// (rescaling the fixed-point histograms), turns scores into weights exp(s - ref) <= 1 as u32
/// fixed point, and adds them into the value histograms with shared-memory integer atomics (float
/// atomics are compare-and-swap loops). Codes are loaded into registers, the next round's while
/// this one computes, after an L2 bulk prefetch of that round. At the end each block multiplies
/// its histograms by the value centroids; with one split it writes the output, otherwise
/// (reference, weight sum, partial output) for combine_kernel to merge (flash-decoding).
///
/// Value-rows mode (template flag Rows; 2-channel value groups at D = 128, i.e. CQ-2c8b values):
/// the lanes' histogram columns hold the value centroids instead (a half pair per word, scaled per
/// group by a power of two), and the value lanes sum weight x centroid in registers: runs of four
/// tokens in half precision (HFMA2), then float. A lookup is one wavefront where an atomic was
/// two; there is no fixed point, so no limit on tokens per split (one split instead of four at
/// 32K), no histogram zeroing, rescale pass or product (measured 0.86 -> 0.69 ms). Each warp
/// keeps its own running reference, so rounds need no block barrier (0.69 -> 0.65 ms); the warps'
/// sums meet at the end. The half rounding's mean per channel is added back then
/// (stage_value_rows).
///
/// Histogram mode raises its block-wide reference only when a score overtakes it; a vote finds
/// out, so the maximum's shuffle reductions run only in those rounds.
///
/// The coded tokens' running reference starts at their own maximum; the full-precision tokens
/// (sinks, window) meet them in float at the end, so a dominant sink cannot push the coded
/// weights below the fixed point's resolution.

#include "cq/cuda/attention_types.cuh"
#include "cq/cuda/warp.cuh"

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <cstdint>
#include <type_traits>

namespace cq::cuda::detail {

/// How a warp's 32 lanes share a 32-token block of G groups of 8-bit codes (G = 16, 32 or 64).
/// The block is G x 32 bytes, group-major: group g's 32 codes are bytes 32 g .. 32 g + 31. Lane l
/// takes token subset s = l % subsets (`tokens` tokens) of two groups ("slots"), j and j + G / 2
/// with j = l / subsets. That is as many lookups per lane as one group for all 32 tokens, but a
/// token's groups are spread over G / 2 lanes instead of G: half the shuffle reduction, half the
/// weights each lane must fetch. The tables of the two slots fill two planes.
template <int G>
struct ByteLanes {
  static_assert(G == 16 || G == 32 || G == 64, "8-bit fast path: 16, 32 or 64 groups");
  static constexpr int groups = G;
  static constexpr int slots = 2;                   // groups per lane
  static constexpr int subsets = 64 / G;            // token subsets: 4, 2, 1
  static constexpr int span = G / 2;                // lanes per token subset (= groups per slot)
  static constexpr int tokens = 32 / subsets;       // tokens per lane, block and slot: 8, 16, 32
  static constexpr int words = tokens / 4;          // code words per lane, block and slot: 2, 4, 8
  static constexpr int unit = words < 4 ? words : 4;  // words per vector load (8 or 16 bytes)
  static constexpr int units = words / unit;        // loads per lane, block and slot: 1, 1, 2
  static_assert(tokens == span, "the transposing reduction pairs span lanes with span partial scores");

  __device__ static int subset(int lane) { return lane % subsets; }
  /// The lane's mask of the permuted token order: position t of its partial scores holds token
  /// t ^ mask, so that the lanes a halving step pairs hold each other's half in the same place.
  __device__ static unsigned token_mask(int lane) { return unsigned(lane / subsets); }
  /// The token of the block whose whole score lane `lane` holds after the reduction.
  __device__ static int scored_token(int lane) { return subset(lane) * tokens + int(token_mask(lane)); }
  /// The first token of `lane`'s subset (value lanes, natural order).
  __device__ static int first_token(int lane) { return subset(lane) * tokens; }
  /// Group of (lane, slot); slot and lane of group g's table for token subset s.
  __host__ __device__ static int group_of(int lane, int slot) { return lane / subsets + span * slot; }
  __host__ __device__ static int slot_of(int g) { return g / span; }
  __host__ __device__ static int lane_of(int g, int s) { return (g % span) * subsets + s; }
  /// Byte offset in a block of the lane's load u of slot i. Keys take their loads in the permuted
  /// order (the token mask's bits above those a load's words cover); inside a load the permute is
  /// done on registers (permute_unit) and, for the lowest two bits, by the byte selectors.
  __device__ static int load_offset(int lane, int i, int u, bool keys) {
    const int uu = keys ? u ^ int((token_mask(lane) >> 2) / unit) : u;
    return 32 * group_of(lane, i) + tokens * subset(lane) + 4 * unit * uu;
  }
};

/// Permutes a load's words by `wm` (word k -> k ^ wm): the bits of the token mask, from bit 2 up,
/// that fall inside one load.
template <int Unit>
__device__ inline void permute_unit(unsigned (&w)[Unit], unsigned wm) {
  if constexpr (Unit == 4) {
    if (wm & 2u) {
      const unsigned a = w[0], b = w[1];
      w[0] = w[2], w[1] = w[3], w[2] = a, w[3] = b;
    }
  }
  if constexpr (Unit >= 2) {
    if (wm & 1u) {
#pragma unroll
      for (int k = 0; k < Unit; k += 2) {
        const unsigned a = w[k];
        w[k] = w[k + 1], w[k + 1] = a;
      }
    }
  }
}

/// Rounds of 32-token blocks per warp: 32 registers of codes in flight per lane (keys and values;
/// enough to cover DRAM latency with the L2 prefetch, without spilling).
CQ_HOST_DEVICE constexpr int byte_round_blocks(int key_words, int value_words) {
  const int r = 32 / (2 * key_words + 2 * value_words);
  return r >= 4 ? 4 : r >= 2 ? 2 : 1;
}

/// Sums N partial scores per lane (in the permuted token order) over the lanes that differ in
/// lane bits 5 - log2(N) .. 4: each halving step keeps positions [0, M) and adds the partner's
/// positions [M, 2M), which hold the same tokens. Each lane ends with one token's total, token
/// scored_token(lane). N = 8, 16 or 32: 7, 15 or 31 shuffle-and-add pairs per 32 tokens.
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

/// Where dynamic shared memory starts in the shared window: after the driver's reserved bytes
/// (cudaDevAttrReservedSharedMemoryPerBlock; 1 KiB on sm_90). byte_attention_kernel's planes start
/// there and its table addresses carry this base as an immediate offset (no add per access).
constexpr int byte_shared_base = 1024;

/// Shared-memory load and atomic add at shared-window address `addr + Imm` (Imm folds into the
/// instruction).
template <int Imm>
__device__ inline float shared_load(unsigned addr) {
  float v;
  asm volatile("ld.shared.f32 %0, [%1+%2];" : "=f"(v) : "r"(addr), "n"(Imm));
  return v;
}
template <int Imm>
__device__ inline unsigned shared_load_u32(unsigned addr) {
  unsigned v;
  asm volatile("ld.shared.u32 %0, [%1+%2];" : "=r"(v) : "r"(addr), "n"(Imm));
  return v;
}
template <int Imm>
__device__ inline void shared_add(unsigned addr, unsigned v) {
  asm volatile("red.shared.add.u32 [%0+%2], %1;" ::"r"(addr), "r"(v), "n"(Imm) : "memory");
}

/// A plane of lane-private tables: 64 KiB (layout at the top).
constexpr int plane_bytes = 65536, plane_words = plane_bytes / 4;
/// Word index, from the first plane, of (plane, code, column); columns 0-31 are the lanes' score
/// table entries, 32-63 their histogram entries.
__host__ __device__ constexpr int table_word(int plane, int code, int column) {
  return plane * plane_words + code * 64 + column;
}
/// Calls f(uint4&) on this thread's share of the histogram words (columns 32-63 of every row of
/// the lanes' slots), four at a time: eight threads per row, rows Threads / 8 apart, so every
/// address is this thread's base plus an immediate.
template <class VL, int Threads, class F>
__device__ inline void for_each_hist_quad(float* tab, int tid, F&& f) {
  constexpr int rows = Threads / 8, passes = 256 / rows;
  uint4* h = reinterpret_cast<uint4*>(tab + table_word(0, tid / 8, 32 + 4 * (tid % 8)));
#pragma unroll
  for (int slot = 0; slot < VL::slots; ++slot)
#pragma unroll
    for (int k = 0; k < passes; ++k) f(h[table_word(slot, rows * k, 0) / 4]);
}

/// Row of Cv floats; Vec: 16-byte (Cv % 4 == 0) or 8-byte (Cv == 2) aligned rows, vector loads.
template <int Cv, bool Vec>
__device__ inline void load_row(float (&v)[Cv], const float* __restrict__ src) {
  if constexpr (Vec && Cv % 4 == 0) {
#pragma unroll
    for (int c = 0; c < Cv; c += 4) {
      const float4 x = __ldg(reinterpret_cast<const float4*>(src + c));
      v[c] = x.x, v[c + 1] = x.y, v[c + 2] = x.z, v[c + 3] = x.w;
    }
  } else if constexpr (Vec && Cv == 2) {
    const float2 x = __ldg(reinterpret_cast<const float2*>(src));
    v[0] = x.x, v[1] = x.y;
  } else {
#pragma unroll
    for (int c = 0; c < Cv; ++c) v[c] = __ldg(src + c);
  }
}

/// Calls f.template operator()<C, Vec>() for centroid rows of C floats (1, 2, 4, 8 or 16) at
/// `cent`; Vec when every row starts 16-byte (C = 2: 8-byte) aligned, for vector loads.
template <class F>
__device__ inline void with_centroid_rows(int C, const float* cent, F&& f) {
  auto go = [&]<int Cc>() {
    if constexpr (Cc == 1)
      f.template operator()<1, false>();
    else if ((reinterpret_cast<std::uintptr_t>(cent) & (Cc == 2 ? 7u : 15u)) == 0)
      f.template operator()<Cc, true>();
    else
      f.template operator()<Cc, false>();
  };
  switch (C) {
    case 1: go.template operator()<1>(); break;
    case 2: go.template operator()<2>(); break;
    case 4: go.template operator()<4>(); break;
    case 8: go.template operator()<8>(); break;
    default: go.template operator()<16>(); break;
  }
}

/// This head's score tables, code-major: stage[code * (G + 1) + g] = scale * q_g . centroid(g,
/// code) (the row padded by one word: the stores of consecutive codes hit different banks).
/// Thread t takes code t % 256 of groups t / 256, t / 256 + Threads / 256, ...: whole centroid
/// rows, coalesced, loads issued in batches before their products (one L2 round trip per 64
/// floats); q comes from shared memory (its loads would otherwise be hoisted with the rows').
template <int G, int C, int Threads, bool Vec>
__device__ inline void compute_score_table(float* stage, const float* q, const float* __restrict__ cent,
                                           float scale, int tid) {
  constexpr int step = Threads / 256, per_thread = G / step;
  constexpr int batch = per_thread * C <= 64 ? per_thread : (64 / C > 0 ? 64 / C : 1);  // rows per round trip
  const int code = tid % 256, g0 = tid / 256;
#pragma unroll
  for (int k0 = 0; k0 < per_thread; k0 += batch) {
    float row[batch][C];
#pragma unroll
    for (int k = 0; k < batch; ++k)
      load_row<C, Vec>(row[k], cent + (std::size_t(g0 + step * (k0 + k)) * 256 + code) * C);
#pragma unroll
    for (int k = 0; k < batch; ++k) {
      const int g = g0 + step * (k0 + k);
      float dot = 0.0f;
#pragma unroll
      for (int c = 0; c < C; ++c) dot = fmaf(q[g * C + c], row[k][c], dot);
      stage[code * (G + 1) + g] = scale * dot;
    }
  }
}

/// Copies staged per-(code, group) words (stage[code * (groups + 1) + g]) into the lanes' columns
/// from `column0` on (0: score tables, 32: value rows): thread (row r, lane l) copies rows r,
/// r + Threads / 32, ... of lane l's groups (conflict-free on both sides).
template <class Lanes, int Threads, int Column0>
__device__ inline void fill_columns(float* tab, const float* stage, int tid) {
  constexpr int rows = Threads / 32, passes = 256 / rows, stride = Lanes::groups + 1;
  const int lane = tid % 32, row = tid / 32;
  const unsigned* s = reinterpret_cast<const unsigned*>(stage) + row * stride + lane / Lanes::subsets;
  unsigned* t = reinterpret_cast<unsigned*>(tab) + table_word(0, row, Column0 + lane);
#pragma unroll
  for (int k = 0; k < Lanes::slots * passes; ++k)
    t[table_word(k / passes, rows * (k % passes), 0)] = s[rows * (k % passes) * stride + Lanes::span * (k / passes)];
}

/// Value-rows mode stores a 2-channel centroid in one word, a half pair, scaled per group by a
/// power of two that puts the group's largest magnitude in [0.5, 1): any float codebook fits half
/// range and precision, and the value lanes' short half-precision sums stay below 4 (they are
/// multiplied back by 2^e at the end). Half rounding alone was not precise enough: its error is
/// the same for every token of a code, so in near-uniform attention over many tokens -- whose
/// output is close to the codebook mean -- the mean rounding error of the codes showed (1.6e-3
/// relative error at 70000 tokens). The block adds it back: per (group, channel),
/// mean = (1/256) sum over codes of (centroid - half(centroid)), times the weight sum. What is left
/// is the deviation of each code's error from that mean, weighted by how far the attention is from
/// uniform over the codes (I2F-free 16-bit fixed point was as precise but cost 12% in time).
///
/// One pass over the codebook: warp w takes groups w, w + warps, ..., lane l codes l, l + 32, ...
/// (coalesced 8-byte rows, all loads issued first: one L2 round trip). It writes
/// stage[code * (G + 1) + g] (the scaled half pair; consecutive codes hit consecutive banks),
/// mean[2 g + c] and unscale[g] = 2^e.
template <int G, int Threads, bool Vec>
__device__ inline void stage_value_rows(float* stage, float* mean, float* unscale, const float* __restrict__ cent,
                                        int tid) {
  constexpr int warps = Threads / 32, per_warp = G / warps;
  static_assert(G % warps == 0, "stage_value_rows: groups per warp");
  const int warp = tid / 32, lane = tid % 32;
  float row[per_warp][8][2];
#pragma unroll
  for (int j = 0; j < per_warp; ++j)
#pragma unroll
    for (int k = 0; k < 8; ++k)
      load_row<2, Vec>(row[j][k], cent + (std::size_t(warp + warps * j) * 256 + lane + 32 * k) * 2);
  unsigned* st = reinterpret_cast<unsigned*>(stage);
#pragma unroll
  for (int j = 0; j < per_warp; ++j) {
    const int g = warp + warps * j;
    float amax = 0.0f;
#pragma unroll
    for (int k = 0; k < 8; ++k) amax = fmaxf(amax, fmaxf(fabsf(row[j][k][0]), fabsf(row[j][k][1])));
    amax = warp_max(amax);
    // 2^e > amax >= 2^(e-1); the scale 2^-e and its inverse are exact (e clamped to float range).
    const int e = amax > 0.0f ? min(max(((__float_as_int(amax) >> 23) & 255) - 126, -125), 126) : 0;
    const float down = __int_as_float((127 - e) << 23), up = __int_as_float((127 + e) << 23);
    float e0 = 0.0f, e1 = 0.0f;
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const __half2 h = __floats2half2_rn(row[j][k][0] * down, row[j][k][1] * down);
      st[(lane + 32 * k) * (G + 1) + g] = *reinterpret_cast<const unsigned*>(&h);
      e0 += row[j][k][0] - __low2float(h) * up;
      e1 += row[j][k][1] - __high2float(h) * up;
    }
    e0 = warp_sum(e0);
    e1 = warp_sum(e1);
    if (lane == 0) mean[g * 2] = e0 * (1.0f / 256), mean[g * 2 + 1] = e1 * (1.0f / 256), unscale[g] = up;
  }
}

/// out[g * Cv + c] = inv_unit * sum over codes of histogram(g, code) x centroid(g, code)[c], the
/// value groups' share of the attention output. Threads / G consecutive threads share a group,
/// each taking every (Threads / G)-th code (whole centroid rows: coalesced, vector loads when
/// aligned), then sum over shuffles; loads go out in batches.
template <class VL, int Cv, int Threads, bool Vec>
__device__ inline void hist_product(const float* tab, const float* __restrict__ cent, float inv_unit, float* out,
                                   int tid) {
  constexpr int per_group = Threads / VL::groups, codes = 256 / per_group;
  // Codes per batch of loads: a power of two dividing `codes`, with batch x (Cv + 1) <= 80
  // registers (the scan's registers are free by now): one L2 round trip at 8c8b and 4c8b.
  constexpr int batch = [] {
    int b = 1;
    while (2 * b <= codes && 2 * b * (Cv + 1) <= 80) b *= 2;
    return b;
  }();
  static_assert(per_group >= 1 && 32 % per_group == 0 && codes % batch == 0, "hist_product: shape");
  const int g = tid / per_group, sub = tid % per_group;
  const unsigned* hist = reinterpret_cast<const unsigned*>(tab) + table_word(VL::slot_of(g), sub, 32);
  const float* c0 = cent + (std::size_t(g) * 256 + sub) * Cv;
  float acc[Cv];
#pragma unroll
  for (int c = 0; c < Cv; ++c) acc[c] = 0.0f;
#pragma unroll
  for (int k0 = 0; k0 < codes; k0 += batch) {
    float cv[batch][Cv], hv[batch];
#pragma unroll
    for (int k = 0; k < batch; ++k) load_row<Cv, Vec>(cv[k], c0 + (k0 + k) * per_group * Cv);
#pragma unroll
    for (int k = 0; k < batch; ++k) {
      hv[k] = 0.0f;
#pragma unroll
      for (int s = 0; s < VL::subsets; ++s)
        hv[k] += float(hist[table_word(0, (k0 + k) * per_group, VL::lane_of(g, s))]);
    }
#pragma unroll
    for (int k = 0; k < batch; ++k)
#pragma unroll
      for (int c = 0; c < Cv; ++c) acc[c] = fmaf(hv[k], cv[k][c], acc[c]);
  }
#pragma unroll
  for (int o = per_group / 2; o > 0; o /= 2)
#pragma unroll
    for (int c = 0; c < Cv; ++c) acc[c] += __shfl_xor_sync(0xFFFFFFFFu, acc[c], o);
  if (sub == 0)
#pragma unroll
    for (int c = 0; c < Cv; ++c) out[g * Cv + c] = acc[c] * inv_unit;
}

/// A shared-memory barrier object (mbarrier, sm_80+) for split arrive / wait: `count` arrivals
/// complete a phase; waiting names the phase by its parity.
__device__ inline void mbarrier_init(unsigned long long* bar, unsigned count) {
  asm volatile("mbarrier.init.shared.b64 [%0], %1;" ::"r"(unsigned(__cvta_generic_to_shared(bar))), "r"(count)
               : "memory");
}
__device__ inline void mbarrier_arrive(unsigned long long* bar) {
  asm volatile("{\n .reg .b64 state;\n mbarrier.arrive.shared.b64 state, [%0];\n}" ::"r"(
                   unsigned(__cvta_generic_to_shared(bar)))
               : "memory");
}
/// Waits for the phase of parity `parity`. On sm_90 try_wait suspends the thread until the phase
/// completes or `wait_ns` pass; a long limit keeps waiting warps from spinning on the issue slots
/// (measured: 4c8b 0.434 -> 0.419 ms; the default limit spun ~22 times per wait at 2c8b).
__device__ inline void mbarrier_wait(unsigned long long* bar, unsigned parity) {
  constexpr unsigned wait_ns = 100000;
  unsigned done = 0;
  do {
    asm volatile(
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared.b64 p, [%1], %2, %3;\n selp.u32 %0, 1, 0, p;\n}"
#else
        "{\n .reg .pred p;\n mbarrier.test_wait.parity.shared.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}"
#endif
        : "=r"(done)
        : "r"(unsigned(__cvta_generic_to_shared(bar))), "r"(parity), "r"(wait_ns)
        : "memory");
  } while (!done);
}

/// e^x with the hardware exp2 (flush-to-zero: e^-huge is 0, no range fix-up branches).
__device__ inline float exp_ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x * 1.4426950408889634f));
  return y;
}

/// How far above the round's largest score the running reference is set when it must rise: the
/// largest weight becomes e^-headroom (2 bits of the fixed point), and the histograms are
/// rescaled (a pass over all of them) only when a score overtakes the reference, not each time
/// the maximum creeps up.
constexpr float byte_headroom = 1.3862944f;  // ln 4

/// Launch shape for GK key and GV value groups: two planes of tables (128 KiB), one 512-thread
/// block per multiprocessor. Staged tables (score tables, value rows) take stage_groups + 1 words
/// per code.
template <int GK, int GV>
struct ByteConfig {
  static constexpr int stage_groups = GK > GV ? GK : GV;
  static_assert(ByteLanes<GK>::slots == ByteLanes<GV>::slots, "key and value slots share the planes");
  static constexpr int planes = ByteLanes<GK>::slots;
  static constexpr int threads = 512;
  static constexpr int warps = threads / 32;
  static constexpr int round = byte_round_blocks(ByteLanes<GK>::words, ByteLanes<GV>::words);
};

/// Shape and plan of a launch of byte_attention_kernel. Shared memory: the planes first (at
/// shared-window address byte_shared_base), then the small buffers at byte `small_at` of the
/// dynamic allocation.
struct ByteLayout {
  int D, dense_cap, split_tokens;
  int small_at;
  float unit;  // fixed-point scale of the histograms: 2^31 / (most tokens one entry can collect)
};

/// Words of byte_attention_kernel<GK, GV>'s small buffers: the round barrier, per-warp weights of
/// two rounds, reductions, the
/// full-precision tokens' scores, their values' partial sums, the codes' share of the output and
/// the staged score tables and q.
template <int GK, int GV>
CQ_HOST_DEVICE constexpr int byte_small_words(int dense_cap, int D) {
  using Cfg = ByteConfig<GK, GV>;
  return 4 + Cfg::warps * 2 * Cfg::round * 32 + 4 * Cfg::warps + dense_cap + Cfg::threads / D * D + D +
         256 * (Cfg::stage_groups + 1) + 3 * D;
}


/// The lane's load offsets within a block (bytes), keys or values: [slot][load].
template <class Lanes, bool Keys>
__device__ inline void load_offsets(int (&off)[Lanes::slots][Lanes::units], int lane) {
#pragma unroll
  for (int i = 0; i < Lanes::slots; ++i)
#pragma unroll
    for (int u = 0; u < Lanes::units; ++u) off[i][u] = Lanes::load_offset(lane, i, u, Keys);
}

/// Unit (2 or 4) words from src; code pointers not 16-byte aligned take 4-byte loads.
template <int Unit, bool Aligned>
__device__ inline void load_unit(unsigned* dst, const std::uint8_t* src) {
  if constexpr (Aligned && Unit == 4) {
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(src));
    dst[0] = v.x, dst[1] = v.y, dst[2] = v.z, dst[3] = v.w;
  } else if constexpr (Aligned && Unit == 2) {
    const uint2 v = __ldg(reinterpret_cast<const uint2*>(src));
    dst[0] = v.x, dst[1] = v.y;
  } else {
#pragma unroll
    for (int k = 0; k < Unit; ++k) dst[k] = __ldg(reinterpret_cast<const std::uint32_t*>(src) + k);
  }
}

/// Loads the lane's code words (offsets `off`) of `R` consecutive blocks starting at `blk`. A
/// round inside the split needs one address per load (the blocks are immediate offsets from it);
/// at the split's end, blocks past it load the last block again (their tokens are masked).
template <class Lanes, int R, bool Aligned>
__device__ inline void load_code_blocks(unsigned (&dst)[R][Lanes::slots][Lanes::words], const std::uint8_t* base,
                                        const int (&off)[Lanes::slots][Lanes::units], int blk, int nblocks) {
  constexpr int block_bytes = 32 * Lanes::groups;
  if (blk + R <= nblocks) {
    const std::uint8_t* b = base + std::size_t(blk) * block_bytes;
#pragma unroll
    for (int i = 0; i < Lanes::slots; ++i)
#pragma unroll
      for (int u = 0; u < Lanes::units; ++u) {
        const std::uint8_t* c = b + off[i][u];
#pragma unroll
        for (int r = 0; r < R; ++r) load_unit<Lanes::unit, Aligned>(&dst[r][i][u * Lanes::unit], c + r * block_bytes);
      }
  } else {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const std::uint8_t* b = base + std::size_t(min(blk + r, nblocks - 1)) * block_bytes;
#pragma unroll
      for (int i = 0; i < Lanes::slots; ++i)
#pragma unroll
        for (int u = 0; u < Lanes::units; ++u)
          load_unit<Lanes::unit, Aligned>(&dst[r][i][u * Lanes::unit], b + off[i][u]);
    }
  }
}

/// Asks L2 to fetch `R` consecutive code blocks (G x 32 bytes each) starting at block `blk`, without
/// registers (a bulk prefetch, sm_90): the next round's register loads then find their blocks in
/// L2 or on their way, so fewer DRAM round trips are exposed than the registers alone could cover.
template <class Lanes, int R>
__device__ inline void prefetch_code_blocks(const std::uint8_t* base, int blk, int nblocks) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const int count = min(R, nblocks - blk);
  if (count <= 0) return;
  const std::uint8_t* p = base + std::size_t(blk) * (32 * Lanes::groups);
  if ((reinterpret_cast<std::uintptr_t>(p) & 15u) != 0) return;
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p), "r"(unsigned(count * 32 * Lanes::groups))
               : "memory");
#endif
}

/// Value-rows mode multiplies weights by centroids in half precision (HFMA2: both channels of a
/// group in one instruction, where float took two conversions and two FMAs) over runs of this
/// many tokens, each run's sum then added in float. Short runs keep the half sums' rounding small:
/// with scaled centroids (|c| < 1) and weights <= 1 a run's sum is below 4, its rounding below
/// 2^-10 absolute. Measured at 2c8b: 0.662 -> 0.647 ms; runs of 8 or 16 were no faster, and the
/// largest error over the test grid went from 2.1e-4 to 3.8e-4 (70000 near-uniform tokens:
/// 9.52e-4 -> 9.69e-4, where the centroids' own half rounding dominates).
constexpr int byte_rows_run = 4;

template <int GK, int GV, bool Rows>
__global__ void __launch_bounds__(ByteConfig<GK, GV>::threads, 1)
    byte_attention_kernel(AttentionBatch p, ByteLayout L, float* __restrict__ partial, unsigned stages) {
  static_assert(!Rows || GV == 64, "value-rows mode: 2-channel value groups at D = 128");
  using KL = ByteLanes<GK>;
  using VL = ByteLanes<GV>;
  using Cfg = ByteConfig<GK, GV>;
  constexpr int R = Cfg::round, byte_threads = Cfg::threads, byte_warps = Cfg::warps;
  constexpr int round_blocks = byte_warps * R;
  extern __shared__ __align__(16) unsigned char byte_smem[];
  float* tab = reinterpret_cast<float*>(byte_smem);  // the planes (layout at the top)
  auto* round_barrier = reinterpret_cast<unsigned long long*>(byte_smem + L.small_at);  // 16 bytes
  unsigned* wbuf = reinterpret_cast<unsigned*>(byte_smem + L.small_at + 16);         // [warps][2][R * 32]
  float* red = reinterpret_cast<float*>(wbuf + byte_warps * 2 * R * 32);            // [4][warps]
  float* dense_score = red + 4 * byte_warps;                          // [dense_cap]
  float* product = dense_score + L.dense_cap;                         // [threads / D][D]
  float* code_part = product + byte_threads / L.D * L.D;              // [D]
  float* stage = code_part + L.D;                                     // [256][stage_groups + 1]
  float* q_shared = stage + 256 * (Cfg::stage_groups + 1);            // [D]
  float* vmean = q_shared + L.D;                                      // [D] value-rows mode
  float* vunscale = vmean + L.D;                                      // [D / 2] value-rows mode
  // The table addresses' immediate offset assumes this (the host checks the reserved size).
  if (unsigned(__cvta_generic_to_shared(tab)) != unsigned(byte_shared_base)) __trap();

  const int group = p.q_heads / p.kv_heads;
  const int split = blockIdx.y, b = blockIdx.z / p.kv_heads, kvh = blockIdx.z % p.kv_heads;
  const int hq = kvh * group + blockIdx.x, bh = b * p.q_heads + hq;
  const int D = L.D, tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const DeviceSequence seq = p.sequences[b];
  const DeviceKVCodes codes = p.codes[b * p.kv_heads + kvh];
  const int c0 = split * L.split_tokens;
  const int n = max(0, min(int(seq.coded), c0 + L.split_tokens) - c0), nblocks = (n + 31) / 32;
  const float scale = p.scale != 0.0f ? p.scale : rsqrtf(float(D));
  const float* q = p.q + std::size_t(bh) * D;
  const int ndense = split == 0 ? int(seq.dense) : 0;
  const std::uint8_t* kbase = codes.key_codes + std::size_t(c0 / 32) * GK * 32;
  const std::uint8_t* vbase = codes.value_codes + std::size_t(c0 / 32) * GV * 32;
  // The first round's codes head for L2 while the block builds its tables (measured: 2c8b -2%).
  if (tid == 0 && n > 0) {
    if (stages & stage_scan) prefetch_code_blocks<KL, byte_warps * R>(kbase, 0, nblocks);
    if (stages & stage_hist) prefetch_code_blocks<VL, byte_warps * R>(vbase, 0, nblocks);
  }

  // Full-precision tokens (sinks and window; split 0). Their key and value rows come from DRAM
  // while the rest of the GPU streams codes (latency of microseconds), so the loads go out
  // together: thread (part, d) takes value channel d of tokens part, part + parts, ... (issued
  // first, kept in registers until the scores are known); a warp takes four tokens' keys, a lane
  // 4 consecutive channels of each (D is a multiple of 16 here; 16-byte loads when the rows are
  // aligned). (Measured: the window's separate round trips cost 13 us per launch, 6% of 8c8b;
  // issuing the keys before q's barrier too was no faster and spilled.)
  const int parts = byte_threads / D, vpart = tid / D, vd = tid % D;
  constexpr int vchunk = 8;  // value rows per thread and load batch
  const float* dense_v = seq.dense_values + std::size_t(kvh) * seq.dense * D + vd;
  float vfirst[vchunk];
#pragma unroll
  for (int k = 0; k < vchunk; ++k) {
    const int j = vpart + k * parts;
    vfirst[k] = vpart < parts && j < ndense ? __ldg(dense_v + std::size_t(j) * D) : 0.0f;
  }
  const bool dense_vec = (reinterpret_cast<std::uintptr_t>(seq.dense_keys) & 15u) == 0;
  const bool dense_scores = stages & stage_dense;
  auto load_dense_keys = [&](float4 (&kr)[4][2], int j0) {
#pragma unroll
    for (int k = 0; k < 4; ++k)
#pragma unroll
      for (int h = 0; h < 2; ++h) {  // D <= 256: at most two 4-channel pieces per lane
        const int j = j0 + k * byte_warps, d = 4 * (lane + 32 * h);
        const float* row = seq.dense_keys + (std::size_t(kvh) * seq.dense + j) * D + d;
        kr[k][h] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (dense_scores && j < ndense && d < D)
          kr[k][h] = dense_vec ? __ldg(reinterpret_cast<const float4*>(row))
                               : make_float4(__ldg(row), __ldg(row + 1), __ldg(row + 2), __ldg(row + 3));
      }
  };

  if constexpr (!Rows) for_each_hist_quad<VL, byte_threads>(tab, tid, [](uint4& h) { h = make_uint4(0u, 0u, 0u, 0u); });
  for (int d = tid; d < D; d += byte_threads) q_shared[d] = q[d];
  if (tid == 0) mbarrier_init(round_barrier, byte_warps);
  __syncthreads();
  float dmax = -FLT_MAX;
  for (int j0 = warp; j0 < ndense; j0 += 4 * byte_warps) {
    float s[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    float4 kr[4][2];
    load_dense_keys(kr, j0);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int d = 4 * (lane + 32 * h);
      if (d >= D) continue;
      const float q0 = q_shared[d], q1 = q_shared[d + 1], q2 = q_shared[d + 2], q3 = q_shared[d + 3];
#pragma unroll
      for (int k = 0; k < 4; ++k)
        s[k] = fmaf(q0, kr[k][h].x, fmaf(q1, kr[k][h].y, fmaf(q2, kr[k][h].z, fmaf(q3, kr[k][h].w, s[k]))));
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
  // This head's score tables (staged; copied into the lanes' columns after the next barrier).
  const bool tables = n > 0 && (stages & stage_lut);
  if (tables) {
    const float* cent = p.key_codebooks[kvh].centroids;
    with_centroid_rows(D / GK, cent, [&]<int C, bool Vec>() {
      compute_score_table<GK, C, byte_threads, Vec>(stage, q_shared, cent, scale, tid);
    });
  }
  __syncthreads();
  // The full-precision tokens' maximum, and their values weighted relative to it (the coded
  // tokens keep their own reference; the two meet in float at the end).
  float dense_max = -FLT_MAX;
  for (int w = 0; w < byte_warps; ++w) dense_max = fmaxf(dense_max, red[2 * byte_warps + w]);
  if (vpart < parts) {
    float acc = 0.0f;
#pragma unroll
    for (int k = 0; k < vchunk; ++k) {
      const int j = vpart + k * parts;
      if (j < ndense) acc = fmaf(__expf(dense_score[j] - dense_max), vfirst[k], acc);
    }
    for (int j0 = vpart + vchunk * parts; j0 < ndense; j0 += vchunk * parts) {  // longer windows
      float vv[vchunk];
#pragma unroll
      for (int k = 0; k < vchunk; ++k)
        vv[k] = j0 + k * parts < ndense ? __ldg(dense_v + std::size_t(j0 + k * parts) * D) : 0.0f;
#pragma unroll
      for (int k = 0; k < vchunk; ++k)
        if (j0 + k * parts < ndense) acc = fmaf(__expf(dense_score[j0 + k * parts] - dense_max), vv[k], acc);
    }
    product[tid] = acc;
  }
  if (tables) fill_columns<KL, byte_threads, 0>(tab, stage, tid);
  __syncthreads();
  // Value-rows mode: the value centroids, as half pairs, into the lanes' columns 32-63 (staged
  // like the score tables, through the same buffer).
  const bool accumulate = stages & stage_hist;
  if constexpr (Rows) {
    if (n > 0 && accumulate) {
      const float* vcent = p.value_codebooks[kvh].centroids;
      if ((reinterpret_cast<std::uintptr_t>(vcent) & 7u) == 0) {
        stage_value_rows<GV, byte_threads, true>(stage, vmean, vunscale, vcent, tid);
      } else {
        stage_value_rows<GV, byte_threads, false>(stage, vmean, vunscale, vcent, tid);
      }
      __syncthreads();
      fill_columns<VL, byte_threads, 32>(tab, stage, tid);
      __syncthreads();
    }
  }
  // The coded tokens' running reference starts at their own first maximum, not the full-precision
  // tokens' (the two parts meet in float at the end): a dominant sink would otherwise push every
  // coded weight below the fixed point's resolution (2^-17 of the reference).
  float ref = -FLT_MAX;

  const bool aligned = ((reinterpret_cast<std::uintptr_t>(codes.key_codes) |
                         reinterpret_cast<std::uintptr_t>(codes.value_codes)) & 15u) == 0;
  const bool scan = stages & stage_scan;
  int koff[KL::slots][KL::units], voff[VL::slots][VL::units];
  load_offsets<KL, true>(koff, lane);
  load_offsets<VL, false>(voff, lane);
  // Per-lane constants of the addressing: the byte permute keeps bytes 0, 2, 3 of `base` (plane
  // offset | column * 4) and puts the code in byte 1. Key selectors carry the token permutation's
  // low two bits; the bits above are word swaps inside a load (kwords) and the loads' order.
  const unsigned kmask = KL::token_mask(lane), kwords = (kmask >> 2) % unsigned(KL::unit);
  unsigned ksel[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) ksel[k] = 0x7604u | ((unsigned(k) ^ (kmask & 3u)) << 4);
  const unsigned col = unsigned(lane) * 4;
  // This lane's weights: at most one token per block, each <= unit (fixed point: < 2^28).
  using Weight = std::conditional_t<Rows, float, unsigned>;
  Weight wsum = 0;
  // Value-rows mode: the lane's share of the output, channels 2 g and 2 g + 1 of its slots' groups.
  float acc[VL::slots][2] = {};
  unsigned* my_weights = wbuf + warp * 2 * R * 32;  // two rounds' weights
  // The scan, compiled for 16-byte and for 4-byte aligned code pointers (block-uniform choice).
  // Thread 0 asks for a whole round, one bulk request per codes array that the stages read.
  auto prefetch_round = [&](int r) {
    if (tid != 0) return;
    if (scan) prefetch_code_blocks<KL, round_blocks>(kbase, r * round_blocks, nblocks);
    if (accumulate) prefetch_code_blocks<VL, round_blocks>(vbase, r * round_blocks, nblocks);
  };
  auto scan_split = [&]<bool Aligned>() {
    unsigned kq[R][KL::slots][KL::words], vq[R][VL::slots][VL::words];
    if (n > 0) {
      if (scan) load_code_blocks<KL, R, Aligned>(kq, kbase, koff, warp * R, nblocks);
      if (accumulate) load_code_blocks<VL, R, Aligned>(vq, vbase, voff, warp * R, nblocks);
    }
    // A round's value histograms: its weights (in `weights`) x its value codes (in vq), then vq
    // gets the codes of the blocks from `next` on.
    auto accumulate_round = [&](const unsigned* weights, int next, bool reload) {
#pragma unroll
      for (int r = 0; r < R; ++r) {
        unsigned u[VL::tokens];
        const uint4* w4 = reinterpret_cast<const uint4*>(weights + r * 32 + VL::first_token(lane));
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
          const unsigned plane = col + unsigned(i) * plane_bytes;
          [[maybe_unused]] __half2 hacc;  // value-rows mode: the current run of byte_rows_run tokens
#pragma unroll
          for (int t = 0; t < VL::tokens; ++t) {
            const unsigned at = __byte_perm(vq[r][i][t / 4], plane, 0x7604u | unsigned(t % 4) << 4);
            if constexpr (Rows) {  // weight x centroid pair: half-precision runs, float sums
              const unsigned x = shared_load_u32<byte_shared_base + 128>(at);
              const __half2 c = *reinterpret_cast<const __half2*>(&x);
              const __half2 w2 = *reinterpret_cast<const __half2*>(&u[t]);
              hacc = t % byte_rows_run == 0 ? __hmul2(w2, c) : __hfma2(w2, c, hacc);
              if (t % byte_rows_run == byte_rows_run - 1) {
                const float2 f = __half22float2(hacc);
                acc[i][0] += f.x;
                acc[i][1] += f.y;
              }
            } else {
              shared_add<byte_shared_base + 128>(at, u[t]);
            }
          }
        }
      }
      if (reload) load_code_blocks<VL, R, Aligned>(vq, vbase, voff, next, nblocks);
      __syncwarp();  // the weights buffer is rewritten two rounds on
    };
    const int rounds = (nblocks + round_blocks - 1) / round_blocks;
    for (int round = 0; round < rounds; ++round) {
      const int blk0 = round * round_blocks + warp * R;
      // L2 fetches the next round's blocks while this one computes; the register loads for them
      // go out after this round's lookups. (Measured: prefetching two rounds further ahead was
      // 6% slower -- the prefetches crowd L2.)
      prefetch_round(round + 1);
      // Scores: lookups into the lane's own tables in the permuted token order, then the
      // shuffle reduction. (The stage switch is per round, so the lookups carry no predicate.)
      float s[R];
      if (scan) {
#pragma unroll
        for (int r = 0; r < R; ++r) {
          float part[KL::tokens];
#pragma unroll
          for (int i = 0; i < KL::slots; ++i) {
            const unsigned plane = col + unsigned(i) * plane_bytes;
#pragma unroll
            for (int u = 0; u < KL::units; ++u) {
              unsigned w[KL::unit];
#pragma unroll
              for (int x = 0; x < KL::unit; ++x) w[x] = kq[r][i][u * KL::unit + x];
              permute_unit(w, kwords);
#pragma unroll
              for (int t = 0; t < 4 * KL::unit; ++t) {
                const float e = shared_load<byte_shared_base>(__byte_perm(w[t / 4], plane, ksel[t % 4]));
                const int at = 4 * KL::unit * u + t;
                part[at] = i == 0 ? e : part[at] + e;
              }
            }
          }
          const float total = reduce_partial_scores(part);
          s[r] = (blk0 + r) * 32 + KL::scored_token(lane) < n ? total : -FLT_MAX;
        }
        load_code_blocks<KL, R, Aligned>(kq, kbase, koff, blk0 + round_blocks, nblocks);
      } else {
#pragma unroll
        for (int r = 0; r < R; ++r) s[r] = (blk0 + r) * 32 + KL::scored_token(lane) < n ? 0.0f : -FLT_MAX;
      }
      float m = s[0];
#pragma unroll
      for (int r = 1; r < R; ++r) m = fmaxf(m, s[r]);
      // Only scores above the running reference matter (they raise it); after the first rounds
      // there are none, and a vote replaces the shuffle reductions of the maximum.
      if constexpr (Rows) {
        // Value-rows mode: each warp sums its own tokens, relative to its own reference (the
        // warps' sums meet at the end), so no block barrier.
        if (__any_sync(0xFFFFFFFFu, m > ref)) {  // warp-uniform
          const float raised = warp_max(m) + byte_headroom;
          if (ref > -FLT_MAX) {
            const float f = __expf(ref - raised);
#pragma unroll
            for (int i = 0; i < VL::slots; ++i) acc[i][0] *= f, acc[i][1] *= f;
            wsum *= f;
          }
          ref = raised;
        }
      } else {
        // Block maximum of the round, over a split barrier: a warp posts its maximum if it is
        // above the reference, adds the previous round's weights into the histograms while the
        // others catch up, then waits. The maxima are posted and read with shared-memory
        // atomics: the mbarrier phases order a buffer's reuse two rounds on, but
        // compute-sanitizer's racecheck does not follow them.
        const bool over = __any_sync(0xFFFFFFFFu, m > ref);
        if (over) m = warp_max(m);
        unsigned* round_red = reinterpret_cast<unsigned*>(red) + (round & 1) * byte_warps;
        if (lane == 0) {
          atomicExch(round_red + warp, __float_as_uint(over ? m : -FLT_MAX));
          mbarrier_arrive(round_barrier);
        }
        if (accumulate && round > 0) accumulate_round(my_weights + ((round - 1) & 1) * R * 32, blk0, true);
        mbarrier_wait(round_barrier, unsigned(round) & 1u);
        // Lane l reads warp l's posting (l < warps); the warp reduces only if one is above.
        const float posted = __uint_as_float(atomicOr(round_red + lane % byte_warps, 0u));
        if (__any_sync(0xFFFFFFFFu, posted > ref)) {  // block-uniform: raise the reference, rescale
          const float raised = warp_max(posted) + byte_headroom;
          if (ref > -FLT_MAX) {
            __syncthreads();  // every warp's additions of the previous round are in
            const float f = __expf(ref - raised);
            for_each_hist_quad<VL, byte_threads>(tab, tid, [f](uint4& h) {
              const uint4 v = h;
              h = make_uint4(__float2uint_rn(float(v.x) * f), __float2uint_rn(float(v.y) * f),
                             __float2uint_rn(float(v.z) * f), __float2uint_rn(float(v.w) * f));
            });
            wsum = Weight(__float2uint_rn(float(wsum) * f));
            __syncthreads();
          }
          ref = raised;
        }
      }
      // Weights (masked tokens: e^-huge = 0; fixed point in histogram mode), published per warp
      // in token order for the value lanes (added next round, or after the loop; value-rows mode:
      // now).
      unsigned* weights = my_weights + (round & 1) * R * 32;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        // (Value-rows mode: a warp without tokens so far has no reference, and s = -FLT_MAX.)
        const float e = Rows && ref == -FLT_MAX ? 0.0f : exp_ftz(s[r] - ref);
        if constexpr (Rows) {
          const __half2 h = __float2half2_rn(e);  // (e, e): the value lanes' HFMA2 operand
          wsum += __low2float(h);                  // the weight they use
          weights[r * 32 + KL::scored_token(lane)] = *reinterpret_cast<const unsigned*>(&h);
        } else {
          const unsigned u = __float2uint_rn(e * L.unit);
          wsum += u;
          weights[r * 32 + KL::scored_token(lane)] = u;
        }
      }
      __syncwarp();
      if (Rows && accumulate) accumulate_round(weights, blk0 + round_blocks, true);
    }
    if (!Rows && accumulate && rounds > 0) accumulate_round(my_weights + ((rounds - 1) & 1) * R * 32, 0, false);
  };
  if (aligned)
    scan_split.template operator()<true>();
  else
    scan_split.template operator()<false>();

  // Weight sums (value-rows mode: and each warp's reference), then out = (codes' part + full-
  // precision part) / weight sum, each part scaled from its own reference to the larger one.
  const float lane_weights = warp_sum(float(wsum));
  if (lane == 0) {
    red[3 * byte_warps + warp] = lane_weights;
    if (Rows) red[warp] = ref;
  }
  // Value-rows mode: the lanes' sums go to the (now idle) stage, [warp][slot][lane][2].
  if constexpr (Rows) {
#pragma unroll
    for (int i = 0; i < VL::slots; ++i)
#pragma unroll
      for (int c = 0; c < 2; ++c) stage[((warp * VL::slots + i) * 32 + lane) * 2 + c] = acc[i][c];  // 4-byte aligned
  }
  __syncthreads();
  // The coded tokens' reference (value-rows mode: the warps' largest; each warp's sums are scaled
  // to it by warp_factor), then the block's m, the larger of it and the full-precision tokens'.
  float coded_ref = ref;
  if constexpr (Rows) {
    coded_ref = -FLT_MAX;
    for (int w = 0; w < byte_warps; ++w) coded_ref = fmaxf(coded_ref, red[w]);
  }
  auto warp_factor = [&](int w) { return !Rows ? 1.0f : red[w] > -FLT_MAX ? __expf(red[w] - coded_ref) : 0.0f; };
  const float m = fmaxf(coded_ref, dense_max);
  const float coded_factor = coded_ref > -FLT_MAX ? __expf(coded_ref - m) : 0.0f;
  const float dense_factor = dense_max > -FLT_MAX ? __expf(dense_max - m) : 0.0f;
  float coded_weights = 0.0f;
  for (int w = 0; w < byte_warps; ++w) coded_weights += red[3 * byte_warps + w] * warp_factor(w);
  coded_weights *= 1.0f / L.unit;
  float dense_weights = 0.0f;
  for (int j = 0; j < ndense; ++j) dense_weights += __expf(dense_score[j] - dense_max);
  const float total = coded_weights * coded_factor + dense_weights * dense_factor;
  const CodebookView vcb = p.value_codebooks[kvh];
  const bool codes_part = n > 0 && (stages & stage_product);
  if (Rows && codes_part) {  // output channel d: the sums of every warp and token subset
    for (int d = tid; d < D; d += byte_threads) {
      const int g = d / 2, i = VL::slot_of(g);
      float o = 0.0f;
      for (int w = 0; w < byte_warps; ++w) {
        float ow = 0.0f;
#pragma unroll
        for (int sub = 0; sub < VL::subsets; ++sub) ow += stage[((w * VL::slots + i) * 32 + VL::lane_of(g, sub)) * 2 + d % 2];
        o = fmaf(warp_factor(w), ow, o);
      }
      // Back to the codebook's scale, plus the half rounding's mean.
      code_part[d] = accumulate ? fmaf(o, vunscale[g], coded_weights * vmean[d]) : 0.0f;
    }
  } else if (codes_part) {
    const float inv = 1.0f / L.unit;
    const float* cent = vcb.centroids;
    with_centroid_rows(D / GV, cent, [&]<int Cv, bool Vec>() {
      hist_product<VL, Cv, byte_threads, Vec>(tab, cent, inv, code_part, tid);
    });
  }
  __syncthreads();
  for (int d = tid; d < D; d += byte_threads) {
    float dense_part = 0.0f;  // the prologue's weighted full-precision values
    for (int part = 0; part < parts; ++part) dense_part += product[part * D + d];
    const float o = (codes_part ? code_part[d] * coded_factor : 0.0f) + dense_part * dense_factor;
    if (gridDim.y == 1) {  // one split: the block's result is the output (no combine_kernel)
      p.out[std::size_t(bh) * D + d] = total > 0.0f ? o / total : 0.0f;
      continue;
    }
    float* dst = partial + (std::size_t(bh) * gridDim.y + split) * (2 + D);
    if (d == 0) {
      dst[0] = total > 0.0f ? m : -FLT_MAX;
      dst[1] = total;
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
