#pragma once
/// The device-side problem of fused decode attention: what a launch reads (device pointers to the
/// batch's codes, full-precision rows, codebooks and queries) and where it writes.
///
/// A sequence's tokens are split as cq/attention/problem.hpp says: coded tokens (positions sinks ..
/// sinks + coded - 1, as codes, contiguous or paged) and full-precision tokens (the sinks and the
/// window, as float rows; not paged yet). The launch serves one query per sequence, the last one,
/// with keys after RoPE.

#include "cq/config.hpp"
#include "cq/cuda/codebook.cuh"

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

/// One sequence: how many coded tokens, and its full-precision tokens (sinks, then the window;
/// keys after RoPE) as [kv_heads][full][head_dim] floats.
struct DeviceSequence {
  std::uint32_t coded = 0;
  std::uint32_t full = 0;
  const float* full_keys = nullptr;
  const float* full_values = nullptr;
};

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
  const float* q = nullptr;                 // [batch][q_heads][head_dim]
  float* out = nullptr;                     // [batch][q_heads][head_dim]
  float scale = 0.0f;                       // 0: 1 / sqrt(head_dim)
  /// Tokens per page of the paged codes (every paged entry of `codes` has pages of this size): 0
  /// when every entry is contiguous, else a power of two from 32 on (FusedAttention::run checks).
  int page_tokens = 0;

#ifdef __CUDACC__
  /// log2 of the 32-token blocks per page (0 when contiguous).
  __device__ __forceinline__ int page_shift() const { return page_tokens ? __ffs(page_tokens) - 6 : 0; }
#endif
};

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
