#pragma once
/// Copying one centroid (C floats) into a row: shared by the SIMD decoder and the pre-RoPE
/// scoring in attention.hpp.

#include "cq/config.hpp"
#include "cq/element.hpp"

#include <cstddef>
#include <cstring>
#include <type_traits>

namespace cq::detail {

/// Copies `C` floats of a centroid into an output row, converting to T. Fixed-size copies for the
/// common group widths so the compiler emits one or two vector moves (a runtime-size memcpy of 32
/// bytes is a library call).
template <element_type T>
CQ_ALWAYS_INLINE void put_centroid(const float* CQ_RESTRICT c, std::size_t C, T* CQ_RESTRICT out) {
  if constexpr (std::is_same_v<T, float>) {
    switch (C) {
      case 2: std::memcpy(out, c, 2 * sizeof(float)); return;
      case 4: std::memcpy(out, c, 4 * sizeof(float)); return;
      case 8: std::memcpy(out, c, 8 * sizeof(float)); return;
      case 16: std::memcpy(out, c, 16 * sizeof(float)); return;
      default: std::memcpy(out, c, C * sizeof(float)); return;
    }
  } else {
    for (std::size_t j = 0; j < C; ++j) out[j] = from_float<T>(c[j]);
  }
}

}  // namespace cq::detail
