#pragma once
/// The device-side problem of fused decode attention: what a launch reads (device pointers to the
/// batch's codes, full-precision rows, codebooks and queries) and where it writes.
///
/// A sequence's tokens are split as cq/attention/problem.hpp says: coded tokens (positions sinks ..
/// sinks + coded - 1, as codes, contiguous or paged) and full-precision tokens (the sinks and the
/// window: float rows per sequence, or rows in full-precision pages in the model's dtype). The
/// launch serves one query per sequence, the last one, with keys after RoPE (or before it, rotated
/// in the kernel: AttentionBatch::rope); queries and outputs are f32, f16 or bf16, arithmetic is
/// in float.

#include "cq/config.hpp"
#include "cq/cuda/codebook.cuh"
#include "cq/cuda/elements.cuh"
#include "cq/attention/softmax_state.hpp"
#include "cq/cuda/attention/rope.cuh"
#include "cq/dtype.hpp"

#include <cmath>
#include <cstddef>
#include <cstdint>

namespace cq::cuda {

/// One run of packed codes (the keys or the values of one (sequence, KV head)) by 32-token blocks:
/// contiguous (pages == nullptr), block b at base + b x block bytes; or in pages of 2^page_shift
/// blocks, block b is block b mod 2^page_shift of page pages[b >> page_shift], page p's run at
/// base + p x page_bytes (base: the run's offset in page 0 of the pool). Kernels compute every code
/// address through block() (or page_of, early, and block_in). Pages are a power of two of blocks so
/// that an address costs a shift and a mask, not a division (~20 instructions, per block and per
/// prefetched line: in the lane-tables kernel, whose work per block is short, that dominated).
struct CodeRun {
  const std::uint8_t* base = nullptr;
  const std::uint32_t* pages = nullptr;
  std::size_t page_bytes = 0;
  int page_shift = 0;

#ifdef __CUDACC__
  /// The id of the page holding block b (0 when contiguous): a load kernels can issue early.
  __device__ __forceinline__ std::uint32_t page_of(int b) const {
    return pages == nullptr ? 0u : __ldg(pages + (unsigned(b) >> page_shift));
  }
  /// Block b, which lies in page `page` (page_of(b)).
  __device__ __forceinline__ const std::uint8_t* block_in(std::uint32_t page, int b, int block_bytes) const {
    if (pages == nullptr) return base + std::size_t(b) * block_bytes;
    const unsigned in_page = unsigned(b) & ((1u << page_shift) - 1u);
    return base + std::size_t(page) * page_bytes + std::size_t(in_page) * block_bytes;
  }
  __device__ __forceinline__ const std::uint8_t* block(int b, int block_bytes) const {
    return block_in(page_of(b), b, block_bytes);
  }
  /// 32-token blocks per page.
  __device__ __forceinline__ int page_blocks() const { return 1 << page_shift; }
#endif
};

/// One (sequence, KV head)'s codes, keys and values, in the packed layout (packed_codes.hpp):
/// contiguous buffers of its coded tokens, or runs in the pages of a pool with the CPU cache's
/// layout (cache/layout.hpp: a page holds every KV head's key run, then its value run), listed in
/// token order by a page table (pages; the batch's page_tokens tokens each) that keys and values
/// share.
struct DeviceKVCodes {
  const std::uint8_t* key_codes = nullptr;    // contiguous codes, or the key run's offset in page 0
  const std::uint8_t* value_codes = nullptr;  // likewise the value run's
  const std::uint32_t* pages = nullptr;       // page ids in token order; nullptr: contiguous
  std::size_t page_bytes = 0;                 // bytes from one page to the next

