#pragma once
/// Fused decode attention on CQ codes for a batch of sequences (one query token each), on the GPU.
///
/// Two kernels serve it (include/cq/cuda/attention/): 8-bit codes with 16, 32 or 64 groups
/// (CQ-2c8b, 4c8b, 8c8b at D = 128) take the lane-tables kernel (lane_tables/: lane-private
/// tables, no bank conflicts); every other configuration takes the general kernel (general/:
/// shared score tables and u32 histograms, any code width). Splits of long contexts are merged
/// flash-decoding style (combine.cuh, general/merge.cuh).
///
/// Both kernels are tested against the CPU oracle over the shared attention cases (tests/cuda).

#include "cq/codebook.hpp"
#include "cq/cuda/attention/combine.cuh"
#include "cq/cuda/attention/general/kernel.cuh"
#include "cq/cuda/attention/general/layout.cuh"
#include "cq/cuda/attention/general/lut.cuh"
#include "cq/cuda/attention/general/merge.cuh"
#include "cq/cuda/attention/lane_tables/kernel.cuh"
#include "cq/cuda/attention/params.cuh"
#include "cq/cuda/error.cuh"
#include "cq/cuda/memory.cuh"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace cq::cuda::detail {

/// Fixed-point scale of the histograms: a split of n tokens sums at most n weights <= 1, so the
/// scale is the largest power of two with n x scale < 2^32 (2^19 for 4096 tokens).
inline float hist_unit_for(int split_tokens) {
  int log2n = 0;
  while ((1 << log2n) < split_tokens) ++log2n;
  return float(1ull << (31 - log2n));
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
    int max_full;  // most full-precision tokens of any sequence
  };

  /// Which kernel runs: the lane-tables kernel (8-bit codes, lane-private tables; see
  /// attention/lane_tables/) where it applies, else the general one; or one of them forced
  /// (forcing the lane-tables kernel on a shape it does not serve throws).
  enum class Kernel { automatic, general, lane_tables };

  /// Runs attention for `batch` on `stream`. Code pointers must be 4-byte aligned (16-byte
  /// aligned ones, as cudaMalloc returns, take the lane-tables kernel's wide loads).
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
    const bool lanes_ok = lane_tables_apply(s);
    CQ_CHECK(kernel_ != Kernel::lane_tables || lanes_ok, "cuda attention: the lane-tables kernel needs 8-bit key and value ",
             "codes with 16, 32 or 64 groups, head_dim <= 256, the shared memory and 1 KiB of reserved shared ",
             "memory per block; got ", s.key_bits, "/", s.value_bits, " bits, ", s.head_dim / s.key_channels, "/",
             s.head_dim / s.value_channels, " groups, ", reserved_smem_, " reserved bytes");
    if (kernel_ != Kernel::general && lanes_ok)
      run_lane_tables(batch, s, stream, stages);
    else
      run_general(batch, s, stream, stages);
  }

  /// Forces a kernel (benchmarks, tests); Kernel::automatic by default.
  void set_kernel(Kernel k) { kernel_ = k; }
  Kernel last_kernel() const { return last_kernel_; }

 private:
  void run_general(const AttentionBatch& batch, const Shape& s, cudaStream_t stream, unsigned stages) {
    const int group = s.q_heads / s.kv_heads;
    detail::GeneralLayout L{};
    L.head_dim = s.head_dim;
    L.key_groups = s.head_dim / s.key_channels;
    L.key_centroids = 1 << s.key_bits;
    L.value_groups = s.head_dim / s.value_channels;
    L.value_centroids = 1 << s.value_bits;
    L.full_cap = s.max_full;
    L.stage_words = std::max(L.key_groups * s.key_bits, L.value_groups * s.value_bits);
    // Longest split: scales with the histogram size (16 value groups: 4096 tokens, 32: 8192, 64:
    // 16384; measured best on the H200, bench/cuda/NOTES.md), unless set explicitly.
    L.split_tokens = max_split_tokens_ ? max_split_tokens_ : std::clamp(4096 * std::max(1, L.value_groups / 16), 512, 16384);
    L.tables_in_shared = true;
    // Heads per block: a power of two up to 8 (the kernel is instantiated for 1, 2, 4, 8), halved
    // until two blocks fit a multiprocessor's shared memory; tables go to global memory if even
    // one head's do not fit.
    L.heads = 1;
    while (L.heads * 2 <= std::min(group, 8)) L.heads *= 2;
    auto bytes = [&] { return std::size_t(L.shared_words()) * 4; };
    while (L.heads > 1 && bytes() * 2 > std::size_t(smem_max_)) L.heads /= 2;
    while (bytes() > std::size_t(smem_max_) && L.split_tokens > 512) L.split_tokens /= 2;
    if (bytes() > std::size_t(smem_max_)) L.tables_in_shared = false;
    CQ_CHECK(bytes() <= std::size_t(smem_max_), "cuda attention: ", bytes(), " bytes of shared memory per block needed, ",
             smem_max_, " available");
    const int head_groups = (group + L.heads - 1) / L.heads;
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
    const std::size_t lut_need = std::size_t(batch.batch) * s.q_heads * L.key_groups * L.key_centroids;
    if (luts_.size() < lut_need) luts_ = DeviceBuffer<float>(lut_need);
    const dim3 grid(unsigned(splits), unsigned(s.kv_heads * head_groups), unsigned(batch.batch));
    if (!L.tables_in_shared) {
      const std::size_t t = std::size_t(grid.x) * grid.y * grid.z * L.tables_per_block();
      if (tables_.size() < t) tables_ = DeviceBuffer<float>(t);
    }
    if (s.max_coded > 0) {
      const unsigned lut_blocks = unsigned(std::min(64, (L.key_groups * L.key_centroids + 255) / 256));
      detail::score_table_kernel<<<dim3(lut_blocks, unsigned(batch.batch * s.q_heads)), 256, 0, stream>>>(batch, L.key_groups, L.key_centroids, luts_.data());
      CQ_CUDA_CHECK_LAUNCH(score_table_kernel);
    }
    auto launch = [&](auto kernel) {
      const int key = (L.heads << 1) | (L.tables_in_shared ? 1 : 0);
      if (configured_[key] < bytes()) {
        CQ_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared));
        CQ_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes())));
        configured_[key] = bytes();
      }
      kernel<<<grid, detail::general_threads, bytes(), stream>>>(batch, L, head_groups, luts_.data(), partial_.data(),
                                                              partial_hist_.data(), tables_.data(), stages);
      CQ_CUDA_CHECK_LAUNCH(general_kernel);
    };
    switch ((L.heads << 1) | (L.tables_in_shared ? 1 : 0)) {
      case 3: launch(detail::general_kernel<1, true>); break;
      case 2: launch(detail::general_kernel<1, false>); break;
      case 5: launch(detail::general_kernel<2, true>); break;
      case 4: launch(detail::general_kernel<2, false>); break;
      case 9: launch(detail::general_kernel<4, true>); break;
      case 8: launch(detail::general_kernel<4, false>); break;
      case 17: launch(detail::general_kernel<8, true>); break;
      default: launch(detail::general_kernel<8, false>); break;
    }
    const std::size_t merge_smem = std::size_t(L.hist_size()) * sizeof(float);
    if (merge_smem <= std::size_t(smem_max_)) {
      if (merge_smem > merge_configured_) {
        CQ_CUDA_CHECK(cudaFuncSetAttribute(detail::general_merge_kernel<true>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           int(merge_smem)));
        merge_configured_ = merge_smem;
      }
      detail::general_merge_kernel<true><<<unsigned(batch.batch * s.q_heads), 256, merge_smem, stream>>>(
          batch, splits, L.value_groups, L.value_centroids, L.unit, partial_.data(), partial_hist_.data(), nullptr);
    } else {
      const std::size_t scratch = std::size_t(batch.batch) * s.q_heads * L.hist_size();
      if (merge_hist_.size() < scratch) merge_hist_ = DeviceBuffer<float>(scratch);
      detail::general_merge_kernel<false><<<unsigned(batch.batch * s.q_heads), 256, 0, stream>>>(
          batch, splits, L.value_groups, L.value_centroids, L.unit, partial_.data(), partial_hist_.data(), merge_hist_.data());
    }
    CQ_CUDA_CHECK_LAUNCH(general_merge_kernel);
    last_splits_ = splits;
    last_hg_ = L.heads;
    last_smem_ = bytes();
    last_kernel_ = Kernel::general;
  }

  /// Shared memory of the lane-tables kernel: the planes, then the small buffers.
  template <int GK, int GV>
  detail::LaneTablesLayout lane_tables_layout(const Shape& s, std::size_t* bytes) const {
    detail::LaneTablesLayout L{};
    L.head_dim = s.head_dim;
    L.full_cap = s.max_full;
    L.small_at = detail::LaneTablesConfig<GK, GV>::planes * detail::plane_bytes;
    *bytes = std::size_t(L.small_at) + std::size_t(detail::lane_tables_small_words<GK, GV>(s.max_full, s.head_dim)) * 4;
    return L;
  }
  template <int GK, int GV>
  std::size_t lane_tables_shared_bytes(const Shape& s) const {
    std::size_t bytes = 0;
    lane_tables_layout<GK, GV>(s, &bytes);
    return bytes;
  }
  /// Calls f.template operator()<GK, GV>() for the shape's group counts; false if not 16/32/64.
  template <class F>
  static bool with_lane_groups(const Shape& s, F&& f) {
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
  bool lane_tables_apply(const Shape& s) const {
    if (s.head_dim > 256) return false;
    if (s.key_bits != 8 || s.value_bits != 8) return false;
    // Its table addresses carry the start of dynamic shared memory as an immediate.
    if (reserved_smem_ != detail::lane_tables_shared_base) return false;
    std::size_t need = 0;
    const bool groups_ok = with_lane_groups(s, [&]<int GK, int GV>() { need = lane_tables_shared_bytes<GK, GV>(s); });
    return groups_ok && need <= std::size_t(smem_max_);
  }

  void run_lane_tables(const AttentionBatch& batch, const Shape& s, cudaStream_t stream, unsigned stages) {
    with_lane_groups(s, [&]<int GK, int GV>() {
      // 2-channel value groups at D = 128: value rows summed in registers (no histograms).
      if constexpr (GV == 64)
        if (s.value_channels == 2) return launch_lane_tables<GK, GV, true>(batch, s, stream, stages);
      launch_lane_tables<GK, GV, false>(batch, s, stream, stages);
    });
  }

  template <int GK, int GV, bool Rows>
  void launch_lane_tables(const AttentionBatch& batch, const Shape& s, cudaStream_t stream, unsigned stages) {
    auto* kernel = detail::lane_tables_kernel<GK, GV, Rows>;
    std::size_t smem = 0;
    detail::LaneTablesLayout L = lane_tables_layout<GK, GV>(s, &smem);
    const int key = (GK / 16) * 8 + GV / 16 + (Rows ? 64 : 0);
    constexpr int threads = detail::LaneTablesConfig<GK, GV>::threads;
    // Attributes and occupancy are asked once per (kernel, shared size): host time per decode
    // step counts when the GPU would otherwise wait for the launch.
    if (lane_configured_[key] != smem) {
      CQ_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared));
      CQ_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
      int blocks = 0;
      CQ_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, smem));
      CQ_CHECK(blocks > 0, "cuda attention: the lane-tables kernel does not fit a multiprocessor (", smem, " bytes)");
      lane_configured_[key] = smem;
      lane_per_sm_[key] = blocks;
    }
    const int per_sm = lane_per_sm_[key];
    const int group = s.q_heads / s.kv_heads;
    CQ_CHECK(std::size_t(batch.batch) * s.kv_heads <= 65535, "cuda attention: batch x kv_heads ",
             std::size_t(batch.batch) * s.kv_heads, " exceeds 65535");
    // Splits: with histograms at most 16384 tokens per entry (fixed point keeps 2^-17 of the
    // running reference; 8192 cost 4c8b a second split, 0.42 -> 0.37 ms; value rows sum floats,
    // no limit), at least 512 tokens each; among those, the count that minimises waves x split
    // length (a wave is every multiprocessor's resident blocks).
    const int subsets = detail::LaneMap<GV>::subsets;
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
    CQ_CUDA_CHECK_LAUNCH(lane_tables_kernel);
    if (splits > 1) {  // one split writes the output itself
      detail::combine_kernel<<<unsigned(items), 128, 0, stream>>>(batch, int(splits), partial_.data());
      CQ_CUDA_CHECK_LAUNCH(combine_kernel);
    }
    last_splits_ = int(splits);
    last_hg_ = 1;
    last_smem_ = smem;
    last_kernel_ = Kernel::lane_tables;
  }

 public:

  /// Longest split in tokens (a tuning knob; power of two, 512..16384; 0 restores the default,
  /// chosen by histogram size for the general kernel and by waves of blocks for the lane-tables
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
  std::size_t lane_configured_[128] = {};  // dynamic shared size set, per lane-tables kernel
  int lane_per_sm_[128] = {};               // its resident blocks per multiprocessor at that size
};

}  // namespace cq::cuda
