#pragma once
/// Rotary position embeddings (RoPE), for caches that store keys *before* RoPE (the paper's and
/// KVQuant's choice: pre-RoPE keys quantize better) and rotate decoded keys inside attention.
///
/// Two pairings of channels are supported:
///   - RopeStyle::rotate_half (HF LLaMA, GPT-NeoX "rotate_half"): channel i pairs with i + d/2;
///   - RopeStyle::interleaved (original LLaMA, GPT-J): channel 2i pairs with 2i + 1.
/// Pair i rotates by the angle pos * theta^(-2i / d), d the rotary dimension.

#include "cq/error.hpp"

#include <cmath>
#include <cstddef>
#include <vector>

namespace cq {

enum class RopeStyle : unsigned char { rotate_half, interleaved };

struct RopeConfig {
  float theta = 10000.0f;
  RopeStyle style = RopeStyle::rotate_half;
};

/// Index of the two channels of rotation pair i in a vector of `dim` channels.
inline void rope_pair(RopeStyle style, std::size_t dim, std::size_t i, std::size_t& a, std::size_t& b) {
  if (style == RopeStyle::rotate_half) {
    a = i;
    b = i + dim / 2;
  } else {
    a = 2 * i;
    b = 2 * i + 1;
  }
}

/// Inverse frequencies theta^(-2i / dim), i < dim / 2, in double.
inline std::vector<double> rope_inv_freq(const RopeConfig& rope, std::size_t dim) {
  CQ_CHECK(dim % 2 == 0, "rope: dim ", dim, " must be even");
  std::vector<double> f(dim / 2);
  for (std::size_t i = 0; i < f.size(); ++i) f[i] = std::pow(double(rope.theta), -2.0 * double(i) / double(dim));
  return f;
}

/// Rotates x (dim floats) in place to position `pos` with exact sincos; `f` holds the dim / 2
/// inverse frequencies (rope_inv_freq).
inline void rope_rotate(const RopeConfig& rope, const double* f, std::size_t dim, std::size_t pos, float* x) {
  for (std::size_t i = 0; i < dim / 2; ++i) {
    std::size_t a, b;
    rope_pair(rope.style, dim, i, a, b);
    const double ang = double(pos) * f[i];
    const double c = std::cos(ang), s = std::sin(ang);
    const double xa = x[a], xb = x[b];
    x[a] = static_cast<float>(xa * c - xb * s);
    x[b] = static_cast<float>(xb * c + xa * s);
  }
}

/// Rotates x (dim floats) in place to position `pos`; the obvious reference.
inline void rope_rotate(const RopeConfig& rope, std::size_t dim, std::size_t pos, float* x) {
  const std::vector<double> f = rope_inv_freq(rope, dim);
  rope_rotate(rope, f.data(), dim, pos, x);
}

/// cos/sin of pos * f_i for consecutive positions without a sincos per token. An anchor in double
/// is exact at the first position and advanced every `resync` positions by complex multiplication
/// (drift ~1e-16 per step: ~1e-12 after 10^5 positions); in between, the float values take one
/// float complex multiplication per position (error below 2e-6 after resync - 1 of them). Stepping
/// every position in double and converting cost more than decoding the key it rotates.
class RopeStepper {
 public:
  static constexpr int resync = 16;
  /// `inv_freq`: the dim / 2 inverse frequencies (rope_inv_freq).
  RopeStepper(const double* inv_freq, std::size_t dim, std::size_t first_pos)
      : c_(dim / 2), s_(dim / 2), step_c_(dim / 2), step_s_(dim / 2), cf_(dim / 2), sf_(dim / 2), fstep_c_(dim / 2),
        fstep_s_(dim / 2) {
    for (std::size_t i = 0; i < c_.size(); ++i) {
      const double a = double(first_pos) * inv_freq[i];
      c_[i] = std::cos(a);
      s_[i] = std::sin(a);
      step_c_[i] = std::cos(resync * inv_freq[i]);
      step_s_[i] = std::sin(resync * inv_freq[i]);
      fstep_c_[i] = static_cast<float>(std::cos(inv_freq[i]));
      fstep_s_[i] = static_cast<float>(std::sin(inv_freq[i]));
    }
    refresh_float();
  }
  /// cos / sin of the current position, one per pair, as float.
  const float* cos() const { return cf_.data(); }
  const float* sin() const { return sf_.data(); }
  void advance() {
    if (++since_anchor_ == resync) {
      since_anchor_ = 0;
      for (std::size_t i = 0; i < c_.size(); ++i) {
        const double c = c_[i] * step_c_[i] - s_[i] * step_s_[i];
        const double s = s_[i] * step_c_[i] + c_[i] * step_s_[i];
        c_[i] = c;
        s_[i] = s;
      }
      refresh_float();
      return;
    }
    float* __restrict cf = cf_.data();
    float* __restrict sf = sf_.data();
    const float* __restrict fc = fstep_c_.data();
    const float* __restrict fs = fstep_s_.data();
    for (std::size_t i = 0; i < cf_.size(); ++i) {
      const float c = cf[i] * fc[i] - sf[i] * fs[i];
      const float s = sf[i] * fc[i] + cf[i] * fs[i];
      cf[i] = c;
      sf[i] = s;
    }
  }

 private:
  void refresh_float() {
    for (std::size_t i = 0; i < c_.size(); ++i) {
      cf_[i] = static_cast<float>(c_[i]);
      sf_[i] = static_cast<float>(s_[i]);
    }
  }
  std::vector<double> c_, s_, step_c_, step_s_;  // the anchor and its resync-position step
  std::vector<float> cf_, sf_, fstep_c_, fstep_s_;
  int since_anchor_ = 0;
};

}  // namespace cq
