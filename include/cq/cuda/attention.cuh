#pragma once
/// Fused decode attention on CQ codes for a batch of sequences (one query token each), on the GPU.
///
/// Three kernels serve it (include/cq/cuda/attention/): 8-bit codes with 16, 32 or 64 groups
/// (CQ-2c8b, 4c8b, 8c8b at D = 128) take the lane-tables kernel (lane_tables/: lane-private
/// tables, no bank conflicts, lookups per query head), or, for large GQA groups, the grouped-rows
/// kernel (grouped_rows/: rows decoded once per KV head, tensor cores for the group's heads);
/// every other configuration takes the general kernel (general/: shared score tables and u32
/// histograms, any code width). Splits of long contexts are merged flash-decoding style
/// (combine.cuh, general/merge.cuh).
///
/// Keys coded before RoPE (AttentionShape::rope_dim, AttentionBatch::rope) are rotated to their
/// positions inside the grouped-rows kernel, which then serves every group size (MHA included).
///
/// Codes are read in contiguous buffers per (sequence, KV head) or in the pages of a pool with the
/// CPU cache's layout, through page tables (params.cuh, DeviceKVCodes; pages of a power of two of
/// tokens from 32 on): a page copied between host and device is valid on both sides. The sinks'
/// and windows' rows likewise: float rows per sequence, or the full-precision pages of the CPU
/// cache's layout in f32, f16 or bf16 (FullRowPages). Queries and outputs are f32, f16 or bf16;
/// an optional log-sum-exp per (sequence, query head) lets an engine merge the result with
/// attention over other tokens.
///
/// plan(shape) chooses the kernel, splits and shared memory once per batch shape (plan.cuh);
/// run(batch, plan, stream) only launches, so a decode step can be captured in a CUDA graph.
///
/// Every kernel is tested against the CPU oracle over the shared attention cases, with contiguous
/// and with paged codes (tests/cuda).

#include "cq/cuda/attention/combine.cuh"
#include "cq/cuda/attention/general/lut.cuh"
#include "cq/cuda/attention/params.cuh"
#include "cq/cuda/attention/plan.cuh"
#include "cq/cuda/error.cuh"
#include "cq/cuda/memory.cuh"
#include "cq/error.hpp"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <utility>
#include <vector>

