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

}  // namespace cq::bench
