#pragma once
/// Size arithmetic on caller-supplied numbers that refuses to wrap: a product or sum that does
/// not fit std::size_t throws cq::Error naming the quantity.

#include "cq/error.hpp"

#include <cstddef>
#include <cstdint>

namespace cq::detail {

inline std::size_t checked_mul(std::size_t a, std::size_t b, const char* what) {
  std::size_t r;
  CQ_CHECK(!__builtin_mul_overflow(a, b, &r), what, ": ", a, " x ", b, " overflows a size");
  return r;
}
inline std::size_t checked_add(std::size_t a, std::size_t b, const char* what) {
  std::size_t r;
  CQ_CHECK(!__builtin_add_overflow(a, b, &r), what, ": ", a, " + ", b, " overflows a size");
  return r;
}

}  // namespace cq::detail
