#pragma once
// The attention conformance cases, one description shared by every backend's suite (CPU here,
// CUDA in tests/cuda): shapes, windows, sinks, GQA groups, ragged batches, several query rows
// (speculative decoding, chunked prefill) and pre-RoPE keys; and the cache each case builds.
// Every backend is compared with the double-precision oracle (attention_oracle.hpp).

#include "../attention_oracle.hpp"

#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace cq::test {

struct AttentionCase {
  std::size_t D = 128, C = 8;
  int bits = 8;
  std::size_t window = 32, sinks = 0, group = 1, kv_heads = 2;
  std::vector<std::size_t> lengths{300};  // one sequence each
  std::size_t queries = 1;                // query rows per sequence: the last ones, causal
  std::optional<RopeConfig> rope;         // keys appended before RoPE when set
  std::size_t page_tokens = 64;
  std::uint64_t seed = 1;
  float value_scale = 1.0f;  // multiplies the values and their codebooks (the output scales with them)
  float soft_cap = 0.0f;     // logit soft cap (0: none)

  /// A shape; the with_* calls set the rest.
  static AttentionCase of(std::size_t D, std::size_t C, int bits, std::size_t window, std::size_t sinks,
                          std::size_t group, std::vector<std::size_t> lengths) {
    AttentionCase c;
    c.D = D, c.C = C, c.bits = bits, c.window = window, c.sinks = sinks, c.group = group, c.lengths = std::move(lengths);
    return c;
  }
  AttentionCase with_queries(std::size_t q) const { AttentionCase c = *this; c.queries = q; return c; }
  AttentionCase with_rope(const RopeConfig& r) const { AttentionCase c = *this; c.rope = r; return c; }
  AttentionCase with_pages(std::size_t p) const { AttentionCase c = *this; c.page_tokens = p; return c; }
  AttentionCase with_seed(std::uint64_t s) const { AttentionCase c = *this; c.seed = s; return c; }
  AttentionCase with_soft_cap(float cap) const { AttentionCase c = *this; c.soft_cap = cap; return c; }

  std::string name() const {
    return detail::concat("D", D, " ", C, "c", bits, "b W", window, " S", sinks, " GQA", group, " q", queries,
                          rope ? " pre-RoPE" : "", " P", page_tokens, value_scale != 1.0f ? " values x" : "",
                          value_scale != 1.0f ? std::to_string(value_scale) : "",
                          soft_cap > 0.0f ? " cap " + std::to_string(soft_cap) : "");
  }
};

