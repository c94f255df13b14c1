#pragma once
/// UniformQuantizer: the KIVI-style INT-k baseline every CQ comparison is made against.
///
/// Asymmetric min/max quantization to 2^bits levels with one (scale, zero point) pair per group of
/// `group_size` elements, both stored as fp16 and counted in bits_per_channel():
///   - Axis::per_channel (KIVI's keys): for each channel, tokens are grouped in blocks of
///     group_size consecutive tokens; each (block, channel) gets its own scale and zero point.
///   - Axis::per_token (KIVI's values): for each token, channels are grouped in runs of
///     group_size; each (token, channel group) gets its own scale and zero point.
/// code = round((x - zero) / scale) clamped to [0, 2^bits - 1]; x' = zero + code * scale.
///
/// fp16 scales and zero points (KIVI's format, and what the bit count assumes) bound the inputs:
/// encode refuses non-finite values, values beyond fp16's largest finite 65504, and groups whose
/// scale would not fit fp16 (only possible at 1 bit), rather than storing infinities that decode
/// to inf. A scale rounded up so far that the top code would decode past 65504 is rounded down.

#include "cq/element.hpp"
#include "cq/error.hpp"
#include "cq/packed_codes.hpp"
#include "cq/quantizer.hpp"
#include "cq/views.hpp"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <vector>

namespace cq {

struct UniformCodes {
  PackedCodes codes;         // (tokens, dim) codes at `bits` bits, one per element
  std::vector<half> scale;   // per quantization group, see UniformQuantizer
  std::vector<half> zero;
  std::size_t size() const { return codes.size(); }
  /// Bytes of codes plus scales and zero points.
  std::size_t size_bytes() const { return codes.size_bytes() + (scale.size() + zero.size()) * sizeof(half); }
};

template <element_type T = float>
class UniformQuantizer {
 public:
  enum class Axis { per_channel, per_token };

  /// Largest magnitude an input may have: fp16's largest finite value.
  static constexpr float max_input = 65504.0f;

  UniformQuantizer(std::size_t dim, int bits, std::size_t group_size, Axis axis)
      : dim_(dim), bits_(bits), group_(group_size), axis_(axis) {
    check_code_bits(bits, "UniformQuantizer");
    CQ_CHECK(dim >= 1, "UniformQuantizer: dim must be >= 1, got ", dim);
    CQ_CHECK(group_size >= 1, "UniformQuantizer: group_size must be >= 1, got ", group_size);
    CQ_CHECK(axis == Axis::per_channel || dim % group_size == 0, "UniformQuantizer: per-token groups of ", group_size,
             " do not divide dim ", dim);
  }
  /// KIVI's key quantizer: per channel over blocks of `group_size` tokens.
  static UniformQuantizer keys(std::size_t dim, int bits, std::size_t group_size = 32) {
    return {dim, bits, group_size, Axis::per_channel};
  }
  /// KIVI's value quantizer: per token over groups of `group_size` channels.
  static UniformQuantizer values(std::size_t dim, int bits, std::size_t group_size = 32) {
    return {dim, bits, group_size, Axis::per_token};
  }

  std::size_t dim() const { return dim_; }
  int bits() const { return bits_; }
  std::size_t group_size() const { return group_; }
  Axis axis() const { return axis_; }
  /// Code bits plus the fp16 scale and zero point amortised over each group.
  double bits_per_channel() const { return double(bits_) + 32.0 / double(group_); }

  /// Quantization groups (scale and zero point pairs) of `tokens` tokens.
  std::size_t num_groups(std::size_t tokens) const {
    if (axis_ == Axis::per_channel)
      return detail::checked_mul(tokens / group_ + (tokens % group_ != 0), dim_, "UniformQuantizer: token blocks x dim");
    return detail::checked_mul(tokens, dim_ / group_, "UniformQuantizer: tokens x channel groups");
  }