  /// The runs, in pages of 2^page_shift blocks (AttentionBatch::page_shift).
  CQ_HOST_DEVICE CodeRun keys(int page_shift) const { return {key_codes, pages, page_bytes, page_shift}; }
  CQ_HOST_DEVICE CodeRun values(int page_shift) const { return {value_codes, pages, page_bytes, page_shift}; }
  /// Whether every block of both runs starts 16-byte aligned (the kernels' wide loads).
  CQ_HOST_DEVICE bool aligned16() const {
    const std::uintptr_t a = reinterpret_cast<std::uintptr_t>(key_codes) | reinterpret_cast<std::uintptr_t>(value_codes);
    return ((a | (pages ? page_bytes : 0)) & 15u) == 0;
  }
};

/// One sequence: how many coded tokens, and where its `full` full-precision tokens (sinks, then
/// the window; keys after RoPE) are: [kv_heads][full][head_dim] floats at full_keys / full_values
/// when the batch has no full-precision pool (AttentionBatch::full_pages), else rows of that pool:
/// row j < sinks is row j of the sink pages, row j >= sinks is row recent_row + (j - sinks) of the
/// recent pages (as PagedKVCache keeps them: recent_row = window_begin - recent_first).
/// With keys coded before RoPE (AttentionBatch::rope), token 0 sits at RoPE position `position`:
/// coded token i at position + sinks + i, full row j at position + j (j < sinks) or position +
/// coded + j (the window, after the coded tokens) -- so `sinks` must be set then whatever holds
/// the full rows.
struct DeviceSequence {
  std::uint32_t coded = 0;
  std::uint32_t full = 0;
  const float* full_keys = nullptr;
  const float* full_values = nullptr;
  const std::uint32_t* sink_pages = nullptr;    // page ids of positions 0, page_rows, ...
  const std::uint32_t* recent_pages = nullptr;  // page ids of the recent rows, in order
  std::uint32_t sinks = 0;                      // of the full rows, how many are sinks (paged rows; pre-RoPE)
  std::uint32_t recent_row = 0;                 // the window's first row among the recent rows
  std::uint64_t position = 0;                   // RoPE position of token 0 (pre-RoPE keys only)