/// The shared grid (D 64/128, C 2/4/8, bits 4/8/10, window 0/32, sinks 0/4, GQA 1/4/8, ragged
/// pairs of sequences whose lengths straddle blocks, steps, pages and the switch to value
/// histograms), then speculative (3 queries) and prefill (40 queries) rows, pre-RoPE keys in both
/// pair orders, and pages of 32 and 256 tokens. `every` keeps every n-th grid shape.
inline std::vector<AttentionCase> attention_cases(std::size_t every = 1) {
  std::vector<AttentionCase> out;
  const std::size_t lengths[] = {1, 37, 300, 1100, 77, 545, 0, 64};
  std::uint64_t seed = 1;
  for_each_attention_shape([&](std::size_t D, std::size_t C, int bits, std::size_t window, std::size_t sinks,
                               std::size_t group, std::uint64_t) {
    ++seed;
    if (seed % every != 0) return;
    AttentionCase c;
    c.D = D, c.C = C, c.bits = bits, c.window = window, c.sinks = sinks, c.group = group, c.seed = seed;
    c.lengths = {lengths[seed % 8], lengths[(seed / 8) % 8] + 1};
    if (D == 128 && bits == 10 && group == 8) c.lengths = {37, 300};  // keep the grid fast
    out.push_back(c);
  });
  auto special = [&](AttentionCase c) {
    c.seed = ++seed;
    out.push_back(c);
  };
  special(AttentionCase::of(64, 4, 8, 32, 4, 4, {300, 45}).with_queries(3));
  special(AttentionCase::of(64, 8, 8, 0, 0, 1, {545}).with_queries(17));
  special(AttentionCase::of(64, 4, 8, 32, 4, 4, {300}).with_queries(40));
  for (RopeStyle style : {RopeStyle::rotate_half, RopeStyle::interleaved}) {
    RopeConfig r;
    r.style = style;
    special(AttentionCase::of(128, 8, 8, 32, 4, 4, {1100, 3}).with_rope(r));
    special(AttentionCase::of(64, 4, 4, 0, 0, 1, {300}).with_queries(2).with_rope(r));
    special(AttentionCase::of(64, 2, 8, 32, 0, 8, {545}).with_rope(r));
    special(AttentionCase::of(128, 4, 8, 32, 0, 8, {2100}).with_queries(3).with_rope(r));  // grouped, pre-RoPE
    // Partial rotary_dim, group widths 2..16, odd head counts and code widths, on the per-head
    // and grouped paths; rotary_dim 24 is outside the SIMD kernels' shapes (the scalar fallback).
    RopeConfig partial = r;
    partial.rotary_dim = 64;
    special(AttentionCase::of(128, 8, 8, 32, 4, 1, {1100, 70}).with_rope(partial));
    special(AttentionCase::of(128, 16, 8, 32, 0, 3, {777}).with_rope(partial));
    partial.rotary_dim = 96;
    special(AttentionCase::of(128, 8, 8, 32, 0, 8, {1300, 45}).with_rope(partial));  // grouped
    partial.rotary_dim = 32;
    special(AttentionCase::of(64, 2, 8, 0, 0, 2, {333}).with_queries(2).with_rope(partial));
    partial.rotary_dim = 24;
    special(AttentionCase::of(64, 4, 8, 32, 0, 1, {200}).with_rope(partial));
    // Full rotary_dim at head sizes 64 and 128 (the AVX-512 kernels' compile-time shapes): one
    // head, two heads, 4-bit codes, and a grouped item of 6 heads (tiles of 4 and 2).
    special(AttentionCase::of(128, 8, 8, 32, 0, 1, {1100, 37}).with_rope(r));
    special(AttentionCase::of(64, 16, 8, 0, 4, 1, {545}).with_rope(r));
    special(AttentionCase::of(128, 8, 4, 32, 0, 2, {700}).with_rope(r));
    special(AttentionCase::of(64, 8, 8, 32, 0, 6, {1300}).with_rope(r));  // grouped
    RopeConfig yarn = r;
    yarn.scaling = RopeScaling::yarn;
    yarn.factor = 4.0;
    special(AttentionCase::of(128, 16, 8, 32, 0, 4, {1500}).with_rope(yarn));  // grouped, C = 16
    special(AttentionCase::of(64, 4, 10, 32, 4, 1, {301}).with_rope(yarn));     // 10-bit codes
  }
  special(AttentionCase::of(128, 8, 8, 32, 4, 7, {700, 1, 2500}).with_pages(32));
  special(AttentionCase::of(128, 4, 8, 32, 0, 8, {2500, 600}).with_pages(256));
  special(AttentionCase::of(128, 8, 8, 32, 0, 16, {1500}).with_queries(2));  // a group of 16 heads
  special(AttentionCase::of(64, 4, 8, 0, 0, 20, {1300}));                   // 20 heads: items of 16 and 4
  // Logit soft-capping (Gemma 2): caps of 0.7 and 2 bite into these scores (about unit-normal), on
  // the per-head and grouped paths, sinks and windows, several query rows, pre-RoPE keys, 2c8b.
  special(AttentionCase::of(128, 8, 8, 32, 4, 1, {1100, 37}).with_soft_cap(0.7f));
  special(AttentionCase::of(128, 8, 8, 32, 0, 8, {2100, 300}).with_soft_cap(2.0f));  // grouped
  special(AttentionCase::of(64, 4, 8, 32, 4, 4, {545}).with_queries(3).with_soft_cap(0.7f));
  special(AttentionCase::of(128, 2, 8, 0, 0, 4, {1300}).with_soft_cap(2.0f));
  special(AttentionCase::of(128, 8, 8, 32, 4, 4, {1100}).with_rope(RopeConfig{}).with_soft_cap(0.7f));
  special(AttentionCase::of(128, 4, 8, 32, 0, 8, {2100}).with_rope(RopeConfig{}).with_soft_cap(2.0f));  // grouped
  return out;
}

/// A case's cache: shared codebooks, a paged cache with one sequence per length (appended in
/// uneven chunks, so windows and pages are crossed at every phase) and the queries.
template <element_type T, class Backend = backend::Native>
struct CaseCache {
  std::unique_ptr<KVCodebooks> codebooks;
  std::unique_ptr<PagedKVCache<T, Backend>> cache;
  std::vector<SeqId> seqs;
  std::vector<std::size_t> indptr;  // query rows of each sequence
  std::vector<float> q;             // (rows, q_heads * D)
  std::size_t q_heads = 0;
};