  UniformCodes encode(ConstMatrixView<T> x) const {
    CQ_CHECK(x.cols == dim_, "UniformQuantizer::encode: x has ", x.cols, " columns, expected dim ", dim_);
    check_view(x, "UniformQuantizer::encode: x");
    detail::check_finite_rows(x, "UniformQuantizer::encode: x");
    for (std::size_t r = 0; r < x.rows; ++r)
      for (std::size_t c = 0; c < x.cols; ++c) {
        const float v = to_float(x(r, c));
        CQ_CHECK(std::abs(v) <= max_input, "UniformQuantizer::encode: x(", r, ", ", c, ") = ", v,
                 " is beyond the fp16 range of the scales and zero points (|x| <= 65504)");
      }
    UniformCodes out;
    out.codes = PackedCodes(dim_, bits_, x.rows);
    const std::size_t groups = num_groups(x.rows);
    out.scale.reserve(groups);
    out.zero.reserve(groups);
    auto v = out.codes.view();
    const float levels = float((1u << bits_) - 1u);
    // Visits each quantization group as (rows r0..r1) x (cols c0..c1).
    auto quantize_group = [&](std::size_t r0, std::size_t r1, std::size_t c0, std::size_t c1) {
      float lo = INFINITY, hi = -INFINITY;
      for (std::size_t r = r0; r < r1; ++r)
        for (std::size_t c = c0; c < c1; ++c) {
          const float f = to_float(x(r, c));
          lo = std::min(lo, f);
          hi = std::max(hi, f);
        }
      // Stored in fp16; quantize against the rounded values so decode sees what encode assumed.
      const half zero_h(lo);
      const float zero = static_cast<float>(zero_h);
      half scale_h(hi > lo ? (hi - lo) / levels : 0.0f);
      CQ_CHECK(std::isfinite(static_cast<float>(scale_h)), "UniformQuantizer::encode: the scale (max - min) / (2^",
               bits_, " - 1) = ", (hi - lo) / levels, " of the group at row ", r0, ", column ", c0,
               " does not fit fp16 (at most 65504); use more bits or smaller inputs");
      if (zero + levels * static_cast<float>(scale_h) > max_input)
        scale_h = half_at_most(std::max(0.0f, (hi - zero) / levels));
      const float scale = static_cast<float>(scale_h);
      out.zero.push_back(zero_h);
      out.scale.push_back(scale_h);
      for (std::size_t r = r0; r < r1; ++r)
        for (std::size_t c = c0; c < c1; ++c) {
          const float q = scale > 0.0f ? std::nearbyint((to_float(x(r, c)) - zero) / scale) : 0.0f;
          v.set(r, c, static_cast<std::uint32_t>(std::clamp(q, 0.0f, levels)));
        }
    };
    if (axis_ == Axis::per_channel) {
      for (std::size_t r0 = 0; r0 < x.rows; r0 += std::min(group_, x.rows - r0))
        for (std::size_t c = 0; c < dim_; ++c) quantize_group(r0, r0 + std::min(group_, x.rows - r0), c, c + 1);
    } else {
      for (std::size_t r = 0; r < x.rows; ++r)
        for (std::size_t c0 = 0; c0 < dim_; c0 += group_) quantize_group(r, r + 1, c0, c0 + group_);
    }
    return out;
  }

  /// Decodes codes made by a quantizer of this shape (dim, bits, group size, axis) into out
  /// (tokens, dim); codes of another shape are refused.
  void decode(const UniformCodes& in, MatrixView<T> out) const {
    CQ_CHECK(in.codes.groups() == dim_ && in.codes.bits() == bits_, "UniformQuantizer::decode: codes hold ",
             in.codes.groups(), " channels x ", in.codes.bits(), " bits, the quantizer ", dim_, " x ", bits_);
    const std::size_t groups = num_groups(in.size());
    CQ_CHECK(in.scale.size() == groups && in.zero.size() == groups, "UniformQuantizer::decode: codes carry ",
             in.scale.size(), " scales and ", in.zero.size(), " zero points, ", in.size(), " tokens need ", groups,
             " (group size ", group_, ", ", axis_ == Axis::per_channel ? "per channel" : "per token", ")");
    CQ_CHECK(out.rows == in.size() && out.cols == dim_, "UniformQuantizer::decode: out is ", out.rows, " x ",
             out.cols, ", codes are ", in.size(), " x ", dim_);
    check_view(out, "UniformQuantizer::decode: out");
    auto v = in.codes.view();
    for (std::size_t r = 0; r < out.rows; ++r)
      for (std::size_t c = 0; c < dim_; ++c) {
        const std::size_t grp = axis_ == Axis::per_channel ? (r / group_) * dim_ + c : r * (dim_ / group_) + c / group_;
        out(r, c) = from_float<T>(static_cast<float>(in.zero[grp]) + float(v.get(r, c)) * static_cast<float>(in.scale[grp]));
      }
  }

 private:
  /// The largest fp16 value <= v (0 <= v <= 65504).
  static half half_at_most(float v) {
    half h(v);
    // For a positive half, the bit pattern one lower is the next smaller value.
    if (static_cast<float>(h) > v) h = std::bit_cast<half>(static_cast<std::uint16_t>(std::bit_cast<std::uint16_t>(h) - 1u));
    return h;
  }

  std::size_t dim_;
  int bits_;
  std::size_t group_;
  Axis axis_;
};

}  // namespace cq