  /// The RoPE position of full row j.
  CQ_HOST_DEVICE std::uint64_t full_position(std::uint32_t j) const { return position + (j < sinks ? j : coded + j); }
};

/// A pool of full-precision pages with the CPU cache's layout (cache/layout.hpp, FullPageLayout:
/// per page, every KV head's page_rows key rows then its page_rows value rows, head_dim elements
/// each, pages page_bytes apart). pool == nullptr: the sequences' rows are float arrays instead.
struct FullRowPages {
  const void* pool = nullptr;    // the first page (of the layer)
  DType type = DType::f32;       // f32, f16 or bf16 (the cache's element type)
  std::uint32_t page_rows = 0;   // rows per page and head (PagedCacheOptions::full_page_rows), a power of two
  std::size_t page_bytes = 0;    // FullPageLayout::page_bytes()
};

/// Whether the attention kernels read and write tensors of this element type.
constexpr bool attention_dtype(DType t) { return t == DType::f32 || t == DType::f16 || t == DType::bf16; }

/// Whether the attention kernels can read codes in pages of `page_tokens` tokens: 0 (contiguous) or
/// a power of two from 32 on (CodeRun: addresses by shift and mask).
constexpr bool valid_page_tokens(int page_tokens) {
  return page_tokens == 0 || (page_tokens >= 32 && (page_tokens & (page_tokens - 1)) == 0);
}

/// Everything one launch reads (device pointers) and its shape.
struct AttentionBatch {
  int batch = 0, q_heads = 0, kv_heads = 0, head_dim = 0;
  const DeviceKVCodes* codes = nullptr;     // [batch][kv_heads]
  const DeviceSequence* sequences = nullptr;  // [batch]
  const DeviceCodebookView* key_codebooks = nullptr;    // [kv_heads]
  const DeviceCodebookView* value_codebooks = nullptr;  // [kv_heads]
  const void* q = nullptr;                  // [batch][q_heads][head_dim], q_type
  void* out = nullptr;                      // [batch][q_heads][head_dim], out_type
  DType q_type = DType::f32, out_type = DType::f32;  // f32, f16 or bf16
  /// Optional [batch][q_heads] floats: log of the sum of exp(score) over the tokens attended
  /// (natural log, scores scaled; -inf when none), so an engine can merge cq's attention with its
  /// own over other tokens (cascade / shared-prefix attention), as FlashAttention's softmax_lse.
  float* lse = nullptr;
  float scale = 0.0f;                       // 0: 1 / sqrt(head_dim)
  /// > 0: every logit (score x scale) is soft-capped to cap x tanh(logit / cap) before the softmax
  /// (cq::soft_cap; Gemma 2); 0: none. The log-sum-exp is then over the capped logits.
  float logits_soft_cap = 0.0f;
  FullRowPages full_pages;                  // the sinks' and windows' rows in pages (optional)
  /// Tokens per page of the paged codes (every paged entry of `codes` has pages of this size): 0
  /// when every entry is contiguous (kernels may then ignore `pages`: the lane-tables kernel runs
  /// an instantiation without page tables), else a power of two from 32 on (FusedAttention::run
  /// checks).
  int page_tokens = 0;
  /// Keys (coded and full-precision) stored before RoPE: the kernels rotate each to its position
  /// (DeviceSequence::position) by this device copy of make_device_rope(...); nullptr: keys after
  /// RoPE. Set exactly when the plan's shape has rope_dim > 0.
  const DeviceRope* rope = nullptr;

#ifdef __CUDACC__
  /// log2 of the 32-token blocks per page (0 when contiguous).
  __device__ __forceinline__ int page_shift() const { return page_tokens ? __ffs(page_tokens) - 6 : 0; }
  /// Element i of the queries. Kernels see f32 queries only: FusedAttention::run converts f16 and
  /// bf16 ones into its workspace first (one small launch), so no kernel carries a branch per dtype
  /// in its query loads.
  __device__ __forceinline__ float query(std::size_t i) const { return static_cast<const float*>(q)[i]; }
  /// Writes the output of (sequence x query head) bh: channel d is o_d / total (0 when total is
  /// 0), and, with d == 0, its log-sum-exp m + log(total) (scores relative to reference m).
  __device__ __forceinline__ void write_output(std::size_t bh, int d, float o, float m, float total) const {
    store_element(out, out_type, bh * std::size_t(head_dim) + d, total > 0.0f ? o / total : 0.0f);
    if (lse != nullptr && d == 0) lse[bh] = total > 0.0f ? m + logf(total) : -INFINITY;
  }
#endif
};

#ifdef __CUDACC__
/// The full-precision rows of one (sequence, KV head), wherever they are (DeviceSequence): row j's
/// key and value, and their elements as float. T is the rows' element type and Paged whether they
/// are in pages (float rows per sequence otherwise), both fixed at compile time:
/// visit_full_rows chooses, once, around a loop.
template <device_element T, bool Paged>
struct FullRows {
  const unsigned char* keys = nullptr;    // row 0 (float rows), or the head's key rows in page 0
  const unsigned char* values = nullptr;  // likewise its value rows
  const std::uint32_t* sink_pages = nullptr;
  const std::uint32_t* recent_pages = nullptr;
  std::uint32_t sinks = 0, recent_row = 0, row_shift = 0;  // row_shift: log2 of the rows per page
  std::uint32_t page_bytes = 0;                            // FusedAttention::run checks pages < 4 GiB
  std::uint32_t row_bytes = 0;

