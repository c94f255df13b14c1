#pragma once
/// The lane-tables kernel's main loop over a split's coded tokens. Warps take rounds of R 32-token
/// blocks; a round scores its key codes (lookups into the lane's own tables, then a shuffle
/// reduction leaves one token's score per lane), finds the round's maximum, raises the running
/// reference -- with headroom -- when a score overtook it, turns scores into weights
/// exp(s - ref) <= 1 and adds them into the value histograms (u32 fixed point, shared-memory
/// integer atomics: float atomics are compare-and-swap loops) or, in value-rows mode, sums
/// weight x value centroid in registers. Codes are loaded into registers, the next round's while
/// this one computes, after an L2 bulk prefetch of that round (but paged codes in histogram mode:
/// prefetch_round says why).
///
/// Reduction: a lane's partial scores are kept in a lane-dependent token order (position t holds
/// token t ^ mask(lane)), which turns every halving step of the reduction into one shuffle and
/// one add (no selects): the order comes from the byte permute's selector, the order of a lane's
/// loads and a few word swaps per block.
///
/// Histogram mode raises a block-wide reference over a split barrier (a warp posts its round
/// maximum, adds the previous round's weights while the others catch up, then waits), and only
/// when a score overtakes it; a vote finds out, so the maximum's shuffle reductions run only in
/// those rounds. Value-rows mode keeps one reference per warp (no block barrier; the warps' sums
/// meet in the epilogue) and has no fixed point, so no limit on tokens per split.

#include "cq/attention/softmax_state.hpp"
#include "cq/cuda/attention/lane_tables/layout.cuh"
#include "cq/cuda/warp.cuh"

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <cstddef>
#include <cstdint>
#include <type_traits>

namespace cq::cuda::detail {

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
/// completes or `wait_ns` pass; a long limit keeps waiting warps from spinning on the issue slots.
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
constexpr float reference_headroom = 1.3862944f;  // ln 4

/// Value-rows mode multiplies weights by centroids in half precision (HFMA2: both channels of a
/// group in one instruction, where float takes two conversions and two FMAs) over runs of this
/// many tokens, each run's sum then added in float. Short runs keep the half sums' rounding small:
/// with scaled centroids (|c| < 1) and weights <= 1 a run's sum is below 4, its rounding below
/// 2^-10 absolute.
constexpr int value_rows_run = 4;

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

/// The page ids of the `R` consecutive blocks from the split's block `blk` (clamped to its last
/// block), for load_code_blocks; keys and values share them (one page table). Contiguous: nothing.
/// Looked up a round before the loads that use them, so a load never waits on the page table.
/// Each run of Chunk blocks from blk (PageMode's page_chunk_blocks; 1 in `paged` mode) lies in
/// one page, whose id each of its pg[r] gets: one lookup a chunk.
template <int R, int Chunk, class PageOf>
__device__ inline void block_pages(std::uint32_t (&pg)[R], const CodeRun& run, const PageOf& page_of, int first, int blk,
                                   int nblocks) {
  constexpr int step = Chunk > 0 ? Chunk : 1;
#pragma unroll
  for (int c = 0; c < R; c += step) {
    const std::uint32_t id = run.pages && nblocks > 0 ? page_of(first + min(blk + c, nblocks - 1)) : 0u;
#pragma unroll
    for (int r = c; r < c + step; ++r) pg[r] = id;
  }
}

/// Where the main loop looks a block's page up: in value-rows mode the split's page ids in shared
/// memory (its rounds are one block a warp, so a page-table load's latency sat in every round);
/// in histogram mode the page table itself, whose loads go out a round ahead (the shared copy
/// measured slower there: docs/design/cuda-attention.md, "Paged codes", session 13).
template <bool Rows>
struct PageLookup {
  const LaneTablesBlock& k;
  __device__ __forceinline__ std::uint32_t operator()(int b) const {
    if constexpr (Rows) return k.pages(b);
    else return k.key_run.page_of(b);
  }
};

/// Loads the lane's code words (offsets `off`) of `R` consecutive blocks starting at the split's
/// block `blk` (block first + blk of the run; in pages, pages pg from block_pages).
///
/// Paged codes: each run of Chunk blocks (PageMode's page_chunk_blocks, >= 1) lies in one page
/// (pg[c] for the run from block c) and is read from one address (the blocks are immediate
/// offsets from it), also past the split's end, where the blocks are other bytes of the split's
/// last page (in bounds; their tokens are masked). Contiguous codes (also entries without a page
/// table in a paged batch): one address for the R blocks, but at the split's end, where blocks
/// past it load the last block again.
template <class Lanes, int R, bool Aligned, int Chunk = 0>
__device__ inline void load_code_blocks(unsigned (&dst)[R][Lanes::slots][Lanes::words], const CodeRun& run, int first,
                                        const std::uint32_t (&pg)[R], const int (&off)[Lanes::slots][Lanes::units],
                                        int blk, int nblocks) {
  constexpr int block_bytes = 32 * Lanes::groups;
  const int b0 = first + blk;
  if constexpr (Chunk > 0) {
    if (run.pages != nullptr) {
#pragma unroll
      for (int c = 0; c < R; c += Chunk) {
        const std::uint8_t* b = run.block_in(pg[c], b0 + c, block_bytes);
#pragma unroll
        for (int i = 0; i < Lanes::slots; ++i)
#pragma unroll
          for (int u = 0; u < Lanes::units; ++u)
#pragma unroll
            for (int r = c; r < c + Chunk; ++r)
              load_unit<Lanes::unit, Aligned>(&dst[r][i][u * Lanes::unit], b + off[i][u] + (r - c) * block_bytes);
      }
      return;
    }
  }
  if (blk + R <= nblocks) {
    const std::uint8_t* b = run.block_in(0u, b0, block_bytes);
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
      const std::uint8_t* b = run.block_in(pg[r], first + min(blk + r, nblocks - 1), block_bytes);
#pragma unroll
      for (int i = 0; i < Lanes::slots; ++i)
#pragma unroll
        for (int u = 0; u < Lanes::units; ++u)
          load_unit<Lanes::unit, Aligned>(&dst[r][i][u * Lanes::unit], b + off[i][u]);
    }
  }
}

