#pragma once
// Host-side handle on cq::cuda::PagedKVCache for the CUDA tests (cache_glue.cu, compiled by nvcc):
// host vectors in and out, so the test file never sees CUDA.

#include <cq/cache/memory_plan.hpp>
#include <cq/cache/sequence_table.hpp>
#include <cq/dtype.hpp>
#include <cq/kv_codebooks.hpp>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

namespace cq::gpu_test {

/// A cuda::PagedKVCache<T> (T: float, half or bfloat16) on its own stream; every call returns once
/// the device has finished it, and device errors surface as cq::Error.
template <class T>
class DeviceCache {
 public:
  DeviceCache(const KVCodebooks& codebooks, const PagedCacheOptions& opt);
  ~DeviceCache();
  DeviceCache(const DeviceCache&) = delete;
  DeviceCache& operator=(const DeviceCache&) = delete;

  SeqId add_sequence(std::size_t first_position = 0);
  void free_sequence(SeqId s);
  SeqId fork(SeqId s);
  void truncate(SeqId s, std::size_t tokens);
  void reserve(SeqId s, std::size_t tokens);
  std::size_t length(SeqId s, std::size_t layer) const;
  /// keys and values (rows, kv_heads x head_dim) in host memory, uploaded, then appended; with
  /// heads_outer the device copy is [kv_heads, rows, head_dim] (strides say so).
  void append(std::size_t layer, std::span<const SeqId> seqs, std::span<const std::size_t> indptr,
              const std::vector<T>& keys, const std::vector<T>& values, bool heads_outer = false);
  /// Attention of each sequence's last token, or with `indptr` of its last indptr[i + 1] - indptr[i]
  /// tokens: q (rows, q_heads x head_dim) floats, sent as q_type; the output read back as
  /// out_type, returned as floats; lse if given; logits soft-capped at soft_cap (0: none).
  std::vector<float> attend(std::size_t layer, std::span<const SeqId> seqs, int q_heads, const std::vector<float>& q,
                            DType q_type, DType out_type, std::vector<float>* lse = nullptr,
                            std::span<const std::size_t> indptr = {}, float soft_cap = 0.0f);
  /// Chunked prefill (attend_prefill) before the chunk is appended: q (rows, q_heads x head_dim)
  /// floats sent in the cache's dtype, the chunk's keys and values (rows, kv_heads x head_dim);
  /// the output read back as floats, lse if given; logits soft-capped at soft_cap (0: none).
  std::vector<float> prefill(std::size_t layer, std::span<const SeqId> seqs, std::span<const std::size_t> indptr,
                             int q_heads, const std::vector<float>& q, const std::vector<T>& keys,
                             const std::vector<T>& values, std::vector<float>* lse = nullptr, float soft_cap = 0.0f);
  /// PagedKVCache::set_prefill_workspace_limit.
  void set_prefill_workspace_limit(std::size_t bytes);
  /// `steps` decode steps of one token for each of seqs in every layer (the same rows in every
  /// layer): keys and values [step][sequence][kv_heads x head_dim], queries [step][sequence][q_heads
  /// x head_dim], f32 in and out. mode 0: append and attend per layer; 1: begin_decode_step, then
  /// append_step and attend_step per layer; 2: the same captured in a CUDA graph at the first step
  /// and replayed (recaptured when begin_decode_step says its buffers moved). Returns the outputs
  /// [step][layer][sequence][q_heads x head_dim]; *captures counts the graphs captured.
  std::vector<float> decode_steps(std::span<const SeqId> seqs, int q_heads, const std::vector<T>& keys,
                                  const std::vector<T>& values, const std::vector<float>& q, std::size_t steps,
                                  int mode, std::size_t max_context, int* captures = nullptr);
  /// The device pool, copied to the host: code pages of every layer, then full-precision pages.
  std::vector<std::uint8_t> pool() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace cq::gpu_test
