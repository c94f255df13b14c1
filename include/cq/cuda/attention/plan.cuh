#pragma once
/// Host planning of fused attention (FlashInfer's plan/run split): from a batch shape and the
/// device's limits, which kernel runs, how the coded tokens are split, how many query heads share
/// a block, the shared-memory layout, occupancy and the workspace a launch needs. A plan is made
/// once per batch shape; launching it (attention.cuh) allocates nothing.

#include "cq/cuda/attention/combine.cuh"
#include "cq/cuda/attention/general/kernel.cuh"
#include "cq/cuda/attention/general/layout.cuh"
#include "cq/cuda/attention/general/lut.cuh"
#include "cq/cuda/attention/general/merge.cuh"
#include "cq/cuda/attention/grouped_rows/plan.cuh"
#include "cq/cuda/attention/lane_tables/kernel.cuh"
#include "cq/cuda/attention/lane_tables/layout.cuh"
#include "cq/cuda/attention/params.cuh"
#include "cq/cuda/attention/plan_base.cuh"
#include "cq/cuda/channels.cuh"
#include "cq/cuda/error.cuh"
#include "cq/error.hpp"
#include "cq/packed_codes.hpp"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>

namespace cq::cuda {

namespace detail {

using GeneralKernelFn = void (*)(AttentionBatch, GeneralLayout, int, const float*, float*, unsigned*, float*, unsigned);
using GeneralMergeFn = void (*)(AttentionBatch, int, int, int, float, const float*, const unsigned*, float*);
using LaneTablesKernelFn = void (*)(AttentionBatch, LaneTablesLayout, float*, unsigned);

/// How to launch the general kernel: score tables, main kernel, merge. Offsets are bytes into
/// the workspace.
struct GeneralLaunch {
  GeneralLayout layout{};
  int head_groups = 0;
  dim3 grid;
  unsigned lut_blocks = 0;
  GeneralKernelFn kernel = nullptr;
  GeneralMergeFn merge = nullptr;
  std::size_t merge_shared = 0;
  std::size_t luts = 0, partial = 0, partial_hist = 0, tables = no_buffer, merge_hist = no_buffer;
};

/// How to launch the lane-tables kernel (and the split combine when there are several splits).
struct LaneTablesLaunch {
  LaneTablesLayout layout{};
  dim3 grid;
  int threads = 0;
  /// The instantiations by PageMode, then without and with soft-capped logits
  /// (AttentionBatch::logits_soft_cap).
  LaneTablesKernelFn kernels[page_modes][2] = {};
  int round_tokens = 0;  // PageMode::round_pages serves pages of this many tokens or more; 0: never
  int pair_tokens = 0;   // PageMode::pair_pages serves pages of this many tokens or more; 0: never
  PageMode page_mode(const AttentionBatch& b) const {
    return b.page_tokens == 0                                      ? PageMode::contiguous
           : round_tokens > 0 && b.page_tokens >= round_tokens ? PageMode::round_pages
           : pair_tokens > 0 && b.page_tokens >= pair_tokens   ? PageMode::pair_pages
                                                               : PageMode::paged;
  }
  LaneTablesKernelFn pick(const AttentionBatch& b) const { return kernels[int(page_mode(b))][b.logits_soft_cap > 0.0f]; }
  std::size_t partial = 0;
};

/// Calls f.template operator()<GK, GV>() for the shape's key and value group counts; false if
/// either is not 16, 32 or 64.
template <class F>
bool with_lane_groups(const AttentionShape& s, F&& f) {
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

/// The lane-tables kernel's shared memory: the planes, then the small buffers.
template <int GK, int GV>
LaneTablesLayout lane_tables_layout(const AttentionShape& s, std::size_t* bytes) {
  LaneTablesLayout L{};
  L.head_dim = s.head_dim;
  L.full_cap = s.max_full;
  L.small_at = LaneTablesConfig<GK, GV>::planes * plane_bytes;
  const bool rows = GV == 64 && s.value_channels == 2;  // value-rows mode (plan_lane_tables' choice)
  *bytes = std::size_t(L.small_at) + std::size_t(lane_tables_small_words<GK, GV>(s.max_full, s.head_dim, rows)) * 4;
  return L;
}

/// Whether the lane-tables kernel serves a shape on this device.
inline bool lane_tables_apply(const AttentionShape& s, const DeviceLimits& dev) {
  if (s.head_dim > 256) return false;
  if (s.key_bits != 8 || s.value_bits != 8) return false;
  // Centroid rows of 1, 2, 4, 8 or 16 floats (with_centroid_rows).
  if (!is_one_of_channels<1, 2, 4, 8, 16>(s.key_channels) || !is_one_of_channels<1, 2, 4, 8, 16>(s.value_channels))
    return false;
  // Its table addresses carry the start of dynamic shared memory as an immediate.
  if (dev.reserved_shared != lane_tables_shared_base) return false;
  std::size_t need = 0;
  const bool groups_ok = with_lane_groups(s, [&]<int GK, int GV>() { lane_tables_layout<GK, GV>(s, &need); });
  return groups_ok && need <= std::size_t(dev.shared_max);
}

}  // namespace detail

/// A plan of fused attention for one batch shape: made by FusedAttention::plan, launched by
/// FusedAttention::run without allocating.
struct AttentionPlan {
  AttentionShape shape;
  AttentionKernel kernel = AttentionKernel::automatic;  // general, lane_tables or grouped_rows
  int splits = 0;                  // splits of the longest sequence's coded tokens
  int head_group = 0;              // query heads per block
  std::size_t shared_bytes = 0;    // dynamic shared memory of the main kernel's blocks
  std::size_t workspace_bytes = 0;  // device memory a launch needs
  std::size_t queries = 0;         // workspace offset of the queries as floats (for f16 / bf16 queries)
  bool dependent_launch = false;   // the split combine starts while the main kernel ends (sm_90+)
  void* workspace = nullptr;       // the caller's, or null: the FusedAttention's own
  detail::GeneralLaunch general;
  detail::LaneTablesLaunch lane_tables;
  detail::GroupedRowsLaunch grouped_rows;
};

namespace detail {

/// The general kernel's plan: heads per block, split length, tables in shared or global memory.
inline void plan_general(const AttentionShape& s, const DeviceLimits& dev, int max_split_tokens, AttentionPlan& plan) {
  GeneralLaunch& g = plan.general;
  GeneralLayout& L = g.layout;
  const int group = s.q_heads / s.kv_heads;
  L.head_dim = s.head_dim;
  L.key_groups = s.head_dim / s.key_channels;
  L.key_centroids = 1 << s.key_bits;
  L.value_groups = s.head_dim / s.value_channels;
  L.value_centroids = 1 << s.value_bits;
  L.full_cap = s.max_full;
  L.stage_words = std::max(L.key_groups * s.key_bits, L.value_groups * s.value_bits);
  // Longest split: scales with the histogram size (16 value groups: 4096 tokens, 32: 8192, 64:
  // 16384), unless set explicitly.
  L.split_tokens = max_split_tokens ? max_split_tokens : std::clamp(4096 * std::max(1, L.value_groups / 16), 512, 16384);
  L.tables_in_shared = true;
  // Heads per block: a power of two up to 8 (the kernel is instantiated for 1, 2, 4, 8) that
  // divides the group (a block's heads share one KV head), halved until two blocks fit a
  // multiprocessor's shared memory; tables go to global memory if even one head's do not fit.
  L.heads = 1;
  while (L.heads * 2 <= std::min(group, 8)) L.heads *= 2;
  while (group % L.heads != 0) L.heads /= 2;
  auto bytes = [&] { return std::size_t(L.shared_words()) * 4; };
  const std::size_t smem_max = std::size_t(dev.shared_max);
  while (L.heads > 1 && bytes() * 2 > smem_max) L.heads /= 2;
  while (bytes() > smem_max && L.split_tokens > 512) L.split_tokens /= 2;
  if (bytes() > smem_max) L.tables_in_shared = false;
  CQ_CHECK(bytes() <= smem_max, "cuda attention: ", bytes(), " bytes of shared memory per block needed, ", smem_max,
           " available");
  g.head_groups = (group + L.heads - 1) / L.heads;
  // Splits: whole 32-token blocks, at most split_tokens, and enough blocks for about two waves.
  const int blocks_per_sm = std::max(1, std::min(8, int(smem_max / bytes())));
  const long long items = (long long)s.batch * s.kv_heads * g.head_groups;
  int splits = std::max(1, (s.max_coded + L.split_tokens - 1) / L.split_tokens);
  const long long want = 2LL * dev.multiprocessors * blocks_per_sm;
  splits = std::max<long long>(splits, std::min<long long>((want + items - 1) / items, (s.max_coded + 1023) / 1024));
  L.split_tokens = std::max(32, ((s.max_coded + splits - 1) / splits + 31) / 32 * 32);
  splits = std::max(1, (s.max_coded + L.split_tokens - 1) / L.split_tokens);
  L.unit = hist_unit_for(L.split_tokens);
  g.grid = dim3(unsigned(splits), unsigned(s.kv_heads * g.head_groups), unsigned(s.batch));
  g.lut_blocks = s.max_coded > 0 ? unsigned(std::min(64, (L.lut_size() + 255) / 256)) : 0u;
  switch ((L.heads << 1) | (L.tables_in_shared ? 1 : 0)) {
    case 3: g.kernel = general_kernel<1, true>; break;
    case 2: g.kernel = general_kernel<1, false>; break;
    case 5: g.kernel = general_kernel<2, true>; break;
    case 4: g.kernel = general_kernel<2, false>; break;
    case 9: g.kernel = general_kernel<4, true>; break;
    case 8: g.kernel = general_kernel<4, false>; break;
    case 17: g.kernel = general_kernel<8, true>; break;
    default: g.kernel = general_kernel<8, false>; break;
  }
  allow_shared(reinterpret_cast<const void*>(g.kernel), bytes(), true);
  const std::size_t heads = std::size_t(s.batch) * s.q_heads;
  g.merge_shared = std::size_t(L.hist_size()) * sizeof(float);
  std::size_t ws = 0;
  g.partial = reserve(&ws, heads * splits * (2 + s.head_dim) * sizeof(float));
  g.partial_hist = reserve(&ws, heads * splits * L.hist_size() * sizeof(unsigned));
  g.luts = reserve(&ws, heads * L.lut_size() * sizeof(float));
  if (!L.tables_in_shared)
    g.tables = reserve(&ws, std::size_t(g.grid.x) * g.grid.y * g.grid.z * L.tables_per_block() * sizeof(float));
  if (g.merge_shared <= smem_max) {
    g.merge = general_merge_kernel<true>;
    allow_shared(reinterpret_cast<const void*>(g.merge), g.merge_shared, false);
  } else {
    g.merge = general_merge_kernel<false>;
    g.merge_hist = reserve(&ws, heads * L.hist_size() * sizeof(float));
    g.merge_shared = 0;
  }
  plan.kernel = AttentionKernel::general;
  plan.splits = splits;
  plan.head_group = L.heads;
  plan.shared_bytes = bytes();
  plan.workspace_bytes = ws;
}

/// The lane-tables kernel's plan: its instantiations (groups; value rows for 2-channel values at
/// 64 groups; by PageMode), occupancy, and the split count that minimises waves x split length,
/// each split then lengthened to a multiple of a warp's round of blocks (which may drop a split;
/// for every batch of the shape, contiguous or paged: page_tokens is not part of the shape).
template <int GK, int GV, bool Rows>
void plan_lane_tables(const AttentionShape& s, const DeviceLimits& dev, int max_split_tokens, AttentionPlan& plan) {
  LaneTablesLaunch& t = plan.lane_tables;
  using P = PageMode;
  constexpr int round = LaneTablesConfig<GK, GV>::round;
  // Pair pages: half rounds, only where a round is four blocks (CQ-8c8b); histogram mode only.
  constexpr int pair = page_chunk_blocks(P::pair_pages, round);
  constexpr bool pairs = !Rows && round == 2 * pair;
  t.kernels[int(P::contiguous)][0] = lane_tables_kernel<GK, GV, Rows, false, P::contiguous>;
  t.kernels[int(P::contiguous)][1] = lane_tables_kernel<GK, GV, Rows, true, P::contiguous>;
  t.kernels[int(P::paged)][0] = lane_tables_kernel<GK, GV, Rows, false, P::paged>;
  t.kernels[int(P::paged)][1] = lane_tables_kernel<GK, GV, Rows, true, P::paged>;
  if constexpr (!Rows) {
    t.kernels[int(P::round_pages)][0] = lane_tables_kernel<GK, GV, Rows, false, P::round_pages>;
    t.kernels[int(P::round_pages)][1] = lane_tables_kernel<GK, GV, Rows, true, P::round_pages>;
    if constexpr (pairs) {
      t.kernels[int(P::pair_pages)][0] = lane_tables_kernel<GK, GV, Rows, false, P::pair_pages>;
      t.kernels[int(P::pair_pages)][1] = lane_tables_kernel<GK, GV, Rows, true, P::pair_pages>;
    }
  }
  std::size_t smem = 0;
  LaneTablesLayout& L = t.layout;
  L = lane_tables_layout<GK, GV>(s, &smem);
  t.threads = LaneTablesConfig<GK, GV>::threads;
  for (const auto& by_cap : t.kernels)
    for (LaneTablesKernelFn f : by_cap)
      if (f) allow_shared(reinterpret_cast<const void*>(f), smem, true);
  int per_sm = 0;
  CQ_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, t.kernels[0][0], t.threads, smem));
  CQ_CHECK(per_sm > 0, "cuda attention: the lane-tables kernel does not fit a multiprocessor (", smem, " bytes)");
  const int group = s.q_heads / s.kv_heads;
  CQ_CHECK(std::size_t(s.batch) * s.kv_heads <= 65535, "cuda attention: batch x kv_heads ",
           std::size_t(s.batch) * s.kv_heads, " exceeds 65535");
  // Splits: with histograms at most 16384 tokens per entry (fixed point keeps 2^-17 of the
  // running reference; value rows sum floats, no limit), at least 512 tokens each; among those,
  // the count that minimises waves x split length (a wave is every multiprocessor's resident
  // blocks).
  const int subsets = LaneMap<GV>::subsets;
  const long long blocks32 = std::max(1, (s.max_coded + 31) / 32);
  const long long items = (long long)s.batch * s.q_heads, resident = (long long)per_sm * dev.multiprocessors;
  constexpr long long entry_tokens = 16384;
  long long lo = Rows ? 1 : (s.max_coded + entry_tokens * subsets - 1) / (entry_tokens * subsets), hi;
  if (max_split_tokens) {
    lo = std::max(lo, (s.max_coded + max_split_tokens - 1LL) / max_split_tokens);
    hi = lo;
  } else {
    hi = std::max(lo, std::min(lo * 32, blocks32 / 16));
  }
  // Value-rows mode: splits within the shared copy of their page ids.
  lo = std::max({1LL, lo, Rows ? (blocks32 + lane_tables_split_blocks - 1) / lane_tables_split_blocks : 1LL});
  hi = std::max(lo, hi);
  // A split also costs its score tables and its histogram x codebook product (L2 reads of the
  // key and value codebooks), counted as half as many 32-token blocks of codes.
  const long long overhead = 256LL * 4 * (GK * s.key_channels + GV * s.value_channels) / (2LL * 32 * (GK + GV));
  long long splits = wave_splits(items, resident, blocks32, lo, hi, overhead);
  // Splits start at a multiple of a warp's round of blocks (unless the caller fixed their length),
  // so that in pages of a round or more each round lies in one page (PageMode::round_pages), in
  // pages of half a round each half (pair_pages).
  long long per_split = (blocks32 + splits - 1) / splits;
  if (!max_split_tokens) per_split = (per_split + round - 1) / round * round;
  L.split_tokens = int(per_split * 32);
  splits = std::max(1, (s.max_coded + L.split_tokens - 1) / L.split_tokens);
  t.round_tokens = Rows || per_split % round != 0 ? 0 : 32 * round;
  t.pair_tokens = pairs && per_split % pair == 0 ? 32 * pair : 0;
  CQ_CHECK(splits <= 65535, "cuda attention: ", splits, " splits exceed 65535");
  L.unit = Rows ? 1.0f : hist_unit_for(L.split_tokens / subsets);
  t.grid = dim3(unsigned(group), unsigned(splits), unsigned(s.batch * s.kv_heads));
  std::size_t ws = 0;
  t.partial = reserve(&ws, std::size_t(items) * splits * (2 + s.head_dim) * sizeof(float));
  plan.kernel = AttentionKernel::lane_tables;
  plan.splits = int(splits);
  plan.head_group = 1;
  plan.shared_bytes = smem;
  plan.workspace_bytes = ws;
}

/// Checks a shape and plans it on `dev`: the grouped-rows kernel where it is preferred (or
/// forced), the lane-tables kernel where it applies (or is forced), else the general kernel.
/// Workspace offsets only; the caller attaches the memory.
inline AttentionPlan make_plan(const AttentionShape& s, const DeviceLimits& dev, AttentionKernel choice,
                               int max_split_tokens) {
  CQ_CHECK(s.batch > 0 && s.head_dim > 0, "cuda attention: batch ", s.batch, " and head_dim ", s.head_dim,
           " must be positive");
  CQ_CHECK(s.max_coded >= 0 && s.max_full >= 0, "cuda attention: max_coded ", s.max_coded, " and max_full ",
           s.max_full, " must not be negative");
  CQ_CHECK(s.q_heads > 0 && s.kv_heads > 0 && s.q_heads % s.kv_heads == 0, "cuda attention: q_heads ", s.q_heads,
           " is not a positive multiple of kv_heads ", s.kv_heads);
  CQ_CHECK(s.key_channels > 0 && s.value_channels > 0 && s.head_dim % s.key_channels == 0 &&
               s.head_dim % s.value_channels == 0,
           "cuda attention: head_dim ", s.head_dim, " is not a multiple of the key and value channels per group ",
           s.key_channels, " and ", s.value_channels);
  check_code_bits(s.key_bits, "cuda attention: key codes");
  check_code_bits(s.value_bits, "cuda attention: value codes");
  CQ_CHECK(s.rope_dim >= 0 && s.rope_dim <= s.head_dim && s.rope_dim % 2 == 0, "cuda attention: rope_dim ",
           s.rope_dim, " must be even and at most head_dim ", s.head_dim);
  const bool grouped_ok = grouped_rows_apply(s, dev);
  CQ_CHECK(s.rope_dim == 0 || (grouped_ok && (choice == AttentionKernel::automatic || choice == AttentionKernel::grouped_rows)),
           "cuda attention: keys before RoPE are rotated by the grouped-rows kernel only, which needs 8-bit key and ",
           "value codes of 2, 4 or 8 channels alike, head_dim 128, at most 16 query heads per KV head, rotate_half over ",
           "every channel or interleaved pairs, and the shared memory for ", s.max_full, " full-precision tokens; got ",
           s.key_bits, "/", s.value_bits, " bits, ", s.key_channels, "/", s.value_channels, " channels, head_dim ",
           s.head_dim, ", ", s.q_heads / s.kv_heads, " heads per KV head, ", rope_style_name(s.rope_style),
           " over ", s.rope_dim, " channels");
  const bool lanes_ok = s.rope_dim == 0 && lane_tables_apply(s, dev);
  CQ_CHECK(choice != AttentionKernel::lane_tables || lanes_ok, "cuda attention: the lane-tables kernel needs 8-bit key ",
           "and value codes with 16, 32 or 64 groups, head_dim <= 256, the shared memory and 1 KiB of reserved shared ",
           "memory per block; got ", s.key_bits, "/", s.value_bits, " bits, ", s.head_dim / s.key_channels, "/",
           s.head_dim / s.value_channels, " groups, ", dev.reserved_shared, " reserved bytes");
  CQ_CHECK(choice != AttentionKernel::grouped_rows || grouped_ok, "cuda attention: the grouped-rows kernel needs ",
           "8-bit key and value codes with 2, 4 or 8 channels per group, head_dim 128, at most 16 query heads per KV ",
           "head and the shared memory for ", s.max_full, " full-precision tokens; got ", s.key_bits, "/", s.value_bits,
           " bits, ", s.key_channels, "/", s.value_channels, " channels, head_dim ", s.head_dim, ", ",
           s.q_heads / s.kv_heads, " heads per KV head");
  AttentionPlan plan;
  plan.shape = s;
  if (choice == AttentionKernel::grouped_rows || s.rope_dim > 0 ||
      (choice == AttentionKernel::automatic && grouped_ok && grouped_rows_preferred(s, dev))) {
    plan.splits = plan_grouped_rows(s, dev, max_split_tokens, plan.grouped_rows, &plan.workspace_bytes);
    plan.kernel = AttentionKernel::grouped_rows;
    plan.head_group = s.q_heads / s.kv_heads;
    plan.shared_bytes = plan.grouped_rows.shared;
  } else if (choice != AttentionKernel::general && lanes_ok) {
    with_lane_groups(s, [&]<int GK, int GV>() {
      // 2-channel value groups at D = 128: value rows summed in registers (no histograms).
      if constexpr (GV == 64)
        if (s.value_channels == 2) return plan_lane_tables<GK, GV, true>(s, dev, max_split_tokens, plan);
      plan_lane_tables<GK, GV, false>(s, dev, max_split_tokens, plan);
    });
  } else {
    plan_general(s, dev, max_split_tokens, plan);
  }
  plan.queries = reserve(&plan.workspace_bytes, std::size_t(s.batch) * s.q_heads * s.head_dim * sizeof(float));
  plan.dependent_launch = dev.dependent_launch;
  return plan;
}

}  // namespace detail
}  // namespace cq::cuda
