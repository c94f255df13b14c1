#pragma once
/// Element types cq accepts for activations: float, and the 16-bit storage types Eigen::half
/// (IEEE fp16) and Eigen::bfloat16. All arithmetic happens in float.

#include "cq/config.hpp"
#include "cq/dtype.hpp"

#include <Eigen/Core>

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <type_traits>

namespace cq {

using half = Eigen::half;
using bfloat16 = Eigen::bfloat16;

/// The element types the quantizers, caches and file formats accept.
template <class T>
concept element_type =
    std::same_as<T, float> || std::same_as<T, half> || std::same_as<T, bfloat16>;

template <element_type T>
inline constexpr DType dtype_of = std::same_as<T, float> ? DType::f32
                                  : std::same_as<T, half> ? DType::f16
                                                          : DType::bf16;

template <element_type T>
CQ_ALWAYS_INLINE float to_float(T v) {
  if constexpr (std::same_as<T, float>) return v;
  else return static_cast<float>(v);
}

template <element_type T>
CQ_ALWAYS_INLINE T from_float(float v) {
  if constexpr (std::same_as<T, float>) return v;
  else return T(v);
}

}  // namespace cq