template <element_type T, class Backend = backend::Native>
CaseCache<T, Backend> build_case(const AttentionCase& c) {
  CaseCache<T, Backend> cc;
  const std::size_t H = c.kv_heads, D = c.D, width = H * D;
  cc.codebooks = std::make_unique<KVCodebooks>(1, H, D, std::vector<LayerSpec>{{{c.C, c.bits}, {c.C, c.bits}}},
                                               c.rope ? KeyRope::pre : KeyRope::post, c.rope.value_or(RopeConfig{}));
  for (std::size_t h = 0; h < H; ++h) {
    Codebook values = random_codebook(D, c.C, c.bits, c.seed + 2 * h + 1);
    if (c.value_scale != 1.0f) {
      std::vector<float> v(values.data(), values.data() + values.size());
      for (float& x : v) x *= c.value_scale;
      values.set_all(v.data());
    }
    cc.codebooks->set(0, h, random_codebook(D, c.C, c.bits, c.seed + 2 * h), std::move(values));
  }
  PagedCacheOptions o;
  o.page_tokens = c.page_tokens;
  o.full_page_rows = 16;
  o.window = c.window;
  o.sinks = c.sinks;
  o.max_sequences = c.lengths.size();
  o.pre_rope_keys = c.rope.has_value();
  o.rope = c.rope.value_or(RopeConfig{});
  std::size_t longest = 0;
  for (std::size_t n : c.lengths) longest = std::max(longest, n);
  const MemoryPlan plan(*cc.codebooks, o, sizeof(T));
  cc.cache = std::make_unique<PagedKVCache<T, Backend>>(*cc.codebooks,
                                                       plan.pool_for(c.lengths.size(), longest, std::max<std::size_t>(41, c.queries)));
  cc.q_heads = H * c.group;
  cc.indptr.push_back(0);
  for (std::size_t i = 0; i < c.lengths.size(); ++i) {
    const std::size_t n = c.lengths[i];
    const SeqId s = cc.cache->add_sequence(c.rope ? 1000 * i : 0);  // pre-RoPE: positions from an offset too
    cc.seqs.push_back(s);
    const auto k = convert<T>(random_normal(n * width, c.seed + 7 + 31 * i));
    auto vf = random_normal(n * width, c.seed + 8 + 31 * i);
    for (float& x : vf) x *= c.value_scale;
    const auto v = convert<T>(vf);
    // The query rows arrive as the last chunk (a prefill chunk, or a speculative draft).
    const std::size_t last = std::min(c.queries, n);
    for (std::size_t t = 0; t < n;) {
      const std::size_t take = t < n - last ? std::min<std::size_t>(n - last - t, 1 + (t * 7 + c.seed) % 41) : last;
      cc.cache->append(0, s, ConstMatrixView<T>(k.data() + t * width, take, width),
                       ConstMatrixView<T>(v.data() + t * width, take, width));
      t += take;
    }
    cc.indptr.push_back(cc.indptr.back() + last);
  }
  cc.q = random_normal(cc.indptr.back() * cc.q_heads * D, c.seed + 99);
  return cc;
}

/// Checks batched outputs `out` (rows, q_heads * D) of a case against the oracle, within `tol`;
/// returns the largest relative error.
template <element_type T, class Backend>
double check_against_oracle(const AttentionCase& c, const CaseCache<T, Backend>& cc, const std::vector<float>& out,
                            double tol) {
  double worst = 0.0;
  const std::size_t D = c.D, qw = cc.q_heads * D;
  for (std::size_t i = 0; i < cc.seqs.size(); ++i) {
    const std::size_t n = cc.cache->length(cc.seqs[i]), rows = cc.indptr[i + 1] - cc.indptr[i];
    for (std::size_t r = 0; r < rows; ++r)
      for (std::size_t h = 0; h < c.kv_heads; ++h) {
        const std::size_t row = cc.indptr[i] + r;
        const auto ref = oracle_attend(cc.cache->head_view(0, cc.seqs[i], h), cc.q.data() + row * qw + h * c.group * D,
                                       c.group, query_position(n, rows, r), 1.0f / std::sqrt(float(D)), c.soft_cap);
        const double e = relative_error(out.data() + row * qw + h * c.group * D, ref);
        CAPTURE(i);
        CAPTURE(r);
        CAPTURE(h);
        CHECK(e < tol);
        worst = std::max(worst, e);
      }
  }
  return worst;
}

}  // namespace cq::test