namespace cq::cuda {

class FusedAttention;

namespace detail {

/// Queries of element type T (__half or __nv_bfloat16) as floats: n elements from src into dst.
template <device_element T>
__global__ void queries_to_float_kernel(const T* src, std::size_t n, float* dst) {
  for (std::size_t i = std::size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += std::size_t(gridDim.x) * blockDim.x)
    dst[i] = element_to_float(src[i]);
}

/// The split combine of a plan's partial states, a dependent of the main kernel where the device
/// allows (dependent_launch.cuh).
inline void launch_combine(const AttentionBatch& batch, const AttentionPlan& plan, const float* partial,
                           cudaStream_t stream) {
  launch_kernel("combine_kernel", combine_kernel<>, dim3(unsigned(batch.batch * batch.q_heads)), dim3(128), 0,
                stream, plan.dependent_launch, batch, plan.splits, partial);
}

/// Launches a plan on `stream` with only the `stages` of it switched on (AttentionStage; timing
/// experiments); `workspace` holds plan.workspace_bytes. Allocates nothing.
inline void launch(const AttentionBatch& in, const AttentionPlan& plan, void* workspace, cudaStream_t stream,
                   unsigned stages) {
  auto* base = static_cast<unsigned char*>(workspace);
  AttentionBatch batch = in;
  if (batch.q_type != DType::f32) {  // the kernels read f32 queries (AttentionBatch::query)
    const std::size_t n = std::size_t(batch.batch) * batch.q_heads * batch.head_dim;
    float* q = reinterpret_cast<float*>(base + plan.queries);
    visit_element_type(batch.q_type, [&](auto t) {
      using T = decltype(t);
      queries_to_float_kernel<T><<<unsigned(std::min<std::size_t>((n + 255) / 256, 1024)), 256, 0, stream>>>(
          static_cast<const T*>(batch.q), n, q);
    });
    CQ_CUDA_CHECK_LAUNCH(queries_to_float_kernel);
    batch.q = q;
    batch.q_type = DType::f32;
  }
  auto at = [&](std::size_t offset) { return offset == no_buffer ? nullptr : reinterpret_cast<float*>(base + offset); };
  if (plan.kernel == AttentionKernel::grouped_rows) {
    const GroupedRowsLaunch& g = plan.grouped_rows;
    float* partial = at(g.partial);
    unsigned char* codebooks = base + g.codebooks;
    half_codebooks_kernel<><<<dim3(64, 2, unsigned(batch.kv_heads)), 256, 0, stream>>>(
        batch, plan.shape.key_channels, plan.shape.value_channels, codebooks, g.key_partners);
    CQ_CUDA_CHECK_LAUNCH(half_codebooks_kernel);
    (batch.logits_soft_cap > 0.0f ? g.capped : g.kernel)<<<g.grid, unsigned(g.threads), plan.shared_bytes, stream>>>(
        batch, g.layout, codebooks, partial);
    CQ_CUDA_CHECK_LAUNCH(grouped_rows_kernel);
    if (plan.splits > 1) {
      launch_combine(batch, plan, partial, stream);
    }
    return;
  }
  if (plan.kernel == AttentionKernel::lane_tables) {
    const LaneTablesLaunch& t = plan.lane_tables;
    float* partial = at(t.partial);
    t.pick(batch)<<<t.grid, t.threads, plan.shared_bytes, stream>>>(batch, t.layout, partial, stages);
    CQ_CUDA_CHECK_LAUNCH(lane_tables_kernel);
    if (plan.splits > 1) {  // one split writes the output itself
      launch_combine(batch, plan, partial, stream);
    }
    return;
  }
  const GeneralLaunch& g = plan.general;
  const GeneralLayout& L = g.layout;
  float* luts = at(g.luts);
  if (g.lut_blocks > 0) {
    score_table_kernel<><<<dim3(g.lut_blocks, unsigned(batch.batch * batch.q_heads)), 256, 0, stream>>>(
        batch, L.key_groups, L.key_centroids, luts);
    CQ_CUDA_CHECK_LAUNCH(score_table_kernel);
  }
  float* partial = at(g.partial);
  auto* partial_hist = reinterpret_cast<unsigned*>(base + g.partial_hist);
  g.kernel<<<g.grid, general_threads, plan.shared_bytes, stream>>>(batch, L, g.head_groups, luts, partial,
                                                                   partial_hist, at(g.tables), stages);
  CQ_CUDA_CHECK_LAUNCH(general_kernel);
  g.merge<<<unsigned(batch.batch * batch.q_heads), 256, g.merge_shared, stream>>>(
      batch, plan.splits, L.value_groups, L.value_centroids, L.unit, partial, partial_hist, at(g.merge_hist));
  CQ_CUDA_CHECK_LAUNCH(general_merge_kernel);
}

/// Benchmark-only: runs `plan` with only some stages (AttentionStage bits) switched on, to locate
/// the time (bench/cuda). The output is meaningless unless `stages` is stage_all.
inline void run_stages(FusedAttention& attention, const AttentionBatch& batch, const AttentionPlan& plan,
                       cudaStream_t stream, unsigned stages);

}  // namespace detail

/// Plans and runs fused attention. Owns a workspace for the plans it makes (grown by plan(), never
/// by run()); one object per stream, not thread-safe.
class FusedAttention {
 public:
  using Kernel = AttentionKernel;

