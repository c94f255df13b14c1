#pragma once
/// Element types cq accepts for activations: float, and the 16-bit storage types Eigen::half
/// (IEEE fp16) and Eigen::bfloat16. All arithmetic happens in float.

#include "cq/config.hpp"

#include <Eigen/Core>

#include <concepts>
#include <cstdint>
#include <string_view>
#include <type_traits>

namespace cq {

using half = Eigen::half;
using bfloat16 = Eigen::bfloat16;

/// The element types the quantizers, caches and file formats accept.
template <class T>
concept element_type =
    std::same_as<T, float> || std::same_as<T, half> || std::same_as<T, bfloat16>;

/// Tensor data types as named in safetensors headers.
enum class DType : std::uint8_t { f32, f16, bf16, f64, i32, u8, u16, i64 };

inline constexpr std::string_view dtype_name(DType d) {
  switch (d) {
    case DType::f32: return "F32";
    case DType::f16: return "F16";
    case DType::bf16: return "BF16";
    case DType::f64: return "F64";
    case DType::i32: return "I32";
    case DType::u8: return "U8";
    case DType::u16: return "U16";
    case DType::i64: return "I64";
  }
  return "?";
}

inline constexpr std::size_t dtype_size(DType d) {
  switch (d) {
    case DType::f32: case DType::i32: return 4;
    case DType::f16: case DType::bf16: case DType::u16: return 2;
    case DType::f64: case DType::i64: return 8;
    case DType::u8: return 1;
  }
  return 0;
}

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