/// Asks L2 to fetch `R` consecutive code blocks (G x 32 bytes each) starting at the split's block
/// `blk`, without registers: the next round's register loads then find their blocks in L2 or on
/// their way, so fewer DRAM round trips are exposed than the registers alone could cover. Called
/// by one warp. Contiguous: lane 0 asks for the whole range in one bulk prefetch (sm_90). In
/// pages of 4 blocks or more: one bulk prefetch per page's run of blocks, lane i for the run
/// starting at block i; in smaller pages: 128-byte line prefetches spread over the lanes (many
/// small bulk requests queue behind each other). `page_of(b)` gives block b's page id (PageLookup
/// in the main loop; the page table itself before the kernel has copied it).
template <class Lanes, int R, class PageOf>
__device__ inline void prefetch_code_blocks(const CodeRun& run, const PageOf& page_of, int first, int blk, int nblocks,
                                            int lane) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr int block_bytes = 32 * Lanes::groups, block_lines = block_bytes / 128;
  const int count = min(R, nblocks - blk);
  if (count <= 0) return;
  if (run.pages == nullptr) {
    const std::uint8_t* p = run.base + std::size_t(first + blk) * block_bytes;
    if (lane != 0 || (reinterpret_cast<std::uintptr_t>(p) & 15u) != 0) return;
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p), "r"(unsigned(count * block_bytes)) : "memory");
    return;
  }
  const int pb = run.page_blocks();
  if (pb >= 4) {
    for (int r = lane; r < count; r += 32) {
      const int b = first + blk + r, in_page = b & (pb - 1);
      if (r > 0 && in_page != 0) continue;  // not the start of a page's run
      const std::uint8_t* p = run.block_in(page_of(b), b, block_bytes);
      const int blocks = min(pb - in_page, count - r);
      if ((reinterpret_cast<std::uintptr_t>(p) & 15u) == 0)
        asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p), "r"(unsigned(blocks * block_bytes))
                     : "memory");
    }
    return;
  }
  for (int i = lane; i < count * block_lines; i += 32) {
    const int b = first + blk + i / block_lines;
    const std::uint8_t* p = run.block_in(page_of(b), b, block_bytes) + (i % block_lines) * 128;
    asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
  }
#endif
}

/// Per-lane constants of the addressing (computed once per thread by the kernel): the load
/// offsets, and the byte permute's selectors, which keep bytes 0, 2, 3 of `base` (plane offset |
/// column * 4) and put the code in byte 1. Key selectors carry the token permutation's low two
/// bits; the bits above are word swaps inside a load (kwords) and the loads' order.
template <class Cfg>
struct LaneAddressing {
  using KL = typename Cfg::KeyLanes;
  using VL = typename Cfg::ValueLanes;
  const int (&koff)[KL::slots][KL::units];
  const int (&voff)[VL::slots][VL::units];
  const unsigned& kwords;
  const unsigned (&ksel)[4];
  const unsigned& col;  // the lane's column: lane * 4 bytes
};

