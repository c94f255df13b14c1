#pragma once
/// The lane-tables kernel (8-bit codes with 16, 32 or 64 key and value groups: CQ-2c8b, 4c8b, 8c8b
/// at D = 128): its lanes, planes, table words, shared-memory operations and launch shape.
///
/// Why lane-private tables: decode attention over codes makes two random shared-memory accesses
/// per (token, group) -- a score-table lookup for the key code and a histogram update for the
/// value code. With one table per group shared by the warp, 32 lanes hitting random entries
/// collide on ~3.5 of the 32 banks on average, and those wavefronts, not DRAM, bound a kernel
/// built that way (the general kernel). Here each lane owns two groups (its "slots") for a subset
/// of the tokens and keeps its own copy of their tables in *its own bank*: every lookup and every
/// histogram atomic of a warp is one wavefront. The price is a cross-lane reduction of partial
/// scores (warp shuffles: the G / 2 lanes of a token subset each hold two of its groups) and
/// 64 / G copies of each table.
///
/// Layout: slot i of every lane lives in plane i (64 KiB): 256 rows, one per code, of 64 words --
/// the 32 lanes' score-table entries, then the 32 lanes' histogram entries. An entry's offset from
/// the first plane is plane * 64 KiB | code << 8 | lane * 4 (+ 128 for the histogram): one byte
/// permute (PRMT) of the packed code word builds it. The planes start the dynamic shared memory,
/// whose shared-window address is the driver's reserved bytes (1 KiB on sm_90; the host checks,
/// the kernel traps otherwise): that base and the + 128 ride in the load's immediate offset, so
/// the permute is the only address instruction per access.
///
/// Two groups per lane rather than one: half the shuffles of the reduction and half the weights
/// each value lane reads, for the same lookups.

