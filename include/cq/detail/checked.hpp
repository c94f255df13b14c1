#pragma once
/// Size arithmetic on caller-supplied numbers: products and sums that would wrap around throw
/// cq::Error naming the quantity and its operands, instead of wrapping to a small size that an
/// allocation would then accept and a loop overrun. Used wherever cq forms a size, an element
/// count or a launch dimension from sizes it was given.

#include "cq/error.hpp"

#include <cstddef>
#include <cstdint>

namespace cq::detail {

/// a * b; throws cq::Error ("<what>: a x b overflows") when the product does not fit std::size_t.
constexpr std::size_t checked_mul(std::size_t a, std::size_t b, const char* what) {
  if (b != 0 && a > SIZE_MAX / b) fail(what, ": ", a, " x ", b, " overflows std::size_t");
  return a * b;
}

/// a + b; throws cq::Error ("<what>: a + b overflows") when the sum does not fit std::size_t.
constexpr std::size_t checked_add(std::size_t a, std::size_t b, const char* what) {
  if (a > SIZE_MAX - b) fail(what, ": ", a, " + ", b, " overflows std::size_t");
  return a + b;
}

/// v when v <= limit; throws cq::Error ("<what> = v exceeds limit") otherwise. For sizes passed on
/// to narrower types (CUDA grid dimensions, int parameters).
constexpr std::size_t checked_limit(std::size_t v, std::size_t limit, const char* what) {
  if (v > limit) fail(what, " = ", v, " exceeds ", limit);
  return v;
}

}  // namespace cq::detail
