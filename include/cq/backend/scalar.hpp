#pragma once
/// backend::Scalar — the reference backend: short, obvious, compiled everywhere. Every other
/// backend is tested against it. Distances are computed directly as sum_c (x_c - c_kc)^2.

#include "cq/backend/scalar_attention.hpp"
#include "cq/codebook.hpp"
#include "cq/element.hpp"
#include "cq/packed_codes.hpp"
#include "cq/views.hpp"

#include <cstdint>
#include <limits>
#include <string_view>

namespace cq::backend {

struct Scalar : ScalarAttentionOps {
  static constexpr std::string_view name = "scalar";

  /// Nearest centroid (L2) of each point; ties go to the lowest index.
  /// points: (n, channels) view, codes: n outputs.
  template <element_type T>
  static void assign(const GroupCodebookView& cb, ConstMatrixView<T> points, std::uint32_t* codes) {
    for (std::size_t i = 0; i < points.rows; ++i) {
      const T* x = points.row(i);
      float best = std::numeric_limits<float>::infinity();
      std::uint32_t best_k = 0;
      for (std::uint32_t k = 0; k < cb.num_centroids; ++k) {
        const float* c = cb.centroids + std::size_t{k} * cb.channels;
        float d = 0.0f;
        for (std::uint32_t j = 0; j < cb.channels; ++j) {
          const float diff = to_float(x[j]) - c[j];
          d += diff * diff;
        }
        if (d < best) {
          best = d;
          best_k = k;
        }
      }
      codes[i] = best_k;
    }
  }

  /// Reconstructs tokens [first, first + out.rows) of `codes` into out (rows, dim).
  template <element_type T>
  static void decode(const CodebookView& cb, ConstPackedCodesView codes, std::size_t first, MatrixView<T> out) {
    for (std::size_t r = 0; r < out.rows; ++r) {
      for (std::size_t g = 0; g < cb.groups; ++g) {
        const std::uint32_t k = codes.get(first + r, g);
        const float* c = cb.centroids + (g * cb.num_centroids() + k) * cb.channels;
        for (std::size_t j = 0; j < cb.channels; ++j) out(r, g * cb.channels + j) = from_float<T>(c[j]);
      }
    }
  }
};

}  // namespace cq::backend