#include "cq/config.hpp"
#include "cq/cuda/attention/params.cuh"

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace cq::cuda::detail {

/// How a warp's 32 lanes share a 32-token block of G groups of 8-bit codes (G = 16, 32 or 64).
/// The block is G x 32 bytes, group-major: group g's 32 codes are bytes 32 g .. 32 g + 31. Lane l
/// takes token subset s = l % subsets (`tokens` tokens) of two groups ("slots"), j and j + G / 2
/// with j = l / subsets. That is as many lookups per lane as one group for all 32 tokens, but a
/// token's groups are spread over G / 2 lanes instead of G: half the shuffle reduction, half the
/// weights each lane must fetch. The tables of the two slots fill two planes.
template <int G>
struct LaneMap {
  static_assert(G == 16 || G == 32 || G == 64, "cq lane tables: 16, 32 or 64 groups");
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
CQ_HOST_DEVICE constexpr int round_blocks_for(int key_words, int value_words) {
  const int r = 32 / (2 * key_words + 2 * value_words);
  return r >= 4 ? 4 : r >= 2 ? 2 : 1;
}

/// Where dynamic shared memory starts in the shared window: after the driver's reserved bytes
/// (cudaDevAttrReservedSharedMemoryPerBlock; 1 KiB on sm_90). lane_tables_kernel's planes start
/// there and its table addresses carry this base as an immediate offset (no add per access).
constexpr int lane_tables_shared_base = 1024;

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

/// How a launch of the lane-tables kernel finds its codes (a template argument: each has its own
/// instantiation, so no path's instructions or registers burden another's):
/// - contiguous: every entry's codes in its own buffers (AttentionBatch::page_tokens == 0); no page
///   table in the code at all;
/// - paged: pages of any size (a warp's round of blocks may span pages: a page id and an address
///   per block);
/// - round_pages: pages of at least a round's blocks, and splits starting at a multiple of them
///   (the plan arranges it), so each warp's round lies in one page: one page-table load and one
///   address a round, as contiguous codes have one address. Histogram mode only.
/// - pair_pages: the same for halves of rounds of four blocks (CQ-8c8b), in pages of two blocks
///   (64 tokens) or more, splits starting at a multiple of two blocks: each half round lies in one
///   page; two page-table loads and two addresses a round where `paged` takes four.
enum class PageMode { contiguous, paged, round_pages, pair_pages };
inline constexpr int page_modes = 4;

/// Blocks of a warp's round that share one page lookup and one address in mode `m`, for rounds
/// of R blocks (1 in `paged` mode: a lookup and an address per block); 0: contiguous.
CQ_HOST_DEVICE constexpr int page_chunk_blocks(PageMode m, int R) {
  return m == PageMode::round_pages ? R : m == PageMode::pair_pages ? 2 : m == PageMode::paged ? 1 : 0;
}

/// Launch shape for GK key and GV value groups: two planes of tables (128 KiB), one 512-thread
/// block per multiprocessor. Staged tables (score tables, value rows) take stage_groups + 1 words
/// per code. Pages: how the main loop looks pages up (PageMode above).
template <int GK, int GV, PageMode Pages = PageMode::contiguous>
struct LaneTablesConfig {
  using KeyLanes = LaneMap<GK>;
  using ValueLanes = LaneMap<GV>;
  static constexpr int stage_groups = GK > GV ? GK : GV;
  static_assert(KeyLanes::slots == ValueLanes::slots, "key and value slots share the planes");
  static constexpr int planes = KeyLanes::slots;
  static constexpr int threads = 512;
  static constexpr int warps = threads / 32;
  static constexpr int round = round_blocks_for(KeyLanes::words, ValueLanes::words);  // blocks per warp and round
  static constexpr int round_blocks = warps * round;                                 // blocks per block and round
  /// Blocks of a round in one page at one address (page_chunk_blocks); 0: contiguous.
  static constexpr int page_chunk = page_chunk_blocks(Pages, round);
  static_assert(round % (page_chunk > 0 ? page_chunk : 1) == 0, "a round is whole page chunks");
};

/// Paged codes in value-rows mode: the split's page ids, copied into shared memory by the kernel
/// before its main loop (lane_tables_page_cap words), so that neither the main loop nor the warp
/// prefetching for the block waits on the page table in global memory (PageLookup, mainloop.cuh).
/// Block b lies in page ids[(b >> shift) - first]; keys and values share the page table.
struct SplitPages {
  unsigned at;  // shared-window address of the ids, less 4 x (the split's first page)
  int shift;    // log2 of the blocks per page
  __device__ __forceinline__ std::uint32_t operator()(int b) const {
    std::uint32_t id;
    asm volatile("ld.shared.u32 %0, [%1];" : "=r"(id) : "r"(at + ((unsigned(b) >> shift) << 2)));
    return id;
  }
};

/// Most pages a split's codes span (the page ids in shared memory, value-rows mode): the plan keeps
/// its splits within lane_tables_split_blocks 32-token blocks (histogram mode's fixed point keeps
/// them shorter anyway), pages are at least one block.
constexpr int lane_tables_split_blocks = 2048;
constexpr int lane_tables_page_cap = lane_tables_split_blocks + 4;

/// Shape and plan of a launch of lane_tables_kernel. Shared memory: the planes first (at
/// shared-window address lane_tables_shared_base), then the small buffers at byte `small_at` of
/// the dynamic allocation.
struct LaneTablesLayout {
  int head_dim, full_cap, split_tokens;
  int small_at;
  float unit;  // fixed-point scale of the histograms: 2^31 / (most tokens one entry can collect)
};

/// Words of lane_tables_kernel<GK, GV>'s small buffers: the round barrier, per-warp weights of two
/// rounds, reductions, the full-precision tokens' scores, their values' partial sums, the codes'
/// share of the output, the staged score tables and q, (value-rows mode) the value rows' rounding
/// means and scales, and (value-rows mode, `rows`) the split's page ids.
template <int GK, int GV>
CQ_HOST_DEVICE constexpr int lane_tables_small_words(int full_cap, int D, bool rows) {
  using Cfg = LaneTablesConfig<GK, GV>;
  return 4 + Cfg::warps * 2 * Cfg::round * 32 + 4 * Cfg::warps + full_cap + Cfg::threads / D * D + D +
         256 * (Cfg::stage_groups + 1) + 3 * D + (rows ? lane_tables_page_cap : 0);
}

/// The buffers of a lane_tables_kernel block in dynamic shared memory, as the kernel carves them
/// (the planes, then the small buffers lane_tables_small_words counts), for the main loop and the
/// epilogue.
struct LaneTablesShared {
  float* tab;                        // the planes (layout at the top)
  unsigned long long* round_barrier;  // 16 bytes
  unsigned* wbuf;                    // [warps][2][round * 32] weights of two rounds
  float* red;                        // [4][warps] reductions
  float* full_score;                 // [full_cap]
  float* product;                    // [threads / D][D] the full-precision values' partial sums
  float* code_part;                  // [D] the codes' share of the output
  float* stage;                      // [256][stage_groups + 1] staged tables
  float* q;                          // [D]
  float* vmean;                      // [D] value-rows mode: the rows' rounding means
  float* vunscale;                   // [D / 2] value-rows mode: the rows' scales
};

/// What a lane_tables_kernel block serves -- one query head of one sequence over one split of its
/// coded tokens (grid: query heads per KV head, splits, sequences x KV heads) -- and this thread,
/// as the kernel computes it, for the main loop and the epilogue.
struct LaneTablesBlock {
  int split, b, kvh, bh, D, tid, warp, lane;
  DeviceKVCodes codes;
  int n, nblocks;  // the split's coded tokens and 32-token blocks
  float scale;
  int nfull;       // full-precision tokens (split 0 only)
  CodeRun key_run, value_run;  // the codes, by blocks (params.cuh)
  int first_block;             // the split's first block
  SplitPages pages;            // paged codes, value-rows mode: the split's page ids in shared memory
};

}  // namespace cq::cuda::detail
