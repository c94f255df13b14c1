#pragma once
/// What attention reads of one (sequence, KV head): the codebooks, the paged codes and the paged
/// full-precision rows, as views over memory someone else owns (a cq cache, or an engine that
/// builds them itself), and the checks every entry point runs on them once per call.

#include "cq/attention/problem.hpp"
#include "cq/codebook.hpp"
#include "cq/element.hpp"
#include "cq/error.hpp"
#include "cq/paged_views.hpp"
#include "cq/rope.hpp"

#include <cmath>
#include <cstddef>

namespace cq {

/// One (sequence, KV head) as attention reads it (the rule of what a query sees:
/// attention/problem.hpp).
template <element_type T>
struct KVHeadView {
  std::size_t head_dim = 0;
  CodebookView key_codebook, value_codebook;
  PagedCodesView key_codes, value_codes;   // code index i is position sinks + i
  PagedRowsView<T> sink_keys, sink_values;      // positions [0, min(sinks, length))
  PagedRowsView<T> recent_keys, recent_values;  // the most recent positions, at least the window's
  std::size_t sinks = 0;   // S
  std::size_t window = 0;  // W
  /// Non-null: every key of this view (coded or full precision) is stored *before* RoPE and is
  /// rotated here, token t to position t + position_offset. Null: keys are stored rotated.
  const Rope* rope = nullptr;
  std::size_t position_offset = 0;
};

/// How the coded part is computed.
enum class AttentionMethod : unsigned char {
  fused,            // key score tables; the backend's preferred value path (below)
  fused_histogram,  // key score tables; per-group histograms over value codes, one product at the end
  fused_centroids,  // key score tables; weighted value centroids accumulated per token
  dequantize,       // decode coded keys and values to float, then dense attention (baseline)
};

/// How a query-key dot product becomes a logit: times `scale` (0: 1 / sqrt(head_dim)), then, when
/// `soft_cap` > 0, soft-capped to soft_cap x tanh(logit / soft_cap) (cq::soft_cap; Gemma 2's
/// attn_logit_softcapping). Converts from a float, the scale, as the entry points took before.
struct Scoring {
  float scale = 0.0f;
  float soft_cap = 0.0f;
  constexpr Scoring(float scale_ = 0.0f, float soft_cap_ = 0.0f) : scale(scale_), soft_cap(soft_cap_) {}  // NOLINT: implicit
};

namespace detail {

/// The checks every attention entry point runs once per call on a view an engine may have built
/// itself: codes agree with their codebooks (groups, bits), codebooks and rows with head_dim,
/// pointers are there. Throws cq::Error naming `what` and the disagreeing parts.
template <element_type T>
void check_head_view(const KVHeadView<T>& kv, const char* what) {
  const std::size_t D = kv.head_dim;
  CQ_CHECK(D >= 1, what, ": head_dim is 0");
  auto codebook = [&](const CodebookView& cb, const char* name) {
    CQ_CHECK(cb.centroids != nullptr && cb.transposed != nullptr, what, ": the ", name, " codebook is empty");
    CQ_CHECK(cb.dim() == D, what, ": the ", name, " codebook has dim ", cb.dim(), " (", cb.groups, " groups of ",
             cb.channels, "), head_dim is ", D);
  };
  codebook(kv.key_codebook, "key");
  codebook(kv.value_codebook, "value");
  auto codes = [&](const PagedCodesView& c, const CodebookView& cb, const char* name) {
    CQ_CHECK(c.groups == cb.groups && c.bits == cb.bits, what, ": ", name, " codes are ", c.groups, " groups x ",
             c.bits, " bits but the ", name, " codebook has ", cb.groups, " groups x ", cb.bits, " bits");
    CQ_CHECK(c.tokens == 0 || (c.pool != nullptr && c.pages != nullptr && c.page_tokens >= block_tokens &&
                               c.page_tokens % block_tokens == 0),
             what, ": ", name, " codes of ", c.tokens, " tokens need a pool, a page table and pages of a multiple of ",
             block_tokens, " tokens (page_tokens = ", c.page_tokens, ")");
  };
  codes(kv.key_codes, kv.key_codebook, "key");
  codes(kv.value_codes, kv.value_codebook, "value");
  auto rows = [&](const PagedRowsView<T>& r, const char* name) {
    CQ_CHECK(r.rows == 0 || (r.dim == D && r.pool != nullptr && r.pages != nullptr && r.page_rows >= 1 &&
                             r.row_stride >= D),
             what, ": ", name, " rows (", r.rows, " of dim ", r.dim, ", page_rows ", r.page_rows, ", row_stride ",
             r.row_stride, ") do not fit head_dim ", D);
  };
  rows(kv.sink_keys, "sink key");
  rows(kv.sink_values, "sink value");
  rows(kv.recent_keys, "recent key");
  rows(kv.recent_values, "recent value");
  CQ_CHECK(kv.rope == nullptr || kv.rope->head_dim() == D, what, ": RoPE for head_dim ",
           kv.rope ? kv.rope->head_dim() : 0, ", head_dim is ", D);
}

/// Checks that a view holds what a query at position `pos` reads (attention/problem.hpp).
template <element_type T>
VisibleTokens check_visible(const KVHeadView<T>& kv, std::size_t pos, const char* what) {
  CQ_CHECK(pos < SIZE_MAX - kv.position_offset, what, ": position ", pos, " overflows");
  const VisibleTokens vis = visible_tokens(pos, kv.sinks, kv.window);
  CQ_CHECK(kv.sink_keys.holds(0, vis.sink_end) && kv.sink_values.holds(0, vis.sink_end), what, ": position ", pos,
           " reads ", vis.sink_end, " sink tokens; the view holds ", kv.sink_keys.rows, " key and ",
           kv.sink_values.rows, " value rows");
  CQ_CHECK(vis.coded() <= kv.key_codes.tokens && vis.coded() <= kv.value_codes.tokens, what, ": position ", pos,
           " reads ", vis.coded(), " coded tokens; the view holds ", kv.key_codes.tokens, " key and ",
           kv.value_codes.tokens, " value codes");
  CQ_CHECK(kv.recent_keys.holds(vis.window_begin, vis.window_end) &&
               kv.recent_values.holds(vis.window_begin, vis.window_end),
           what, ": the window of position ", pos, " is [", vis.window_begin, ", ", vis.window_end,
           ") but full-precision rows cover keys [", kv.recent_keys.first, ", ", kv.recent_keys.first + kv.recent_keys.rows,
           ") and values [", kv.recent_values.first, ", ", kv.recent_values.first + kv.recent_values.rows, ")");
  return vis;
}

/// A softmax scale: `scale` if given (finite, non-zero), else 1 / sqrt(head_dim).
inline float resolve_scale(float scale, std::size_t head_dim, const char* what) {
  CQ_CHECK(std::isfinite(scale), what, ": scale ", scale, " is not finite");
  return scale != 0.0f ? scale : 1.0f / std::sqrt(float(head_dim));
}

}  // namespace detail
}  // namespace cq
