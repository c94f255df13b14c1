#pragma once
/// The bytes of a page: one layout for the CPU and the GPU, so a page copied between host and
/// device memory (offload) is valid on both sides unchanged.
///
/// Pages are numbered once per cache: page id p names the same slot in every layer's page array
/// (vLLM's block tables work this way), so one page table per sequence serves all layers.
///
///   code page (one layer): for each KV head h, the key codes of page_tokens tokens (packed runs,
///     packed_codes.hpp: page_tokens / 32 blocks of groups x 4 x bits bytes), then the value codes;
///   full-precision page (one layer): for each KV head, page_rows key rows of head_dim elements,
///     then page_rows value rows ("HND" order: a head's rows are contiguous).
/// Page sizes are rounded up to 64 bytes, so every page of an aligned array starts aligned.

#include "cq/config.hpp"
#include "cq/packed_codes.hpp"

#include <cstddef>

namespace cq {

inline constexpr std::size_t page_alignment = 64;

CQ_HOST_DEVICE constexpr std::size_t round_up(std::size_t n, std::size_t to) { return (n + to - 1) / to * to; }

/// One layer's code page.
struct CodePageLayout {
  std::size_t page_tokens = 0;  // a multiple of 32
  std::size_t kv_heads = 0;
  std::size_t key_block_bytes = 0;    // one 32-token block of one head's key codes
  std::size_t value_block_bytes = 0;  // ... and of its value codes

  CQ_HOST_DEVICE constexpr std::size_t blocks() const { return page_tokens / block_tokens; }
  CQ_HOST_DEVICE constexpr std::size_t head_bytes() const { return blocks() * (key_block_bytes + value_block_bytes); }
  CQ_HOST_DEVICE constexpr std::size_t page_bytes() const { return round_up(kv_heads * head_bytes(), page_alignment); }
  CQ_HOST_DEVICE constexpr std::size_t key_offset(std::size_t head) const { return head * head_bytes(); }
  CQ_HOST_DEVICE constexpr std::size_t value_offset(std::size_t head) const {
    return head * head_bytes() + blocks() * key_block_bytes;
  }
};

/// One layer's full-precision page, in elements of the cache's element type.
struct FullPageLayout {
  std::size_t page_rows = 0;
  std::size_t kv_heads = 0;
  std::size_t head_dim = 0;
  std::size_t element_bytes = 0;

  CQ_HOST_DEVICE constexpr std::size_t head_elements() const { return 2 * page_rows * head_dim; }
  CQ_HOST_DEVICE constexpr std::size_t page_bytes() const {
    return round_up(kv_heads * head_elements() * element_bytes, page_alignment);
  }
  /// Elements from one page's start to the next (page_bytes / element_bytes).
  CQ_HOST_DEVICE constexpr std::size_t page_elements() const { return page_bytes() / element_bytes; }
  CQ_HOST_DEVICE constexpr std::size_t key_offset(std::size_t head) const { return head * head_elements(); }
  CQ_HOST_DEVICE constexpr std::size_t value_offset(std::size_t head) const {
    return head * head_elements() + page_rows * head_dim;
  }
};

}  // namespace cq
