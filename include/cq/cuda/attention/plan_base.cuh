#pragma once
/// What attention plans are made for, and the planner's small tools: the kernel choice, the batch
/// shape, the device's limits, workspace offsets and shared-memory attributes. Used by plan.cuh
/// and by each kernel's own planning (grouped_rows/plan.cuh).

#include "cq/cuda/error.cuh"
#include "cq/rope.hpp"

#include <cuda_runtime.h>

#include <cstddef>

namespace cq::cuda {

/// Which kernel a plan runs (the benchmark's integer ids: 0, 1, 2, 3).
enum class AttentionKernel {
  automatic,    // grouped rows for large GQA groups where it measured faster, else lane tables
                // where they apply, else the general kernel
  general,      // any code width and group count (attention/general/)
  lane_tables,  // 8-bit codes with 16, 32 or 64 groups (attention/lane_tables/)
  grouped_rows,  // 8-bit codes, 2/4/8 channels, head_dim 128, GQA groups <= 16 (attention/grouped_rows/)
};

/// What a plan is made for: the batch's heads, codebooks and longest sequence.
struct AttentionShape {
  int batch = 0, q_heads = 0, kv_heads = 0, head_dim = 0;
  int key_channels = 0, key_bits = 0, value_channels = 0, value_bits = 0;
  int max_coded = 0;  // longest coded length in the batch
  int max_full = 0;   // most full-precision tokens of any sequence
  /// Keys stored before RoPE (AttentionBatch::rope): their rotary channels and pair style; 0: keys
  /// after RoPE. Only the grouped-rows kernel rotates keys (rotate_half: rope_dim == head_dim).
  int rope_dim = 0;
  RopeStyle rope_style = RopeStyle::rotate_half;
  friend bool operator==(const AttentionShape&, const AttentionShape&) = default;
};

/// The device's limits planning reads.
struct DeviceLimits {
  int shared_max = 0;       // opt-in dynamic shared memory per block
  int multiprocessors = 0;
  int reserved_shared = 0;  // shared memory the driver reserves per block
  bool dependent_launch = false;  // programmatic dependent launch (compute capability 9.0+)

  /// The current device's.
  static DeviceLimits current() {
    DeviceLimits d;
    int device = 0;
    CQ_CUDA_CHECK(cudaGetDevice(&device));
    CQ_CUDA_CHECK(cudaDeviceGetAttribute(&d.shared_max, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    CQ_CUDA_CHECK(cudaDeviceGetAttribute(&d.multiprocessors, cudaDevAttrMultiProcessorCount, device));
    CQ_CUDA_CHECK(cudaDeviceGetAttribute(&d.reserved_shared, cudaDevAttrReservedSharedMemoryPerBlock, device));
    int major = 0;
    CQ_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    d.dependent_launch = major >= 9;
    return d;
  }
};

namespace detail {

/// A workspace offset for a buffer a plan does not use.
constexpr std::size_t no_buffer = ~std::size_t{0};

/// Fixed-point scale of the histograms: a split of n tokens sums at most n weights <= 1, so the
/// scale is the largest power of two with n x scale < 2^32 (2^19 for 4096 tokens).
inline float hist_unit_for(int split_tokens) {
  int log2n = 0;
  while ((1 << log2n) < split_tokens) ++log2n;
  return float(1ull << (31 - log2n));
}

/// Room for `bytes` more in a workspace of `*size` bytes: returns their offset (256-byte aligned,
/// as cudaMalloc's buffers are) and grows *size.
inline std::size_t reserve(std::size_t* size, std::size_t bytes) {
  const std::size_t at = (*size + 255) / 256 * 256;
  *size = at + bytes;
  return at;
}

/// The split count in [lo, hi] that minimises waves x split length: `items` (sequence, head)
/// pairs cut into `splits` blocks each, `resident` blocks running at once (a wave), a split of the
/// longest sequence's `blocks32` 32-token blocks of codes costing its share of them plus a block's
/// fixed work, `overhead`, in the same unit. The fewest splits among equals (least combining).
inline long long wave_splits(long long items, long long resident, long long blocks32, long long lo, long long hi,
                             long long overhead) {
  long long splits = lo, best = -1;
  for (long long sp = lo; sp <= hi; ++sp) {
    const long long cost = (items * sp + resident - 1) / resident * ((blocks32 + sp - 1) / sp + overhead);
    if (best < 0 || cost < best) best = cost, splits = sp;
  }
  return splits;
}

/// Lets `kernel` use `bytes` of dynamic shared memory with the largest shared carveout (raising
/// the limit only: plans of other shapes may need more).
inline void allow_shared(const void* kernel, std::size_t bytes, bool carveout) {
  if (carveout)
    CQ_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                       cudaSharedmemCarveoutMaxShared));
  cudaFuncAttributes attr{};
  CQ_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
  if (std::size_t(attr.maxDynamicSharedSizeBytes) < bytes)
    CQ_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
}

}  // namespace detail
}  // namespace cq::cuda
