#pragma once
/// Keys coded before RoPE on the GPU (the CQ paper's configuration: pre-RoPE keys quantize
/// better): what the attention kernels need to rotate each key to its position (DeviceRope, made
/// on the host from a cq::Rope by make_device_rope, copied to device memory by the caller:
/// AttentionBatch::rope) and the rotation of one pair at one position.
///
/// Angles are kept in turns, in 64-bit fixed point: turns[p] = frac(f_p / 2 pi) x 2^64 for pair p
/// of inverse frequency f_p, so pos x turns[p] wraps modulo one turn exactly in integer arithmetic
/// (no range reduction of a large float angle) and the reduced angle costs one fast sincos. The
/// grouped-rows kernel composes a 16-token tile's anchor (one sincos per pair and tile) with a
/// step table R(t), t < 16, as the CPU kernels do (cq/rope.hpp, RopeSteps).

#include "cq/error.hpp"
#include "cq/rope.hpp"

#include <cmath>
#include <cstddef>
#include <cstdint>

namespace cq::cuda {

/// A model's RoPE for the kernels (device memory; head_dim up to 128). Pairs past the rotary ones
/// (partial rotary_dim) have turns 0 and steps (1, 0): they pass through.
struct DeviceRope {
  static constexpr int max_pairs = 64;
  static constexpr int steps = 16;
  std::uint64_t turns[max_pairs];   // per pair: frac(f_p / 2 pi) x 2^64
  float step[steps][max_pairs][2];  // (cos, sin) of t f_p, t < steps, unscaled
  float scale;                      // YaRN's attention factor (1 otherwise), on rotating pairs only
  int pairs;                        // rotary_dim / 2
  int style;                        // RopeStyle

#ifdef __CUDACC__
  /// (cos, sin) of pair p at position pos, times the attention factor (exact to ~1e-6).
  __device__ __forceinline__ float2 at(int p, std::uint64_t pos) const {
    if (p >= pairs) return make_float2(1.0f, 0.0f);
    const std::uint64_t t = pos * turns[p];  // modulo one turn
    // The top 32 bits as a signed fraction of a turn: the angle in [-pi, pi), where __sincosf is
    // accurate to ~2^-21.
    const float angle = float(int(std::uint32_t(t >> 32))) * 1.4629180792671596e-09f;  // 2 pi / 2^32
    float s, c;
    __sincosf(angle, &s, &c);
    return make_float2(c * scale, s * scale);
  }
  /// Channels (a, b) of pair p (x_a' = x_a cos - x_b sin, x_b' = x_b cos + x_a sin).
  __device__ __forceinline__ int2 channels(int p, int head_dim) const {
    return style == int(RopeStyle::rotate_half) ? make_int2(p, p + head_dim / 2) : make_int2(2 * p, 2 * p + 1);
  }
#endif
};

/// The DeviceRope of `rope` (host memory). Throws cq::Error if its head_dim is over 128, or if it
/// is rotate_half with a partial rotary_dim (the kernels pair channel c with c + head_dim / 2).
inline DeviceRope make_device_rope(const Rope& rope) {
  CQ_CHECK(rope.head_dim() <= 2 * DeviceRope::max_pairs, "cuda rope: head_dim ", rope.head_dim(), " exceeds ",
           2 * DeviceRope::max_pairs);
  CQ_CHECK(rope.config().style == RopeStyle::interleaved || rope.rotary_dim() == rope.head_dim(),
           "cuda rope: rotate_half with rotary_dim ", rope.rotary_dim(), " below head_dim ", rope.head_dim(),
           " is not supported on the GPU (interleaved pairs are)");
  constexpr double two_pi = 6.283185307179586476925;
  DeviceRope d{};
  d.pairs = int(rope.pairs());
  d.style = int(rope.config().style);
  d.scale = float(rope.scale());
  for (int p = 0; p < DeviceRope::max_pairs; ++p) {
    const double f = p < d.pairs ? rope.inv_freq()[std::size_t(p)] : 0.0;
    const double turns = f / two_pi - std::floor(f / two_pi);
    d.turns[p] = static_cast<std::uint64_t>(std::ldexp(turns, 64));  // turns < 1: below 2^64
    for (int t = 0; t < DeviceRope::steps; ++t) {
      d.step[t][p][0] = float(std::cos(double(t) * f));
      d.step[t][p][1] = float(std::sin(double(t) * f));
    }
  }
  return d;
}

}  // namespace cq::cuda
