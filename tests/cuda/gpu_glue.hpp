#pragma once
// Host-side entry points into the CUDA backend for the CUDA tests: cq's host types in and out, so
// the test file (compiled by the host compiler, with doctest) never sees CUDA and the .cu file
// (compiled by nvcc) never sees doctest.

#include <cq/attention/head_view.hpp>
#include <cq/cache/layout.hpp>
#include <cq/codebook.hpp>
#include <cq/dtype.hpp>
#include <cq/rope.hpp>

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
/// PagedKVCache<T>::head_view returns them (keys after RoPE; every sequence of a KV head shares its
/// codebooks), and each sequence's length. The GPU serves each sequence's last token.
template <class T>
struct HostBatchOf {
  std::vector<KVHeadView<T>> views;  // [sequence][kv_head]
  std::vector<std::size_t> lengths;  // [sequence], each >= 1
  int q_heads = 0;
};
using HostBatch = HostBatchOf<float>;

/// Whether `kernel` serves this batch on device 0 (the plan's own rule; general and automatic:
/// always, but with keys before RoPE only the grouped-rows kernel, automatic included, rotates
/// them). T: float, half or bfloat16.
template <class T>
bool kernel_serves(Kernel kernel, const HostBatchOf<T>& batch);

/// How the device holds a batch's codes: each (sequence, KV head)'s copied into contiguous buffers,
/// or the CPU cache's code pool copied byte for byte with the sequences' page tables (pages);
/// misaligned: every code buffer (or the pool) 4 bytes and every centroid table one float past a
/// 16-byte boundary (the kernels' narrow-load paths); claimed_page_tokens: the batch claims pages
/// of this size instead of the true one (FusedAttention::run must refuse a size it cannot read);
/// full_pages: the sinks' and windows' rows read in the CPU cache's full-precision pool (copied
/// byte for byte, in the cache's element type) through the sequences' sink and recent page
/// tables, instead of float rows per sequence; max_split_tokens: the plan's cap on a split's coded
/// tokens (FusedAttention::set_max_split_tokens; 0: the plan's own split lengths).
struct DeviceCodes {
  bool pages = false;
  bool mixed = false;  // with pages: every other sequence's codes in contiguous buffers instead (one batch, both)
  bool misaligned = false;
  int claimed_page_tokens = 0;
  bool full_pages = false;
  int max_split_tokens = 0;
};

/// The dtypes of the queries (the float q rounded to it on the host) and outputs (converted back
/// to float for the caller), and where to put the log-sum-exp per (sequence, query head) if wanted.
struct Precision {
  DType q = DType::f32, out = DType::f32;
  std::vector<float>* lse = nullptr;
};

/// What the plan chose for a run: its split count, and (lane-tables kernel) how the main loop
/// looks pages up for this batch (cq::cuda::detail::PageMode's name: "contiguous", "paged",
/// "round_pages", "pair_pages"; empty for the other kernels).
struct PlanUsed {
  int splits = 0;
  std::string page_mode;
};

/// Fused attention on device 0 for the last token of each sequence; q and the result are
/// [sequence][q_heads][head_dim]. T: float, half or bfloat16. `scoring`: the scale, or {scale,
/// logit soft cap}.
template <class T>
std::vector<float> attention(const HostBatchOf<T>& batch, const std::vector<float>& q, Scoring scoring,
                             Kernel kernel = Kernel::automatic, DeviceCodes codes = {}, PlanUsed* used = nullptr,
                             Precision precision = {});

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

/// Copies `pool` (one layer's full-precision pages with `layout`) to device 0, writes the rows of
/// `in` (codebooks unused) into it with cuda::write_full_rows and returns it.
std::vector<std::uint8_t> write_full_rows(const std::vector<std::uint8_t>& pool, const FullPageLayout& layout,
                                          const PagedEncodeInput& in);

/// One decode step's append and attention, as an engine captures it in a CUDA graph. Each
/// sequence's newest row (keys, values: [sequence][kv_heads x head_dim], the rows the cache holds
/// for it) is written into the device copies of the cache's pools by cuda::encode_into_pages (its
/// code slot; -1 for a sink row) and cuda::write_full_rows (its full-precision slot), then fused
/// attention runs with q; the pools start with those rows' codes flipped and full rows
/// overwritten. Runs once eagerly, then captures the three calls in a graph and replays it
/// `replays` times (the output buffer poisoned before each): the eager output, and how many
/// replays differed from the eager run in the output or either pool, byte for byte.
struct GraphStep {
  std::vector<float> out;
  int differing_replays = 0;
};
template <class T>
GraphStep append_attend_graph(const HostBatchOf<T>& batch, const std::vector<float>& q, float scale, Kernel kernel,
                              const std::vector<T>& keys, const std::vector<T>& values,
                              const std::vector<std::int64_t>& code_slots, const std::vector<std::int64_t>& full_slots,
                              int replays);

/// Batched k-means: x [jobs][n][dim]; returns codebooks [jobs] and objectives [jobs][groups][iterations + 1].
std::vector<Codebook> fit_batched(const std::vector<float>& x, const std::vector<float>* weights, int jobs, int n,
                                  int dim, int channels, int bits, int iterations, std::uint64_t seed,
                                  std::vector<double>* objectives = nullptr);

/// The RoPE variants the pre-RoPE device tests share: LLaMA-3's (rotate_half over every channel,
/// theta 500000, llama3 scaling) and a GPT-J-style one (interleaved pairs over the first 64
/// channels, YaRN scaling: an attention factor).
inline RopeConfig llama3_rope() {
  RopeConfig r;
  r.theta = 500000.0;
  r.scaling = RopeScaling::llama3;
  r.factor = 8.0;
  return r;
}
inline RopeConfig interleaved_yarn_rope() {
  RopeConfig r;
  r.style = RopeStyle::interleaved;
  r.rotary_dim = 64;
  r.scaling = RopeScaling::yarn;
  r.factor = 4.0;
  return r;
}

}  // namespace cq::gpu_test
