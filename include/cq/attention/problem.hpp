#pragma once
/// What a query sees: the one rule of cq's attention, shared by the CPU kernels, the CUDA
/// kernels, the caches and the tests.
///
/// A sequence of n tokens keeps its first S tokens ("attention sinks") and its W most recent
/// tokens in full precision and every other token as codes. A query at position p reads the
/// positions [0, p] (causal):
///   sinks   [0, min(S, p + 1))                      full precision
///   coded   [S, max(S, p + 1 - W))                  key and value codes (code index = position - S)
///   window  [max(S, p + 1 - W), p + 1)              full precision
/// so a chunk of queries sees, row by row, exactly what token-by-token decoding would: the window
/// slides with the query, not with the chunk. (StreamingLLM's sinks; KIVI's full-precision window.)

#include "cq/config.hpp"

#include <cstddef>

namespace cq {

/// The positions a query reads, by how they are stored (see the top of this file). Ranges are
/// half-open; an empty range has begin == end.
struct VisibleTokens {
  std::size_t sink_end = 0;                    // sinks: [0, sink_end)
  std::size_t coded_begin = 0, coded_end = 0;  // coded: [coded_begin, coded_end)
  std::size_t window_begin = 0, window_end = 0;  // window: [window_begin, window_end)

  CQ_HOST_DEVICE constexpr std::size_t coded() const { return coded_end - coded_begin; }
  CQ_HOST_DEVICE constexpr std::size_t window() const { return window_end - window_begin; }
  /// Tokens read in full precision (sinks and window).
  CQ_HOST_DEVICE constexpr std::size_t full() const { return sink_end + window(); }
};

/// What a query at position `pos` reads with `sinks` sink tokens and a window of `window` tokens.
CQ_HOST_DEVICE constexpr VisibleTokens visible_tokens(std::size_t pos, std::size_t sinks, std::size_t window) {
  const std::size_t visible = pos + 1;
  const std::size_t sink_end = sinks < visible ? sinks : visible;
  std::size_t lo = visible > window ? visible - window : 0;  // first position of the window
  if (lo < sinks) lo = sinks;
  if (lo > visible) lo = visible;
  VisibleTokens v;
  v.sink_end = sink_end;
  v.coded_begin = sinks < lo ? sinks : lo;
  v.coded_end = lo;
  v.window_begin = lo;
  v.window_end = visible;
  return v;
}

/// Position of query row `row` of a chunk of `rows` queries that ends a sequence of `length`
/// tokens (causal chunks: the last rows of the sequence). Requires rows <= length.
CQ_HOST_DEVICE constexpr std::size_t query_position(std::size_t length, std::size_t rows, std::size_t row) {
  return length - rows + row;
}

/// First position a sequence of `length` tokens must hold in full precision so that queries at
/// positions >= `first_query` see their windows (positions below `sinks` are the sinks').
CQ_HOST_DEVICE constexpr std::size_t window_start(std::size_t first_query, std::size_t sinks, std::size_t window) {
  return visible_tokens(first_query, sinks, window).window_begin;
}

}  // namespace cq