  /// Plans a batch shape on the current device, with this object's workspace (grown if the plan
  /// needs more: plan every shape before capturing a graph that runs them).
  AttentionPlan plan(const AttentionShape& s) {
    AttentionPlan p = detail::make_plan(s, limits(), kernel_, max_split_tokens_);
    if (workspace_.size() < p.workspace_bytes) workspace_ = DeviceBuffer<unsigned char>(p.workspace_bytes);
    return p;
  }
  /// Plans a batch shape with the caller's workspace (`bytes` of device memory at `workspace`,
  /// at least the plan's workspace_bytes: plan(s) on another object tells how much).
  AttentionPlan plan(const AttentionShape& s, void* workspace, std::size_t bytes) {
    AttentionPlan p = detail::make_plan(s, limits(), kernel_, max_split_tokens_);
    CQ_CHECK(bytes >= p.workspace_bytes && (workspace != nullptr || p.workspace_bytes == 0),
             "cuda attention: the plan needs ", p.workspace_bytes, " bytes of workspace, got ", bytes, " at ", workspace);
    p.workspace = workspace;
    return p;
  }

  /// Runs a plan on `batch` (whose batch size and heads are the plan's). Code pointers must be
  /// 4-byte aligned (16-byte aligned ones, as cudaMalloc returns, take the lane-tables kernel's
  /// wide loads). Allocates nothing. Throws cq::Error, launching nothing, if the batch is not the
  /// plan's shape, q or out is unset, a dtype is not F32/F16/BF16, page_tokens is not 0 or a power
  /// of two from 32 on, or full_pages (when set) has rows per page not a power of two, pages too
  /// small for every head's rows, not a multiple of 16 bytes or over 4 GiB, or a pool off 16 bytes.
  void run(const AttentionBatch& batch, const AttentionPlan& p, cudaStream_t stream = nullptr) {
    launch_checked(batch, p, stream, detail::stage_all);
  }
  /// Plans (once per shape; the last 16 plans are kept) and runs. Engines whose shapes change
  /// every step plan and run themselves.
  void run(const AttentionBatch& batch, const AttentionShape& s, cudaStream_t stream = nullptr) {
    const AttentionPlan* p = nullptr;
    for (const auto& [shape, plan] : plans_)
      if (shape == s) p = &plan;
    if (!p) {
      if (plans_.size() == 16) plans_.erase(plans_.begin());  // shapes change with the context length
      plans_.emplace_back(s, plan(s));
      p = &plans_.back().second;
    }
    run(batch, *p, stream);
  }

  /// Forces a kernel (benchmarks, tests; forcing the lane-tables kernel on a shape it does not
  /// serve throws at plan time); Kernel::automatic by default. Applies to plans made afterwards.
  void set_kernel(Kernel k) {
    kernel_ = k;
    plans_.clear();
  }
  /// Longest split in tokens (a tuning knob; power of two, 512..16384; 0 restores the default,
  /// chosen by histogram size for the general kernel and by waves of blocks for the lane-tables
  /// kernel). In the general kernel longer splits mean fewer partial histograms to write and
  /// merge, and larger shared score buffers (fewer blocks per SM). Applies to plans made afterwards.
  void set_max_split_tokens(int t) {
    CQ_CHECK(t == 0 || (t >= 512 && t <= 16384 && (t & (t - 1)) == 0), "cuda attention: max split tokens ", t,
             " must be 0 (the default) or a power of two in 512..16384");
    max_split_tokens_ = t;
    plans_.clear();
  }
  /// What the last run launched.
  Kernel last_kernel() const { return last_.kernel; }
  int last_splits() const { return last_.splits; }
  int last_head_group() const { return last_.head_group; }
  std::size_t last_shared_bytes() const { return last_.shared_bytes; }

 private:
  friend void detail::run_stages(FusedAttention&, const AttentionBatch&, const AttentionPlan&, cudaStream_t, unsigned);

