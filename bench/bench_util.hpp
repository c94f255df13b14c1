#pragma once
// Shared data for cq's benchmarks: the KV-shaped synthetic matrix of issue "Core" (32768 x 128,
// low-rank + outlier channels + noise, seed 42), built once per process.

#include <cq/cq.hpp>

#include <vector>

namespace cq::bench {

inline constexpr std::size_t kv_rows = 32768;
inline constexpr std::size_t head_dim = 128;

inline const std::vector<float>& kv_data() {
  static const std::vector<float> data = synthetic_kv(kv_rows, head_dim);
  return data;
}

/// One layer of CQ-{C}c8b codebooks for `kv_heads` KV heads of head_dim 128, keys and values
/// fitted (`iterations` Lloyd steps) on 8192 synthetic KV-like rows (seed 3): attention benchmarks'
/// codebooks, whose values do not change the work attention does.
inline KVCodebooks synthetic_kv_codebooks(std::size_t kv_heads, std::size_t C, KeyRope key_rope,
                                          unsigned iterations) {
  const auto rows = synthetic_kv(8192, head_dim, {.seed = 3});
  KVCodebooks cb(1, kv_heads, head_dim, {{{C, 8}, {C, 8}}}, key_rope);
  FitOptions o;
  o.iterations = iterations;
  for (std::size_t h = 0; h < kv_heads; ++h) {
    Codebook k(head_dim, C, 8), v(head_dim, C, 8);
    fit_codebook(k, ConstMatrixView<float>(rows.data(), 8192, head_dim), {}, o);
    fit_codebook(v, ConstMatrixView<float>(rows.data(), 8192, head_dim), {}, o);
    cb.set(0, h, std::move(k), std::move(v));
  }
  return cb;
}

}  // namespace cq::bench
