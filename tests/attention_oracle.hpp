#pragma once
// The obvious attention, in double: materialise every visible key and value (sinks, decoded codes
// through the scalar backend, window), rotate pre-RoPE coded keys with exact sincos, softmax,
// weighted sum. The oracle every attention path is tested against.

#include "test_util.hpp"

#include <cmath>
#include <vector>

namespace cq::test {

/// Every key and value the query at `pos` sees, as floats (keys rotated when the view is pre-RoPE),
/// appended to keys and values.
template <element_type T>
void oracle_rows(const KVHeadView<T>& kv, std::size_t pos, std::vector<std::vector<float>>& keys,
                 std::vector<std::vector<float>>& values) {
  const std::size_t D = kv.head_dim, visible = pos + 1;
  const VisibleTokens vis = visible_tokens(pos, kv.sinks, kv.window);
  std::vector<float> k(D), v(D);
  for (std::size_t p = 0; p < visible; ++p) {
    if (p < vis.sink_end || p >= vis.window_begin) {
      const T* kr = p < vis.sink_end ? kv.sink_keys.at(p) : kv.recent_keys.at(p);
      const T* vr = p < vis.sink_end ? kv.sink_values.at(p) : kv.recent_values.at(p);
      for (std::size_t i = 0; i < D; ++i) k[i] = to_float(kr[i]), v[i] = to_float(vr[i]);
    } else {
      for (std::size_t g = 0; g < kv.key_codebook.groups; ++g)
        for (std::size_t c = 0; c < kv.key_codebook.channels; ++c)
          k[g * kv.key_codebook.channels + c] = kv.key_codebook.centroids[(g * kv.key_codebook.num_centroids() +
                                                                           kv.key_codes.get(p - kv.sinks, g)) *
                                                                              kv.key_codebook.channels +
                                                                          c];
      for (std::size_t g = 0; g < kv.value_codebook.groups; ++g)
        for (std::size_t c = 0; c < kv.value_codebook.channels; ++c)
          v[g * kv.value_codebook.channels + c] =
              kv.value_codebook.centroids[(g * kv.value_codebook.num_centroids() + kv.value_codes.get(p - kv.sinks, g)) *
                                              kv.value_codebook.channels +
                                          c];
    }
    if (kv.rope) kv.rope->rotate(k.data(), p + kv.position_offset);  // every key of a pre-RoPE view, exact sincos
    keys.push_back(k);
    values.push_back(v);
  }
}

/// Attention of `heads` queries (heads x D) over the given rows, in double; logits soft-capped to
/// cap tanh(logit / cap) when soft_cap > 0.
inline std::vector<double> oracle_over(const std::vector<std::vector<float>>& keys,
                                       const std::vector<std::vector<float>>& values, const float* q,
                                       std::size_t heads, std::size_t D, float scale, float soft_cap = 0.0f) {
  const std::size_t visible = keys.size();
  std::vector<double> out(heads * D, 0.0);
  for (std::size_t h = 0; h < heads; ++h) {
    std::vector<double> s(visible);
    double m = -1e300;
    for (std::size_t p = 0; p < visible; ++p) {
      double d = 0.0;
      for (std::size_t i = 0; i < D; ++i) d += double(q[h * D + i]) * keys[p][i];
      s[p] = d * scale;
      if (soft_cap > 0.0f) s[p] = soft_cap * std::tanh(s[p] / soft_cap);
      m = std::max(m, s[p]);
    }
    double sum = 0.0;
    for (auto& x : s) sum += x = std::exp(x - m);
    for (std::size_t p = 0; p < visible; ++p)
      for (std::size_t i = 0; i < D; ++i) out[h * D + i] += s[p] / sum * values[p][i];
  }
  return out;
}

template <element_type T>
std::vector<double> oracle_attend(const KVHeadView<T>& kv, const float* q, std::size_t heads, std::size_t pos,
                                  float scale, float soft_cap = 0.0f) {
  std::vector<std::vector<float>> keys, values;
  oracle_rows(kv, pos, keys, values);
  return oracle_over(keys, values, q, heads, kv.head_dim, scale, soft_cap);
}

/// The attention tests' shape grid: head_dim 64/128, C 2/4/8, bits 4/8/10, window 0/32, sinks
/// 0/4, GQA group 1/4/8 — f(D, C, bits, window, sinks, group, seed) for each, seeds 2, 3, ...
template <class F>
void for_each_attention_shape(F&& f) {
  std::uint64_t seed = 1;
  for (std::size_t D : {64u, 128u})
    for (std::size_t C : {2u, 4u, 8u})
      for (int bits : {4, 8, 10})
        for (std::size_t window : {0u, 32u})
          for (std::size_t sinks : {0u, 4u})
            for (std::size_t group : {1u, 4u, 8u}) f(D, C, bits, window, sinks, group, ++seed);
}

/// ||a - b|| / ||b||.
inline double relative_error(const float* a, const std::vector<double>& b) {
  double num = 0.0, den = 0.0;
  for (std::size_t i = 0; i < b.size(); ++i) {
    num += (a[i] - b[i]) * (a[i] - b[i]);
    den += b[i] * b[i];
  }
  return std::sqrt(num / std::max(den, 1e-300));
}

/// A cache of `tokens` random tokens with random codebooks, for attention tests.
template <element_type T, class Backend = backend::Native>
KVCache<T, Backend> random_cache(const KVCacheConfig& cfg, std::size_t tokens, std::uint64_t seed) {
  KVCache<T, Backend> cache(cfg);
  for (std::size_t l = 0; l < cfg.layers; ++l) {
    const LayerSpec& s = cfg.layer_spec(l);
    for (std::size_t h = 0; h < cfg.kv_heads; ++h)
      cache.set_codebooks(l, h, random_codebook(cfg.head_dim, s.key.channels, s.key.bits, seed + 100 * l + 2 * h),
                          random_codebook(cfg.head_dim, s.value.channels, s.value.bits, seed + 100 * l + 2 * h + 1));
    const std::size_t width = cfg.kv_heads * cfg.head_dim;
    const auto k = convert<T>(random_normal(tokens * width, seed + 7 + l));
    const auto v = convert<T>(random_normal(tokens * width, seed + 8 + l));
    // Append in uneven chunks, so window flushes happen at every phase.
    for (std::size_t t = 0; t < tokens;) {
      const std::size_t take = std::min<std::size_t>(tokens - t, 1 + (t * 7 + seed) % 41);
      cache.append(l, ConstMatrixView<T>(k.data() + t * width, take, width), ConstMatrixView<T>(v.data() + t * width, take, width));
      t += take;
    }
  }
  return cache;
}

}  // namespace cq::test
