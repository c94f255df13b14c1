#pragma once
/// Synthetic KV-cache-like data for demos, tests and benchmarks: rows that are correlated
/// (low-rank), with a few large-magnitude outlier channels (as real keys have) and noise. Fully
/// determined by the seed.

#include "cq/detail/rng.hpp"

#include <cmath>
#include <cstdint>
#include <vector>

namespace cq {

struct SyntheticKVOptions {
  std::size_t rank = 16;              // rank of the correlated part
  std::size_t outlier_channels = 4;   // channels with a large offset and scale
  float outlier_offset = 8.0f;
  float outlier_scale = 4.0f;
  float noise = 0.1f;
  std::uint64_t seed = 42;
};

/// (rows, dim) row-major floats: x = z A + mean + noise, z ~ N(0, I_rank), A with decaying row
/// scales; outlier channels get a constant offset and a scaled-up variance.
inline std::vector<float> synthetic_kv(std::size_t rows, std::size_t dim, const SyntheticKVOptions& o = {}) {
  detail::Rng rng(o.seed, 0x5eed);
  std::vector<float> basis(o.rank * dim), mean(dim, 0.0f), scale(dim, 1.0f);
  for (std::size_t j = 0; j < o.rank; ++j) {
    const float s = 1.0f / std::sqrt(1.0f + float(j));
    for (std::size_t d = 0; d < dim; ++d) basis[j * dim + d] = float(rng.normal()) * s / std::sqrt(float(o.rank) / 4.0f);
  }
  for (std::size_t i = 0; i < o.outlier_channels && i < dim; ++i) {
    const std::size_t d = static_cast<std::size_t>(rng.below(dim));
    mean[d] = (rng.uniform() < 0.5 ? -1.0f : 1.0f) * o.outlier_offset;
    scale[d] = o.outlier_scale;
  }
  std::vector<float> x(rows * dim);
  std::vector<float> z(o.rank);
  for (std::size_t r = 0; r < rows; ++r) {
    for (auto& v : z) v = float(rng.normal());
    for (std::size_t d = 0; d < dim; ++d) {
      float acc = 0.0f;
      for (std::size_t j = 0; j < o.rank; ++j) acc += z[j] * basis[j * dim + d];
      x[r * dim + d] = mean[d] + scale[d] * acc + o.noise * float(rng.normal());
    }
  }
  return x;
}

}  // namespace cq