/// A lane's weight sum: fixed point in histogram mode (at most one token per block, each <= unit,
/// so < 2^28), float in value-rows mode.
template <bool Rows>
using LaneWeight = std::conditional_t<Rows, float, unsigned>;

/// Warp 0 asks L2 for round r's blocks of each codes array that the stages read.
///
/// Not for paged codes in histogram mode: there warp 0 would first wait on the page table for each
/// page's request, and every warp waits for warp 0 at the round barrier; the register loads issued
/// a round ahead cover the codes' latency without it, and the paged kernel ran faster so
/// (docs/design/cuda-attention.md, "Paged codes", session 23). Value-rows mode has no round
/// barrier and reads the page ids from shared memory: it keeps the prefetch, but with GQA only in
/// the block of the group's first query head (blockIdx.x 0): the group's blocks read the same codes
/// side by side, so one block's requests serve them all, and the others' paged prefetches (page
/// lookups and a request per page's run or line) would only repeat them.
template <class Cfg, bool Rows>
__device__ __forceinline__ void prefetch_round(const LaneTablesBlock& k, bool scan, bool accumulate, int r) {
  if (k.warp != 0) return;
  if (!Rows && k.key_run.pages) return;
  if (Rows && k.key_run.pages && blockIdx.x != 0) return;
  const PageLookup<Rows> page_of{k};
  if (scan)
    prefetch_code_blocks<typename Cfg::KeyLanes, Cfg::round_blocks>(k.key_run, page_of, k.first_block,
                                                                    r * Cfg::round_blocks, k.nblocks, k.lane);
  if (accumulate)
    prefetch_code_blocks<typename Cfg::ValueLanes, Cfg::round_blocks>(k.value_run, page_of, k.first_block,
                                                                      r * Cfg::round_blocks, k.nblocks, k.lane);
}

/// A round's value histograms: its weights (in `weights`) x its value codes (in vq), then vq gets
/// the codes of the blocks from `next` on (in pages next_pages; if `reload`). Value-rows mode: weight x centroid pairs
/// summed into acc instead.
template <class Cfg, bool Rows, bool Aligned>
__device__ __forceinline__ void accumulate_round(
    unsigned (&vq)[Cfg::round][Cfg::ValueLanes::slots][Cfg::ValueLanes::words], const unsigned* weights, int next,
    const std::uint32_t (&next_pages)[Cfg::round], bool reload, const LaneTablesBlock& k, const LaneAddressing<Cfg>& a,
    float (&acc)[Cfg::ValueLanes::slots][2]) {
  using VL = typename Cfg::ValueLanes;
  constexpr int R = Cfg::round;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    unsigned u[VL::tokens];
    const uint4* w4 = reinterpret_cast<const uint4*>(weights + r * 32 + VL::first_token(k.lane));
#pragma unroll
    for (int t = 0; t < VL::tokens / 4; ++t) {
      const uint4 v = w4[t];
      u[4 * t] = v.x;
      u[4 * t + 1] = v.y;
      u[4 * t + 2] = v.z;
      u[4 * t + 3] = v.w;
    }
    // Unconditional: skipping zero weights costs a divergent branch per token, more than the
    // atomic it saves.
#pragma unroll
    for (int i = 0; i < VL::slots; ++i) {
      const unsigned plane = a.col + unsigned(i) * plane_bytes;
      [[maybe_unused]] __half2 hacc;  // value-rows mode: the current run of value_rows_run tokens
#pragma unroll
      for (int t = 0; t < VL::tokens; ++t) {
        const unsigned at = __byte_perm(vq[r][i][t / 4], plane, 0x7604u | unsigned(t % 4) << 4);
        if constexpr (Rows) {  // weight x centroid pair: half-precision runs, float sums
          const unsigned x = shared_load_u32<lane_tables_shared_base + 128>(at);
          const __half2 c = *reinterpret_cast<const __half2*>(&x);
          const __half2 w2 = *reinterpret_cast<const __half2*>(&u[t]);
          hacc = t % value_rows_run == 0 ? __hmul2(w2, c) : __hfma2(w2, c, hacc);
          if (t % value_rows_run == value_rows_run - 1) {
            const float2 f = __half22float2(hacc);
            acc[i][0] += f.x;
            acc[i][1] += f.y;
          }
        } else {
          shared_add<lane_tables_shared_base + 128>(at, u[t]);
        }
      }
    }
  }
  if (reload)
    load_code_blocks<VL, R, Aligned, Cfg::page_chunk>(vq, k.value_run, k.first_block, next_pages, a.voff, next,
                                                       k.nblocks);
  __syncwarp();  // the weights buffer is rewritten two rounds on
}