  const DeviceLimits& limits() {
    if (!limits_ready_) {
      limits_ = DeviceLimits::current();
      limits_ready_ = true;
    }
    return limits_;
  }
  void launch_checked(const AttentionBatch& batch, const AttentionPlan& p, cudaStream_t stream, unsigned stages) {
    const AttentionShape& s = p.shape;
    CQ_CHECK(batch.batch == s.batch && batch.q_heads == s.q_heads && batch.kv_heads == s.kv_heads &&
                 batch.head_dim == s.head_dim,
             "cuda attention: the batch (", batch.batch, " sequences, ", batch.q_heads, "/", batch.kv_heads,
             " heads, head_dim ", batch.head_dim, ") is not the plan's (", s.batch, ", ", s.q_heads, "/", s.kv_heads,
             ", ", s.head_dim, ")");
    CQ_CHECK(valid_page_tokens(batch.page_tokens), "cuda attention: page_tokens ", batch.page_tokens,
             " must be 0 (contiguous codes) or a power of two from 32 on");
    CQ_CHECK(std::isfinite(batch.scale), "cuda attention: scale ", batch.scale, " is not finite");
    cq::detail::check_soft_cap(batch.logits_soft_cap, "cuda attention");
    CQ_CHECK((batch.rope != nullptr) == (s.rope_dim > 0), "cuda attention: the batch's rope (", batch.rope,
             ") must be set exactly when the plan's keys are before RoPE (rope_dim ", s.rope_dim, ")");
    CQ_CHECK(batch.q != nullptr && batch.out != nullptr, "cuda attention: q (", batch.q, ") and out (", batch.out,
             ") must be set");
    CQ_CHECK(attention_dtype(batch.q_type) && attention_dtype(batch.out_type), "cuda attention: q is ",
             dtype_name(batch.q_type), " and out ", dtype_name(batch.out_type), "; each must be F32, F16 or BF16");
    if (const FullRowPages& f = batch.full_pages; f.pool != nullptr) {
      CQ_CHECK(attention_dtype(f.type), "cuda attention: full_pages.type is ", dtype_name(f.type),
               "; it must be F32, F16 or BF16");
      const std::size_t need =
          std::size_t(batch.kv_heads) * 2 * f.page_rows * std::size_t(batch.head_dim) * dtype_size(f.type);
      CQ_CHECK(f.page_rows >= 1 && (f.page_rows & (f.page_rows - 1)) == 0, "cuda attention: full_pages.page_rows ",
               f.page_rows, " must be a power of two");
      CQ_CHECK(f.page_bytes >= need && f.page_bytes % 16 == 0 && f.page_bytes < (std::size_t{1} << 32),
               "cuda attention: full_pages.page_bytes ", f.page_bytes, " must hold ", need,
               " bytes (every KV head's key and value rows), be a multiple of 16 and below 4 GiB");
      CQ_CHECK(reinterpret_cast<std::uintptr_t>(f.pool) % 16 == 0, "cuda attention: full_pages.pool ", f.pool,
               " must be 16-byte aligned");
    }
    void* workspace = p.workspace;
    if (!workspace) {
      CQ_CHECK(workspace_.size() >= p.workspace_bytes, "cuda attention: the plan needs ", p.workspace_bytes,
               " bytes of workspace; this object has ", workspace_.size(), " (plan it here, or give it a workspace)");
      workspace = workspace_.data();
    }
    detail::launch(batch, p, workspace, stream, stages);
    last_ = p;
  }

  DeviceBuffer<unsigned char> workspace_;
  std::vector<std::pair<AttentionShape, AttentionPlan>> plans_;
  DeviceLimits limits_;
  bool limits_ready_ = false;
  int max_split_tokens_ = 0;  // 0: by the histogram size (general) or the waves (lane tables)
  Kernel kernel_ = Kernel::automatic;
  AttentionPlan last_;
};

namespace detail {

inline void run_stages(FusedAttention& attention, const AttentionBatch& batch, const AttentionPlan& plan,
                       cudaStream_t stream, unsigned stages) {
  attention.launch_checked(batch, plan, stream, stages);
}

}  // namespace detail
}  // namespace cq::cuda
