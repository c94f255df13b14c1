#pragma once
/// How a paged cache is configured and how much memory it takes, before it exists: bytes per
/// token, pages for a number of tokens, and the pool for a token budget — so an engine sizes its
/// pool once and nothing allocates afterwards.

#include "cq/attention/head_view.hpp"
#include "cq/cache/layout.hpp"
#include "cq/detail/checked.hpp"
#include "cq/error.hpp"
#include "cq/executor.hpp"
#include "cq/kv_codebooks.hpp"
#include "cq/packed_codes.hpp"
#include "cq/rope.hpp"

#include <algorithm>
#include <cstddef>
#include <memory_resource>
#include <optional>
#include <span>
#include <vector>

namespace cq {

/// A paged cache's settings (the engine's choices; shapes and configurations come from the
/// KVCodebooks).
struct PagedCacheOptions {
  std::size_t page_tokens = 256;     // tokens per code page, a multiple of 32
  std::size_t full_page_rows = 8;    // rows per full-precision page (sinks, window)
  std::size_t window = 32;           // W: most recent tokens attention reads in full precision
  std::size_t sinks = 0;             // S: first tokens kept in full precision
  /// Rollback beyond the last append that truncate() always honours (rolling back the last
  /// append itself always works): full-precision rows kept beyond the window.
  std::size_t max_rollback = 0;
  std::size_t max_sequences = 256;   // live sequences at once
  std::size_t code_pages = 0;        // pool size (MemoryPlan::pool_for sizes it for a token budget)
  std::size_t full_pages = 0;
  bool pre_rope_keys = false;        // keys are appended before RoPE (must match the codebooks)
  RopeConfig rope;                   // the model's RoPE (pre-RoPE keys; must match the codebooks)
  /// Where pages and tables come from (default: the default memory resource, new/delete).
  std::pmr::memory_resource* memory = nullptr;
  /// Engine-owned page memory (64-byte aligned), if any: code pages first, then full-precision
  /// pages, MemoryPlan::pool_bytes() bytes. Tables still come from `memory`.
  std::span<std::byte> pool_memory = {};
};

/// The RoPE a cache rotates its keys with: checks `opt` against what the key codebooks were fitted
/// on -- keys before or after RoPE as the codebooks record it, and for pre-RoPE keys the same RoPE --
/// and returns the Rope when keys are pre-RoPE (validated for the head_dim), else nothing. Throws
/// cq::Error, its message starting with `what` (the cache), naming the mismatch.
inline std::optional<Rope> cache_key_rope(const KVCodebooks& codebooks, const PagedCacheOptions& opt, const char* what) {
  CQ_CHECK(codebooks.key_rope() != KeyRope::unknown, what,
           ": the key codebooks do not record whether keys were coded before or after RoPE; ",
           "re-run cq-calibrate, or stamp the file with --key-rope");
  const KeyRope want = opt.pre_rope_keys ? KeyRope::pre : KeyRope::post;
  CQ_CHECK(codebooks.key_rope() == want, what, ": the cache takes ", key_rope_name(want),
           " keys but the key codebooks were fitted on ", key_rope_name(codebooks.key_rope()), " keys");
  if (!opt.pre_rope_keys) return std::nullopt;
  CQ_CHECK(codebooks.rope() == opt.rope, what, ": the cache's RoPE (", describe(opt.rope),
           ") differs from the one the key codebooks were fitted with (", describe(codebooks.rope()), ")");
  return Rope(opt.rope, codebooks.head_dim());
}

/// Bytes held, by part. `*_in_use` count the pages sequences hold; the others what is allocated.
struct MemoryUsage {
  std::size_t codes = 0, full = 0, codebooks = 0, tables = 0;
  std::size_t codes_in_use = 0, full_in_use = 0;
  std::size_t total() const { return codes + full + codebooks + tables; }
  std::size_t in_use() const { return codes_in_use + full_in_use + codebooks + tables; }
};

/// Options for attention calls.
struct AttendOptions {
  float scale = 0.0f;                               // 0: 1 / sqrt(head_dim); must be finite
  float logits_soft_cap = 0.0f;                     // > 0: logits soft-capped to cap x tanh(logit / cap) (Gemma 2)
  Executor* executor = nullptr;                     // spread sequences, heads and long ranges over threads
  AttentionMethod method = AttentionMethod::fused;  // dequantize: the decode-then-attend baseline
};

/// The page layouts and sizes of a cache of codebooks `cb` and options `opt`, for element type
/// bytes `element_bytes`. Throws cq::Error naming any option that does not fit.
class MemoryPlan {
 public:
  MemoryPlan(const KVCodebooks& cb, const PagedCacheOptions& opt, std::size_t element_bytes)
      : opt_(opt), layers_(cb.layers()) {
    CQ_CHECK(opt.page_tokens >= block_tokens && opt.page_tokens % block_tokens == 0 && opt.page_tokens <= (1u << 20),
             "paged cache: page_tokens ", opt.page_tokens, " must be a multiple of ", block_tokens, " in [32, 2^20]");
    CQ_CHECK(opt.full_page_rows >= 1 && opt.full_page_rows <= (1u << 20), "paged cache: full_page_rows ",
             opt.full_page_rows, " must be in [1, 2^20]");
    CQ_CHECK(opt.max_sequences >= 1 && opt.max_sequences < UINT32_MAX, "paged cache: max_sequences ",
             opt.max_sequences, " must be in [1, 2^32 - 1)");
    // Windows, sinks and rollbacks are token counts: bounded so that every sum of them and a
    // sequence length stays far from wrapping.
    constexpr std::size_t max_tokens = std::size_t{1} << 40;
    CQ_CHECK(opt.window <= max_tokens, "paged cache: window ", opt.window, " exceeds 2^40 tokens");
    CQ_CHECK(opt.sinks <= max_tokens, "paged cache: sinks ", opt.sinks, " exceeds 2^40 tokens");
    CQ_CHECK(opt.max_rollback <= max_tokens, "paged cache: max_rollback ", opt.max_rollback, " exceeds 2^40 tokens");
    for (std::size_t l = 0; l < layers_; ++l) {
      const LayerSpec& s = cb.spec(l);
      CodePageLayout c;
      c.page_tokens = opt.page_tokens;
      c.kv_heads = cb.kv_heads();
      c.key_block_bytes = cb.head_dim() / s.key.channels * detail::chunk_bytes(s.key.bits);
      c.value_block_bytes = cb.head_dim() / s.value.channels * detail::chunk_bytes(s.value.bits);
      detail::checked_mul(detail::checked_mul(c.head_bytes() / c.blocks(), c.blocks(), "code page"), c.kv_heads,
                          "code page");
      code_.push_back(c);
      code_bytes_.push_back(c.page_bytes());
      FullPageLayout f{opt.full_page_rows, cb.kv_heads(), cb.head_dim(), element_bytes};
      detail::checked_mul(detail::checked_mul(f.head_elements(), f.kv_heads, "full-precision page"), element_bytes,
                          "full-precision page");
      full_.push_back(f);
      full_bytes_.push_back(f.page_bytes());
    }
  }

