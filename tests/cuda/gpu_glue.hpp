#pragma once
// Host-side entry points into the CUDA backend for the CUDA tests: cq's host types in and out, so
// the test file (compiled by the host compiler, with doctest) never sees CUDA and the .cu file
// (compiled by nvcc) never sees doctest.

#include <cq/attention/head_view.hpp>
#include <cq/cache/layout.hpp>
#include <cq/codebook.hpp>

#include <cstdint>
#include <string>
#include <vector>

namespace cq::gpu_test {

/// Name of device 0, or empty when no CUDA device is usable.
std::string device_name();

/// Encodes rows x (rows, dim) into tokens [first, first + rows) of `codes` (packed, `tokens` tokens).
void encode(const Codebook& cb, const std::vector<float>& x, std::size_t rows, std::vector<std::uint8_t>& codes,
            std::size_t tokens, std::size_t first);
/// Decodes tokens [first, first + rows) of packed codes.
std::vector<float> decode(const Codebook& cb, const std::vector<std::uint8_t>& codes, std::size_t tokens,
                          std::size_t first, std::size_t rows);

/// Which kernel FusedAttention runs (cq::cuda::AttentionKernel, without CUDA headers).
enum class Kernel { automatic, general, lane_tables, grouped_rows };

/// A batch as the CPU holds it: one view per (sequence, KV head), sequence-major, as
/// PagedKVCache::head_view returns them (keys after RoPE; every sequence of a KV head shares its
/// codebooks), and each sequence's length. The GPU serves each sequence's last token.
struct HostBatch {
  std::vector<KVHeadView<float>> views;  // [sequence][kv_head]
  std::vector<std::size_t> lengths;      // [sequence], each >= 1
  int q_heads = 0;
};

/// Whether `kernel` serves this batch on device 0 (the plan's own rule; general and automatic:
/// always).
bool kernel_serves(Kernel kernel, const HostBatch& batch);

/// How the device holds a batch's codes: each (sequence, KV head)'s copied into contiguous buffers,
/// or the CPU cache's code pool copied byte for byte with the sequences' page tables (pages);
/// misaligned: every code buffer (or the pool) 4 bytes and every centroid table one float past a
/// 16-byte boundary (the kernels' narrow-load paths); claimed_page_tokens: the batch claims pages
/// of this size instead of the true one (FusedAttention::run must refuse a size it cannot read).
struct DeviceCodes {
  bool pages = false;
  bool misaligned = false;
  int claimed_page_tokens = 0;
};

/// Fused attention on device 0 for the last token of each sequence; q and the result are
/// [sequence][q_heads][head_dim].
std::vector<float> attention(const HostBatch& batch, const std::vector<float>& q, float scale,
                             Kernel kernel = Kernel::automatic, DeviceCodes codes = {}, int* splits_used = nullptr);

/// Rows for cuda::encode_into_pages: host bytes of `rows` rows of `kv_heads` x head_dim elements
/// (float, fp16 or bf16: `element_bytes` 4 or 2, `bf16` choosing between the 16-bit ones) at
/// row_stride / head_stride elements, their slots, and the codebooks of each KV head.
struct PagedEncodeInput {
  const void* keys = nullptr;
  const void* values = nullptr;
  std::size_t element_bytes = 4;
  bool bf16 = false;
  std::size_t rows = 0, row_stride = 0, head_stride = 0, elements = 0;  // elements: of each of keys, values
  std::vector<std::int64_t> slots;
  std::vector<const Codebook*> key_codebooks, value_codebooks;  // [kv_heads]
};

/// Copies `pool` (one layer's code pages with `layout`) to device 0, encodes the rows into it with
/// cuda::encode_into_pages and returns it.
std::vector<std::uint8_t> encode_into_pages(const std::vector<std::uint8_t>& pool, const CodePageLayout& layout,
                                            const PagedEncodeInput& in);

/// Batched k-means: x [jobs][n][dim]; returns codebooks [jobs] and objectives [jobs][groups][iterations + 1].
std::vector<Codebook> fit_batched(const std::vector<float>& x, const std::vector<float>* weights, int jobs, int n,
                                  int dim, int channels, int bits, int iterations, std::uint64_t seed,
                                  std::vector<double>* objectives = nullptr);

}  // namespace cq::gpu_test
