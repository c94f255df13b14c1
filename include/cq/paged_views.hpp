#pragma once
/// Views of one (sequence, KV head)'s cache spread over the pages of a pool, as engines keep KV
/// memory (vLLM's block tables, FlashInfer's page indices): a page table lists the sequence's
/// pages in token order, and token t lives in page pages[t / page_tokens]. The same views serve
/// the CPU and the GPU kernels (device pointers inside, when the pool is in device memory).
///
/// A contiguous buffer is the one-page case (`contiguous()`), so every kernel reads pages.

#include "cq/config.hpp"
#include "cq/packed_codes.hpp"
#include "cq/views.hpp"

#include <cstddef>
#include <cstdint>

namespace cq {

namespace detail {
/// The page table of a one-page view.
inline constexpr std::uint32_t first_page_only[1] = {0};
}  // namespace detail

/// Packed codes (K or V) of one (sequence, KV head): token t's codes are those of token
/// t % page_tokens in the packed run (packed_codes.hpp) of `groups` codes at `bits` bits that
/// starts `offset` bytes into page pages[t / page_tokens]; page p starts at pool + p * page_bytes.
struct PagedCodesView {
  const std::uint8_t* pool = nullptr;
  std::size_t page_bytes = 0;            // bytes from one page to the next
  std::size_t offset = 0;                // bytes from a page's start to this head's run
  const std::uint32_t* pages = nullptr;  // page ids, in token order
  std::size_t page_tokens = 0;           // tokens per page, a multiple of 32
  std::size_t tokens = 0;                // valid tokens
  std::size_t groups = 0;
  int bits = 8;

  CQ_HOST_DEVICE constexpr std::size_t num_pages() const {
    return page_tokens ? (tokens + page_tokens - 1) / page_tokens : 0;
  }
  /// The codes of page i (tokens [i * page_tokens, ...) of the sequence, renumbered from 0).
  CQ_HOST_DEVICE ConstPackedCodesView page(std::size_t i) const {
    const std::size_t first = i * page_tokens;
    const std::size_t n = tokens - first < page_tokens ? tokens - first : page_tokens;
    return {pool + std::size_t(pages[i]) * page_bytes + offset, n, groups, bits};
  }
  CQ_HOST_DEVICE std::uint32_t get(std::size_t t, std::size_t g) const {
    return page(t / page_tokens).get(t % page_tokens, g);
  }
  /// A contiguous code buffer as a one-page view.
  static PagedCodesView contiguous(ConstPackedCodesView v) {
    PagedCodesView p;
    p.pool = v.data;
    p.pages = detail::first_page_only;
    p.page_tokens = v.num_blocks() ? v.num_blocks() * block_tokens : block_tokens;
    p.tokens = v.tokens;
    p.groups = v.groups;
    p.bits = v.bits;
    return p;
  }
};

/// Full-precision rows (keys or values, `dim` elements each) of one (sequence, KV head), for the
/// positions [first, first + rows): position first + i is row i % page_rows of page
/// pages[i / page_rows], whose rows start `offset` elements into the page, `row_stride` apart.
template <class T>
struct PagedRowsView {
  const T* pool = nullptr;
  std::size_t page_stride = 0;           // elements from one page to the next
  std::size_t offset = 0;                // elements from a page's start to this head's rows
  const std::uint32_t* pages = nullptr;
  std::size_t page_rows = 0;
  std::size_t row_stride = 0;            // elements from one row to the next
  std::size_t dim = 0;
  std::size_t first = 0;                 // position of row 0
  std::size_t rows = 0;

  /// Whether positions [begin, end) are all held.
  CQ_HOST_DEVICE constexpr bool holds(std::size_t begin, std::size_t end) const {
    return begin >= end || (begin >= first && end <= first + rows);
  }
  /// The row of position `pos` (holds(pos, pos + 1) must be true).
  CQ_HOST_DEVICE const T* at(std::size_t pos) const {
    const std::size_t i = pos - first;
    return pool + std::size_t(pages[i / page_rows]) * page_stride + offset + (i % page_rows) * row_stride;
  }
  /// Rows of a matrix view as a one-page view: row r is position first + r.
  static PagedRowsView contiguous(ConstMatrixView<T> m, std::size_t first) {
    PagedRowsView p;
    p.pool = m.data;
    p.pages = detail::first_page_only;
    p.page_rows = m.rows ? m.rows : 1;
    p.row_stride = m.stride;
    p.dim = m.cols;
    p.first = first;
    p.rows = m.rows;
    return p;
  }
};

}  // namespace cq