/// The scan of a split: every round of the warp's blocks (code pointers 16-byte aligned or not;
/// Capped: logits soft-capped at `cap`).
template <class Cfg, bool Rows, bool Aligned, bool Capped>
__device__ __forceinline__ void scan_split(const LaneTablesLayout& L, const LaneTablesBlock& k,
                                           const LaneTablesShared& sh, const LaneAddressing<Cfg>& a,
                                           unsigned* my_weights, bool scan, bool accumulate, float cap, float& ref,
                                           LaneWeight<Rows>& wsum,
                                           float (&acc)[Cfg::ValueLanes::slots][2]) {
  using KL = typename Cfg::KeyLanes;
  using VL = typename Cfg::ValueLanes;
  constexpr int R = Cfg::round, round_blocks = Cfg::round_blocks;
  unsigned kq[R][KL::slots][KL::words], vq[R][VL::slots][VL::words];
  const PageLookup<Rows> page_of{k};
  // Paged codes: the pages of this round's blocks (pg) and of the next round's (pg_next).
  std::uint32_t pg[R], pg_next[R];
  block_pages<R, Cfg::page_chunk>(pg_next, k.key_run, page_of, k.first_block, k.warp * R, k.nblocks);
  if (k.n > 0) {
    if (scan)
      load_code_blocks<KL, R, Aligned, Cfg::page_chunk>(kq, k.key_run, k.first_block, pg_next, a.koff, k.warp * R,
                                                         k.nblocks);
    if (accumulate)
      load_code_blocks<VL, R, Aligned, Cfg::page_chunk>(vq, k.value_run, k.first_block, pg_next, a.voff, k.warp * R,
                                                         k.nblocks);
  }
  const int rounds = (k.nblocks + round_blocks - 1) / round_blocks;
  for (int round = 0; round < rounds; ++round) {
    const int blk0 = round * round_blocks + k.warp * R;
#pragma unroll
    for (int r = 0; r < R; ++r) pg[r] = pg_next[r];
    block_pages<R, Cfg::page_chunk>(pg_next, k.key_run, page_of, k.first_block, blk0 + round_blocks, k.nblocks);
    // L2 fetches the next round's blocks while this one computes; the register loads for them go
    // out after this round's lookups. (The stage switch is per round, so the lookups carry no
    // predicate.)
    prefetch_round<Cfg, Rows>(k, scan, accumulate, round + 1);
    float s[R];
    if (scan) {
#pragma unroll
      for (int r = 0; r < R; ++r) {
        float part[KL::tokens];
#pragma unroll
        for (int i = 0; i < KL::slots; ++i) {
          const unsigned plane = a.col + unsigned(i) * plane_bytes;
#pragma unroll
          for (int u = 0; u < KL::units; ++u) {
            unsigned w[KL::unit];
#pragma unroll
            for (int x = 0; x < KL::unit; ++x) w[x] = kq[r][i][u * KL::unit + x];
            permute_unit(w, a.kwords);
#pragma unroll
            for (int t = 0; t < 4 * KL::unit; ++t) {
              const float e = shared_load<lane_tables_shared_base>(__byte_perm(w[t / 4], plane, a.ksel[t % 4]));
              const int at = 4 * KL::unit * u + t;
              part[at] = i == 0 ? e : part[at] + e;
            }
          }
        }
        float total = reduce_partial_scores(part);
        if constexpr (Capped) total = SoftCap(cap)(total);
        s[r] = (blk0 + r) * 32 + KL::scored_token(k.lane) < k.n ? total : -FLT_MAX;
      }
      load_code_blocks<KL, R, Aligned, Cfg::page_chunk>(kq, k.key_run, k.first_block, pg_next, a.koff,
                                                         blk0 + round_blocks, k.nblocks);
    } else {
#pragma unroll
      for (int r = 0; r < R; ++r) s[r] = (blk0 + r) * 32 + KL::scored_token(k.lane) < k.n ? 0.0f : -FLT_MAX;
    }
    float m = s[0];
#pragma unroll
    for (int r = 1; r < R; ++r) m = fmaxf(m, s[r]);
    // Only scores above the running reference matter (they raise it); after the first rounds
    // there are none, and a vote replaces the shuffle reductions of the maximum.
    if constexpr (Rows) {
      // Value-rows mode: each warp sums its own tokens, relative to its own reference (the warps'
      // sums meet at the end), so no block barrier.
      if (__any_sync(0xFFFFFFFFu, m > ref)) {  // warp-uniform
        const float raised = warp_max(m) + reference_headroom;
        if (ref > -FLT_MAX) {
          const float f = softmax_exp(ref - raised);
#pragma unroll
          for (int i = 0; i < VL::slots; ++i) acc[i][0] *= f, acc[i][1] *= f;
          wsum *= f;
        }
        ref = raised;
      }
    } else {
      // Block maximum of the round, over a split barrier: a warp posts its maximum if it is above
      // the reference, adds the previous round's weights into the histograms while the others
      // catch up, then waits. The maxima are posted and read with shared-memory atomics: the
      // mbarrier phases order a buffer's reuse two rounds on, but compute-sanitizer's racecheck
      // does not follow them.
      const bool over = __any_sync(0xFFFFFFFFu, m > ref);
      if (over) m = warp_max(m);
      unsigned* round_red = reinterpret_cast<unsigned*>(sh.red) + (round & 1) * Cfg::warps;
      if (k.lane == 0) {
        atomicExch(round_red + k.warp, __float_as_uint(over ? m : -FLT_MAX));
        mbarrier_arrive(sh.round_barrier);
      }
      if (accumulate && round > 0)
        accumulate_round<Cfg, Rows, Aligned>(vq, my_weights + ((round - 1) & 1) * R * 32, blk0, pg, true, k, a, acc);
      mbarrier_wait(sh.round_barrier, unsigned(round) & 1u);
      // Lane l reads warp l's posting (l < warps); the warp reduces only if one is above.
      const float posted = __uint_as_float(atomicOr(round_red + k.lane % Cfg::warps, 0u));
      if (__any_sync(0xFFFFFFFFu, posted > ref)) {  // block-uniform: raise the reference, rescale
        const float raised = warp_max(posted) + reference_headroom;
        if (ref > -FLT_MAX) {
          __syncthreads();  // every warp's additions of the previous round are in
          const float f = softmax_exp(ref - raised);
          for_each_hist_quad<VL, Cfg::threads>(sh.tab, k.tid, [f](uint4& h) {
            const uint4 v = h;
            h = make_uint4(__float2uint_rn(float(v.x) * f), __float2uint_rn(float(v.y) * f),
                           __float2uint_rn(float(v.z) * f), __float2uint_rn(float(v.w) * f));
          });
          wsum = LaneWeight<Rows>(__float2uint_rn(float(wsum) * f));
          __syncthreads();
        }
        ref = raised;
      }
    }
    // Weights (masked tokens: e^-huge = 0; fixed point in histogram mode), published per warp in
    // token order for the value lanes (added next round, or after the loop; value-rows mode: now).
    unsigned* weights = my_weights + (round & 1) * R * 32;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      // (Value-rows mode: a warp without tokens so far has no reference, and s = -FLT_MAX.)
      const float e = Rows && ref == -FLT_MAX ? 0.0f : exp_ftz(s[r] - ref);
      if constexpr (Rows) {
        const __half2 h = __float2half2_rn(e);  // (e, e): the value lanes' HFMA2 operand
        wsum += __low2float(h);               // the weight they use
        weights[r * 32 + KL::scored_token(k.lane)] = *reinterpret_cast<const unsigned*>(&h);
      } else {
        const unsigned u = __float2uint_rn(e * L.unit);
        wsum += u;
        weights[r * 32 + KL::scored_token(k.lane)] = u;
      }
    }
    __syncwarp();
    if (Rows && accumulate)
      accumulate_round<Cfg, Rows, Aligned>(vq, weights, blk0 + round_blocks, pg_next, true, k, a, acc);
  }
  if (!Rows && accumulate && rounds > 0)
    accumulate_round<Cfg, Rows, Aligned>(vq, my_weights + ((rounds - 1) & 1) * R * 32, 0, pg, false, k, a, acc);
}

}  // namespace cq::cuda::detail