  const CodePageLayout& code_layout(std::size_t layer) const { return code_[layer]; }
  const FullPageLayout& full_layout(std::size_t layer) const { return full_[layer]; }
  std::span<const std::size_t> code_layer_bytes() const { return code_bytes_; }
  std::span<const std::size_t> full_layer_bytes() const { return full_bytes_; }
  /// Bytes of one code page id (all layers) and of one full-precision page id.
  std::size_t code_page_bytes() const { return sum(code_bytes_); }
  std::size_t full_page_bytes() const { return sum(full_bytes_); }

  /// Code bytes per token over all layers and heads (whole pages: page_bytes / page_tokens).
  double code_bytes_per_token() const { return double(code_page_bytes()) / double(opt_.page_tokens); }
  /// Code pages a sequence of `tokens` tokens holds.
  std::size_t code_pages_for(std::size_t tokens) const {
    const std::size_t coded = tokens > opt_.sinks ? tokens - opt_.sinks : 0;
    return (coded + opt_.page_tokens - 1) / opt_.page_tokens;
  }
  /// Full-precision pages a sequence holds at most when every append has at most `max_append`
  /// tokens: the sinks' pages, and the rows kept (sequence_table.hpp: the window and the rollback
  /// before the last append of the layer furthest behind, that append, and the append under way),
  /// spread over pages (a partial one at each end).
  std::size_t full_pages_for(std::size_t max_append) const {
    const std::size_t P = opt_.full_page_rows;
    const std::size_t rows = opt_.window + opt_.max_rollback + 2 * max_append;
    return (opt_.sinks + P - 1) / P + (rows + P - 1) / P + 1;
  }
  /// Options with the pool sized for `sequences` sequences of up to `tokens` tokens each, appended
  /// at most `max_append` tokens at a time.
  PagedCacheOptions pool_for(std::size_t sequences, std::size_t tokens, std::size_t max_append = 1) const {
    PagedCacheOptions o = opt_;
    o.max_sequences = std::max<std::size_t>(sequences, 1);
    o.code_pages = detail::checked_mul(sequences, code_pages_for(tokens), "pool_for: code pages");
    o.full_pages = detail::checked_mul(sequences, full_pages_for(max_append), "pool_for: full-precision pages");
    return o;
  }
  /// Bytes of page memory the options' pool takes (what an engine-supplied buffer must hold).
  std::size_t pool_bytes(const PagedCacheOptions& o) const {
    return detail::checked_add(detail::checked_mul(code_page_bytes(), o.code_pages, "pool"),
                               detail::checked_mul(full_page_bytes(), o.full_pages, "pool"), "pool");
  }

 private:
  static std::size_t sum(const std::vector<std::size_t>& v) {
    std::size_t s = 0;
    for (std::size_t x : v) s += x;
    return s;
  }

  PagedCacheOptions opt_;
  std::size_t layers_;
  std::vector<CodePageLayout> code_;
  std::vector<FullPageLayout> full_;
  std::vector<std::size_t> code_bytes_, full_bytes_;
};

}  // namespace cq
