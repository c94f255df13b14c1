#pragma once
/// Page writes of a device cache's bookkeeping, queued and run in one launch: the SequenceTable
/// (cq/cache/sequence_table.hpp) zeroes every page it hands out and copies a shared page into a
/// fresh one before a write (copy-on-write) through a PageMemory (cq/cache/page_pool.hpp). For
/// pages in device memory DevicePageOps records those writes during the table's commits (which
/// cannot fail, so the queue's room is reserved before them) and run() performs them all with one
/// kernel on the cache's stream, before the step's own writes: a prefill that takes a thousand
/// pages over 32 layers costs one launch, not 32,000 cudaMemsetAsync calls.

#include "cq/cache/page_pool.hpp"
#include "cq/config.hpp"
#include "cq/cuda/error.cuh"

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

namespace cq::cuda {

namespace detail {

/// One queued page write: `bytes` (a multiple of 16) at device address `to`, zeroed (from == 0)
/// or copied from device address `from`.
struct PageOp {
  std::uint64_t to = 0, from = 0, bytes = 0;
};

/// Block i performs op i, 16 bytes per thread and step. Ops of one launch touch distinct pages
/// (DevicePageOps splits launches where they would not), so blocks never race.
template <class = void>
__global__ void page_ops_kernel(const PageOp* ops) {
  const PageOp op = ops[blockIdx.x];
  auto* to = reinterpret_cast<uint4*>(op.to);
  const auto* from = reinterpret_cast<const uint4*>(op.from);
  for (std::uint64_t i = threadIdx.x; i < op.bytes / 16; i += blockDim.x) to[i] = from ? from[i] : make_uint4(0, 0, 0, 0);
}

}  // namespace detail

/// A PageMemory for pages in device memory: records the writes (reserve room before a commit),
/// which the owner uploads and launches (page_ops_kernel) before anything reads those pages.
///
/// Writes of one launch run at once, so two that touch one page must go to different launches.
/// Within a batch of commits that happens in one way only: a page read by a copy-on-write copy is
/// released by its other holder (a dropped window page), freed, and taken again (zeroed, or the
/// target of a copy) by a later commit of the batch. A write to a page an earlier write of the
/// current launch reads therefore starts a new launch (segments run in stream order). Pages taken
/// fresh are held by their sequence until the batch ends, so no other overlap can occur.
class DevicePageOps final : public PageMemory {
 public:
  void zero(std::byte* page, std::size_t bytes) noexcept override { push({address(page), 0, bytes}); }
  void copy(std::byte* to, const std::byte* from, std::size_t bytes) noexcept override {
    push({address(to), address(from), bytes});
  }
  /// Room for `more` writes (may throw; call before the commits that record them).
  void reserve(std::size_t more) {
    const std::size_t n = ops_.size() + more;
    ops_.reserve(n);
    sources_.reserve(n);
    starts_.reserve(n + 1);
  }
  std::span<const detail::PageOp> ops() const { return ops_; }
  bool empty() const { return ops_.empty(); }
  void clear() noexcept {
    ops_.clear();
    sources_.clear();
    starts_.clear();
  }

  /// Launches the queued ops, whose copy is at `device_ops` (device memory, written in `stream`
  /// order before this launch), on `stream`, one launch per segment; clears the queue.
  void launch(const detail::PageOp* device_ops, cudaStream_t stream) {
    if (ops_.empty()) return;
    for (std::size_t i = 0; i < starts_.size(); ++i) {
      const std::size_t begin = starts_[i], end = i + 1 < starts_.size() ? starts_[i + 1] : ops_.size();
      CQ_CHECK(end - begin <= 0x7fffffffu, "cuda paged cache: ", end - begin, " page writes exceed one launch's grid");
      detail::page_ops_kernel<><<<unsigned(end - begin), 256, 0, stream>>>(device_ops + begin);
      CQ_CUDA_CHECK_LAUNCH(page_ops_kernel);
    }
    clear();
  }

 private:
  static std::uint64_t address(const std::byte* p) { return reinterpret_cast<std::uintptr_t>(p); }
  void push(const detail::PageOp& op) noexcept {
    CQ_ASSERT(ops_.size() < ops_.capacity() && op.bytes % 16 == 0);
    bool reads_target = false;  // copies are rare (forks): a scan of this launch's sources is cheap
    for (std::uint64_t from : sources_) reads_target = reads_target || from == op.to;
    if (starts_.empty() || reads_target) {  // within the reserved capacities: nothing allocates
      starts_.push_back(ops_.size());
      sources_.clear();
    }
    if (op.from) sources_.push_back(op.from);
    ops_.push_back(op);
  }
  std::vector<detail::PageOp> ops_;
  std::vector<std::uint64_t> sources_;  // pages the current launch's copies read
  std::vector<std::size_t> starts_;     // first op of each launch
};

}  // namespace cq::cuda
