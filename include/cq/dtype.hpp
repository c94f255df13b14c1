#pragma once
/// Tensor data types (cq::DType): every dtype the safetensors format defines, their names and
/// sizes. Free of Eigen, so device code (include/cq/cuda) can name the element types of the tensors
/// it reads and writes; element.hpp adds the host element types (float, half, bfloat16).

#include <cstddef>
#include <cstdint>
#include <iterator>
#include <string_view>

namespace cq {

/// Tensor data types: every dtype the safetensors format defines, named as in its headers. cq
/// computes with F32, F16 and BF16 (and reads F64); the others are known so that files holding them
/// can be opened and every tensor's size checked.
enum class DType : std::uint8_t {
  f32, f16, bf16, f64, i32, u8, u16, i64,
  boolean, i8, i16, u32, u64, c64,
  f8_e5m2, f8_e4m3, f8_e8m0, f8_e4m3fnuz, f8_e5m2fnuz,
  f4, f6_e2m3, f6_e3m2,  // sub-byte: elements packed, a tensor's bits must fill whole bytes
};

/// Every DType, in declaration order.
inline constexpr DType all_dtypes[] = {
    DType::f32,     DType::f16,     DType::bf16,    DType::f64,         DType::i32,         DType::u8,
    DType::u16,     DType::i64,     DType::boolean, DType::i8,          DType::i16,         DType::u32,
    DType::u64,     DType::c64,     DType::f8_e5m2, DType::f8_e4m3,     DType::f8_e8m0,     DType::f8_e4m3fnuz,
    DType::f8_e5m2fnuz, DType::f4,  DType::f6_e2m3, DType::f6_e3m2};
static_assert(std::size(all_dtypes) == static_cast<std::size_t>(DType::f6_e3m2) + 1,
              "cq: all_dtypes must list every DType");

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
    case DType::boolean: return "BOOL";
    case DType::i8: return "I8";
    case DType::i16: return "I16";
    case DType::u32: return "U32";
    case DType::u64: return "U64";
    case DType::c64: return "C64";
    case DType::f8_e5m2: return "F8_E5M2";
    case DType::f8_e4m3: return "F8_E4M3";
    case DType::f8_e8m0: return "F8_E8M0";
    case DType::f8_e4m3fnuz: return "F8_E4M3FNUZ";
    case DType::f8_e5m2fnuz: return "F8_E5M2FNUZ";
    case DType::f4: return "F4";
    case DType::f6_e2m3: return "F6_E2M3";
    case DType::f6_e3m2: return "F6_E3M2";
  }
  return "?";
}

/// Bits per element.
inline constexpr std::size_t dtype_bits(DType d) {
  switch (d) {
    case DType::f4: return 4;
    case DType::f6_e2m3: case DType::f6_e3m2: return 6;
    case DType::u8: case DType::i8: case DType::boolean: case DType::f8_e5m2: case DType::f8_e4m3:
    case DType::f8_e8m0: case DType::f8_e4m3fnuz: case DType::f8_e5m2fnuz: return 8;
    case DType::f16: case DType::bf16: case DType::u16: case DType::i16: return 16;
    case DType::f32: case DType::i32: case DType::u32: return 32;
    case DType::f64: case DType::i64: case DType::u64: case DType::c64: return 64;
  }
  return 0;
}

/// Bytes per element; 0 for the sub-byte types (F4, F6_*), whose sizes only exist in bits.
inline constexpr std::size_t dtype_size(DType d) { return dtype_bits(d) % 8 == 0 ? dtype_bits(d) / 8 : 0; }

}  // namespace cq
