#pragma once
/// Planning the grouped-rows kernel (kernel.cuh): where it serves, where the automatic choice
/// takes it, its instantiation, splits and workspace.

#include "cq/cuda/attention/grouped_rows/kernel.cuh"
#include "cq/cuda/attention/params.cuh"
#include "cq/cuda/attention/plan_base.cuh"
#include "cq/error.hpp"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>

namespace cq::cuda::detail {

using GroupedRowsKernelFn = void (*)(AttentionBatch, GroupedRowsLayout, const unsigned char*, float*);

/// How to launch the grouped-rows kernel (and the split combine when there are several splits).
struct GroupedRowsLaunch {
  GroupedRowsLayout layout{};
  dim3 grid;
  GroupedRowsKernelFn kernel = nullptr;
  GroupedRowsKernelFn capped = nullptr;  // the same for soft-capped logits (AttentionBatch::logits_soft_cap)
  int threads = 0;
  std::size_t shared = 0;  // dynamic shared memory of a block
  std::size_t partial = 0;
  std::size_t codebooks = 0;  // the KV heads' half-precision codebooks (HalfCodebooks)
  bool key_partners = false;  // rotate_half pairs' key groups share a scale (half_codebooks_kernel)
};

/// Whether the grouped-rows kernel serves a shape on this device (instantiated for equal key and
/// value channels: CQ-2c8b, 4c8b, 8c8b; keys before RoPE with rotate_half over every channel or
/// interleaved pairs).
inline bool grouped_rows_apply(const AttentionShape& s, const DeviceLimits& dev) {
  const int c = s.key_channels;
  const bool rope_ok = s.rope_dim == 0 || (s.rope_dim % 2 == 0 && s.rope_dim <= s.head_dim &&
                                           (s.rope_style == RopeStyle::interleaved || s.rope_dim == s.head_dim));
  return s.head_dim == GroupedRowsConfig::head_dim && s.key_bits == 8 && s.value_bits == 8 &&
         (c == 2 || c == 4 || c == 8) && s.value_channels == c &&
         s.q_heads / s.kv_heads <= GroupedRowsConfig::max_group && rope_ok &&
         GroupedRowsConfig::shared_bytes(s.max_full, GroupedRowsConfig::head_tiles(s.q_heads / s.kv_heads), c,
                                         s.rope_dim > 0 ? c : 0) <= std::size_t(dev.shared_max);
}

/// Whether the automatic choice takes the grouped-rows kernel over the lane-tables kernel: where
/// it measured faster on the H200 (docs/design/cuda-attention.md, "The grouped-rows kernel" and
/// "Session 16"): groups of 4 or more query heads; at 2c8b past 8K coded tokens from (sequence,
/// KV head) blocks for an eighth of the multiprocessors (batch 4 of 4 KV heads); otherwise from
/// blocks for a quarter of them (splits fill the rest), up to 8K tokens at every code width, past
/// 8K at 4c8b and 8c8b from 7 heads. Where blocks are fewer, a block's prologue (the codebooks into
/// shared memory) outweighs its share of the tokens.
inline bool grouped_rows_preferred(const AttentionShape& s, const DeviceLimits& dev) {
  const int group = s.q_heads / s.kv_heads, c = s.key_channels;
  const long long items = (long long)s.batch * s.kv_heads;
  if (group < 4) return false;
  if (c == 2 && s.max_coded > 8192) return items >= dev.multiprocessors / 8;
  if (4 * items < dev.multiprocessors) return false;
  return s.max_coded <= 8192 || group >= 7;
}

/// Calls f.template operator()<C, NT, Rope>() for the shape's channels per group (2, 4 or 8; keys
/// and values alike), column tiles of heads (1 for groups of up to 8, else 2) and whether keys are
/// rotated in the kernel.
template <class F>
void with_grouped_instance(const AttentionShape& s, F&& f) {
  auto tiles = [&]<int C, bool Rope>() {
    return GroupedRowsConfig::head_tiles(s.q_heads / s.kv_heads) == 1 ? f.template operator()<C, 1, Rope>()
                                                                       : f.template operator()<C, 2, Rope>();
  };
  auto rope = [&]<int C>() {
    return s.rope_dim > 0 ? tiles.template operator()<C, true>() : tiles.template operator()<C, false>();
  };
  switch (s.key_channels) {
    case 2: return rope.template operator()<2>();
    case 4: return rope.template operator()<4>();
    default: return rope.template operator()<8>();
  }
}

/// The grouped-rows kernel's plan: one block per (sequence, KV head, split), one block per
/// multiprocessor (the codebooks fill its shared memory). Splits of at least 256 tokens (two
/// rounds of the warps' tiles), no more than fill one wave, as many as make the fewest waves x
/// split length (wave_splits; a block's prologue -- the codebooks from L2 -- counted as 256
/// tokens): a split count that leaves a second wave of a few blocks can nearly double the
/// kernel's time.
/// Fills `g` (kernel, threads, shared memory); returns the splits. Workspace: `*workspace` bytes
/// (partial states, then the half-precision codebooks).
inline int plan_grouped_rows(const AttentionShape& s, const DeviceLimits& dev, int max_split_tokens,
                             GroupedRowsLaunch& g, std::size_t* workspace) {
  with_grouped_instance(s, [&]<int C, int NT, bool Rope>() {
    g.kernel = grouped_rows_kernel<C, C, NT, Rope, false>;
    g.capped = grouped_rows_kernel<C, C, NT, Rope, true>;
    g.threads = GroupedRowsConfig::warps(NT, Rope ? C : 0) * 32;
    g.shared = GroupedRowsConfig::shared_bytes(s.max_full, NT, C, Rope ? C : 0);
  });
  g.key_partners = s.rope_dim > 0 && s.rope_style == RopeStyle::rotate_half;
  allow_shared(reinterpret_cast<const void*>(g.kernel), g.shared, true);
  allow_shared(reinterpret_cast<const void*>(g.capped), g.shared, true);
  const long long items = (long long)s.batch * s.kv_heads;
  CQ_CHECK(items <= 65535, "cuda attention: batch x kv_heads ", items, " exceeds 65535");
  int per_sm = 0;
  CQ_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, g.kernel, g.threads, g.shared));
  CQ_CHECK(per_sm > 0, "cuda attention: the grouped-rows kernel does not fit a multiprocessor (", g.shared, " bytes)");
  const long long blocks32 = std::max(1, (s.max_coded + 31) / 32);
  long long splits = std::max(1LL, max_split_tokens ? (s.max_coded + max_split_tokens - 1LL) / max_split_tokens : 1LL);
  if (!max_split_tokens) {
    const long long resident = (long long)per_sm * dev.multiprocessors;
    splits = wave_splits(items, resident, blocks32, 1,
                         std::max(1LL, std::min<long long>(s.max_coded / 256, (resident + items - 1) / items)), 8);
  }
  g.layout.split_tokens = int(std::max(32LL, ((s.max_coded + splits - 1) / splits + 31) / 32 * 32));
  splits = std::max(1, (s.max_coded + g.layout.split_tokens - 1) / g.layout.split_tokens);
  CQ_CHECK(splits <= 65535, "cuda attention: ", splits, " splits exceed 65535");
  g.layout.full_cap = s.max_full;
  g.grid = dim3(unsigned(splits), unsigned(items));
  std::size_t ws = 0;
  g.partial = reserve(&ws, std::size_t(s.batch) * s.q_heads * splits * (2 + s.head_dim) * sizeof(float));
  g.codebooks = reserve(&ws, std::size_t(s.kv_heads) * HalfCodebooks::bytes);
  *workspace = ws;
  return int(splits);
}

}  // namespace cq::cuda::detail