  /// Sequence b's rows of KV head kvh. Reads the sequence record here, not at kernel start, so its
  /// fields are not held in registers across a kernel's main loop.
  __device__ static FullRows of(const AttentionBatch& p, int b, int kvh) {
    const DeviceSequence& s = p.sequences[b];
    FullRows r;
    const std::size_t D = std::size_t(p.head_dim);
    r.row_bytes = std::uint32_t(D * sizeof(T));
    if constexpr (!Paged) {
      r.keys = reinterpret_cast<const unsigned char*>(s.full_keys + std::size_t(kvh) * s.full * D);
      r.values = reinterpret_cast<const unsigned char*>(s.full_values + std::size_t(kvh) * s.full * D);
    } else {
      const FullRowPages& f = p.full_pages;
      r.row_shift = unsigned(__ffs(int(f.page_rows)) - 1);
      r.page_bytes = std::uint32_t(f.page_bytes);
      r.keys = static_cast<const unsigned char*>(f.pool) + std::size_t(kvh) * 2 * f.page_rows * r.row_bytes;
      r.values = r.keys + f.page_rows * r.row_bytes;
      r.sink_pages = s.sink_pages, r.recent_pages = s.recent_pages;
      r.sinks = s.sinks, r.recent_row = s.recent_row;
    }
    return r;
  }
  /// Bytes from `keys` (or `values`) to row j.
  __device__ __forceinline__ std::size_t offset(int j) const {
    if constexpr (!Paged) {
      return std::size_t(j) * row_bytes;
    } else {
      const bool sink = unsigned(j) < sinks;
      const unsigned i = sink ? unsigned(j) : recent_row + (unsigned(j) - sinks);
      const std::uint32_t page = (sink ? sink_pages : recent_pages)[i >> row_shift];
      return std::size_t(page) * page_bytes + std::size_t(i & ((1u << row_shift) - 1u)) * row_bytes;
    }
  }
  __device__ __forceinline__ const T* key(int j) const { return reinterpret_cast<const T*>(keys + offset(j)); }
  __device__ __forceinline__ const T* value(int j) const { return reinterpret_cast<const T*>(values + offset(j)); }
  /// Element d of a row, as float.
  __device__ __forceinline__ static float at(const T* row, int d) { return element_to_float(row[d]); }
  /// Elements d .. d + 3 of a row (d % 4 == 0) in one load when vec() (else four).
  __device__ __forceinline__ static float4 at4(const T* row, int d, bool vec) {
    if (vec) return load_float4(row, std::size_t(d));
    return make_float4(at(row, d), at(row, d + 1), at(row, d + 2), at(row, d + 3));
  }
  /// Whether every row can be read four elements at a time (head_dim a multiple of 4): pages are
  /// 64-byte aligned; float rows need 16-byte aligned arrays.
  __device__ __forceinline__ bool vec(int head_dim) const {
    return head_dim % 4 == 0 &&
           (Paged || ((reinterpret_cast<std::uintptr_t>(keys) | reinterpret_cast<std::uintptr_t>(values)) & 15u) == 0);
  }
};

/// Calls f(rows) with sequence b's rows of KV head kvh as the FullRows type they have in this
/// batch (float rows, or pages of f32, f16 or bf16 rows).
template <class F>
__device__ __forceinline__ void visit_full_rows(const AttentionBatch& p, int b, int kvh, F&& f) {
  if (p.full_pages.pool == nullptr) {
    f(FullRows<float, false>::of(p, b, kvh));
    return;
  }
  visit_element_type(p.full_pages.type, [&](auto t) { f(FullRows<decltype(t), true>::of(p, b, kvh)); });
}
#endif

namespace detail {

/// Steps of a fused-attention launch, for timing experiments only (detail::run_stages, used by
/// bench/cuda; the results are meaningless unless all are on): score tables, key scan, value
/// histograms, full-precision tokens, and the lane-tables kernel's histogram x codebook product.
enum AttentionStage : unsigned {
  stage_lut = 1,
  stage_scan = 2,
  stage_hist = 4,
  stage_full = 8,
  stage_product = 16,
  stage_all = 31
};

}  // namespace detail

}  // namespace cq::cuda
