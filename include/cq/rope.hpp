#pragma once
/// Rotary position embeddings (RoPE), for caches that store keys *before* RoPE (the CQ paper's
/// and KVQuant's choice: pre-RoPE keys quantize better) and rotate them inside attention.
///
/// Conventions follow Hugging Face transformers (`modeling_rope_utils.py`):
///   - pairs: RopeStyle::rotate_half (LLaMA, GPT-NeoX: channel i pairs with i + r/2) or
///     RopeStyle::interleaved (GPT-J, original LLaMA: channel 2i pairs with 2i + 1);
///   - partial rotary dimension r <= head_dim: only the first r channels rotate (Phi, GPT-NeoX's
///     `rotary_pct`); the others pass through;
///   - pair i rotates by pos * f_i, f_i = theta^(-2i / r), rescaled by the scaling rule:
///       linear (position interpolation): f_i / factor;
///       llama3 (Llama 3.1): low frequencies / factor, high ones kept, a smooth ramp between;
///       yarn (YaRN, Peng et al. 2023): per-frequency blend of interpolation and extrapolation
///         over the correction range of beta_fast..beta_slow rotations, and cos/sin multiplied by
///         the attention factor (0.1 ln(factor) + 1 unless given).
/// Inverse frequencies and anchor angles are computed in double, so positions up to 10^6 and
/// beyond rotate to float accuracy.

#include "cq/error.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <string>
#include <vector>

namespace cq {

enum class RopeStyle : unsigned char { rotate_half, interleaved };
enum class RopeScaling : unsigned char { none, linear, llama3, yarn };

inline const char* rope_style_name(RopeStyle s) { return s == RopeStyle::rotate_half ? "rotate_half" : "interleaved"; }
inline const char* rope_scaling_name(RopeScaling s) {
  switch (s) {
    case RopeScaling::none: return "none";
    case RopeScaling::linear: return "linear";
    case RopeScaling::llama3: return "llama3";
    case RopeScaling::yarn: return "yarn";
  }
  return "?";
}

/// A model's RoPE settings (the fields of a transformers `rope_scaling` dict, by the same names).
struct RopeConfig {
  double theta = 10000.0;               // rope_theta (base)
  RopeStyle style = RopeStyle::rotate_half;
  std::size_t rotary_dim = 0;           // channels that rotate; 0: the whole head_dim
  RopeScaling scaling = RopeScaling::none;
  double factor = 1.0;                  // linear, llama3, yarn
  double low_freq_factor = 1.0;         // llama3
  double high_freq_factor = 4.0;        // llama3
  double original_max_position = 8192;  // llama3, yarn: original_max_position_embeddings
  double beta_fast = 32.0;              // yarn
  double beta_slow = 1.0;               // yarn
  double attention_factor = 0.0;        // yarn: cos/sin scale; 0 = 0.1 ln(factor) + 1

  friend bool operator==(const RopeConfig&, const RopeConfig&) = default;
};

/// One line describing a RoPE configuration, for messages ("theta 500000, rotate_half, llama3 x8").
inline std::string describe(const RopeConfig& r) {
  std::string s = detail::concat("theta ", r.theta, ", ", rope_style_name(r.style));
  if (r.rotary_dim) s += detail::concat(", rotary_dim ", r.rotary_dim);
  if (r.scaling != RopeScaling::none) s += detail::concat(", ", rope_scaling_name(r.scaling), " x", r.factor);
  return s;
}

/// The rotations of the first `period` steps of a Rope, per rotary channel (a view into the Rope):
/// a key at position anchor + t rotates as R(anchor) R(t) (both turn the same planes), so
/// attention rotates the query back by the anchor once per `period` tokens and each key by R(t)
/// from this table. With x' = R(t) x: x'_c = x_c cos[t][c] + x_partner(c) sin[t][c], partner(c)
/// the other channel of c's pair; sin carries the sign (-sin on a pair's first channel, +sin on
/// its second). No attention factor: that goes with the anchor.
/// Layout: (period, 2, row) floats: cos then signed sin, each row of rotary_dim floats padded to a
/// multiple of 8 (32-byte aligned rows).
struct RopeSteps {
  const float* table = nullptr;
  RopeStyle style = RopeStyle::rotate_half;
  std::size_t rotary_dim = 0, head_dim = 0, period = 0;
  std::size_t row() const { return (rotary_dim + 7) / 8 * 8; }
  const float* cos(std::size_t t) const { return table + t * 2 * row(); }
  const float* sin(std::size_t t) const { return table + (t * 2 + 1) * row(); }
  /// The other channel of channel c's pair (c < rotary_dim).
  std::size_t partner(std::size_t c) const {
    if (style == RopeStyle::interleaved) return c ^ 1;
    const std::size_t h = rotary_dim / 2;
    return c < h ? c + h : c - h;
  }
};

/// The rotation of one model's keys: RopeConfig resolved for a head dimension (inverse
/// frequencies, attention factor), validated once.
class Rope {
 public:
  /// Most rotation pairs a head may have (rotary_dim <= 512): steppers keep their tables inline.
  static constexpr std::size_t max_pairs = 256;
  /// Positions between exact anchors (RopeStepper) and the length of the step table (steps()).
  static constexpr std::size_t step_period = 16;

  Rope() = default;
  /// Throws cq::Error naming the field when the configuration is invalid for `head_dim`.
  Rope(const RopeConfig& cfg, std::size_t head_dim) : cfg_(cfg), dim_(head_dim) {
    const std::size_t r = cfg.rotary_dim ? cfg.rotary_dim : head_dim;
    CQ_CHECK(std::isfinite(cfg.theta) && cfg.theta > 1.0, "rope: theta must be finite and > 1, got ", cfg.theta);
    CQ_CHECK(r % 2 == 0 && r >= 2 && r <= head_dim, "rope: rotary_dim ", r, " must be even, >= 2 and <= head_dim ",
             head_dim);
    CQ_CHECK(r / 2 <= max_pairs, "rope: rotary_dim ", r, " exceeds ", 2 * max_pairs);
    if (cfg.scaling != RopeScaling::none)
      CQ_CHECK(std::isfinite(cfg.factor) && cfg.factor >= 1.0, "rope: scaling factor must be finite and >= 1, got ",
               cfg.factor);
    if (cfg.scaling == RopeScaling::llama3)
      CQ_CHECK(std::isfinite(cfg.low_freq_factor) && std::isfinite(cfg.high_freq_factor) && cfg.low_freq_factor > 0.0 &&
                   cfg.high_freq_factor > cfg.low_freq_factor,
               "rope: llama3 needs 0 < low_freq_factor < high_freq_factor, got ", cfg.low_freq_factor, " and ",
               cfg.high_freq_factor);
    if (cfg.scaling == RopeScaling::llama3 || cfg.scaling == RopeScaling::yarn)
      CQ_CHECK(std::isfinite(cfg.original_max_position) && cfg.original_max_position >= 1.0,
               "rope: original_max_position must be finite and >= 1, got ", cfg.original_max_position);
    if (cfg.scaling == RopeScaling::yarn)
      CQ_CHECK(std::isfinite(cfg.beta_fast) && std::isfinite(cfg.beta_slow) && cfg.beta_fast > 0.0 &&
                   cfg.beta_slow > 0.0 && std::isfinite(cfg.attention_factor) && cfg.attention_factor >= 0.0,
               "rope: yarn needs positive beta_fast, beta_slow and a finite attention_factor >= 0");
    rotary_ = r;
    inv_freq_ = inverse_frequencies(cfg, r);
    scale_ = cfg.scaling == RopeScaling::yarn
                 ? (cfg.attention_factor > 0.0 ? cfg.attention_factor : 0.1 * std::log(cfg.factor) + 1.0)
                 : 1.0;
    const std::size_t row = (r + 7) / 8 * 8;
    steps_.resize(step_period * 2 * row / 8);
    for (std::size_t t = 0; t < step_period; ++t)
      for (std::size_t i = 0; i < pairs(); ++i) {
        std::size_t a, b;
        pair(i, a, b);
        const double ang = double(t) * inv_freq_[i];
        float* cs = reinterpret_cast<float*>(steps_.data()) + t * 2 * row;
        cs[a] = cs[b] = static_cast<float>(std::cos(ang));
        cs[row + a] = static_cast<float>(-std::sin(ang));
        cs[row + b] = static_cast<float>(std::sin(ang));
      }
  }

  const RopeConfig& config() const { return cfg_; }
  std::size_t head_dim() const { return dim_; }
  std::size_t rotary_dim() const { return rotary_; }
  std::size_t pairs() const { return rotary_ / 2; }
  /// f_i, i < pairs(), in double.
  const std::vector<double>& inv_freq() const { return inv_freq_; }
  /// The factor cos and sin are multiplied by (YaRN's attention factor; 1 otherwise).
  double scale() const { return scale_; }
  /// R(t) for t < step_period, exact in double rounded to float.
  RopeSteps steps() const { return {reinterpret_cast<const float*>(steps_.data()), cfg_.style, rotary_, dim_, step_period}; }

  /// Channels (a, b) of rotation pair i: x_a' = x_a cos - x_b sin, x_b' = x_b cos + x_a sin.
  void pair(std::size_t i, std::size_t& a, std::size_t& b) const {
    if (cfg_.style == RopeStyle::rotate_half) {
      a = i;
      b = i + rotary_ / 2;
    } else {
      a = 2 * i;
      b = 2 * i + 1;
    }
  }

  /// Rotates x (head_dim floats) in place to position `pos`, with exact sincos in double.
  void rotate(float* x, std::size_t pos) const {
    for (std::size_t i = 0; i < pairs(); ++i) {
      std::size_t a, b;
      pair(i, a, b);
      const double ang = double(pos) * inv_freq_[i];
      const double c = std::cos(ang) * scale_, s = std::sin(ang) * scale_;
      const double xa = x[a], xb = x[b];
      x[a] = static_cast<float>(xa * c - xb * s);
      x[b] = static_cast<float>(xb * c + xa * s);
    }
  }

  /// The rescaled inverse frequencies of a configuration with `r` rotary channels (see the top).
  static std::vector<double> inverse_frequencies(const RopeConfig& cfg, std::size_t r) {
    constexpr double pi = 3.14159265358979323846;
    std::vector<double> f(r / 2);
    for (std::size_t i = 0; i < f.size(); ++i) f[i] = std::pow(cfg.theta, -2.0 * double(i) / double(r));
    switch (cfg.scaling) {
      case RopeScaling::none: break;
      case RopeScaling::linear:
        for (double& x : f) x /= cfg.factor;
        break;
      case RopeScaling::llama3: {
        const double low_wavelen = cfg.original_max_position / cfg.low_freq_factor;
        const double high_wavelen = cfg.original_max_position / cfg.high_freq_factor;
        for (double& x : f) {
          const double wavelen = 2.0 * pi / x;
          if (wavelen > low_wavelen) {
            x /= cfg.factor;
          } else if (!(wavelen < high_wavelen)) {  // medium: smooth between the two
            const double smooth = (cfg.original_max_position / wavelen - cfg.low_freq_factor) /
                                  (cfg.high_freq_factor - cfg.low_freq_factor);
            x = (1.0 - smooth) * x / cfg.factor + smooth * x;
          }
        }
        break;
      }
      case RopeScaling::yarn: {
        auto correction_dim = [&](double rotations) {
          return double(r) * std::log(cfg.original_max_position / (rotations * 2.0 * pi)) / (2.0 * std::log(cfg.theta));
        };
        const double low = std::max(std::floor(correction_dim(cfg.beta_fast)), 0.0);
        double high = std::min(std::ceil(correction_dim(cfg.beta_slow)), double(r) - 1.0);
        if (high == low) high += 0.001;
        for (std::size_t i = 0; i < f.size(); ++i) {
          const double ramp = std::clamp((double(i) - low) / (high - low), 0.0, 1.0);
          const double extrapolation = 1.0 - ramp;  // weight of the unscaled frequency
          f[i] = f[i] / cfg.factor * (1.0 - extrapolation) + f[i] * extrapolation;
        }
        break;
      }
    }
    return f;
  }

 private:
  RopeConfig cfg_;
  std::size_t dim_ = 0, rotary_ = 0;
  std::vector<double> inv_freq_;
  double scale_ = 1.0;
  struct alignas(32) Floats8 {
    float f[8];
  };
  std::vector<Floats8> steps_;  // see RopeSteps
};

/// cos/sin (times the attention factor) of consecutive positions without a sincos per token. An
/// anchor in double is exact at the first position and advanced every `resync` positions by
/// complex multiplication (drift ~1e-16 per step); in between, the float values take one float
/// complex multiplication per position (error below 2e-6 after resync - 1 of them). jump()
/// moves `resync` positions at once the same way: float steps, the double anchor every
/// `jumps_per_anchor` jumps (the double step and its conversion cost several times a float step,
/// and attention jumps once per 16 coded tokens). Holds its tables inline: constructing one
/// allocates nothing.
class RopeStepper {
 public:
  static constexpr int resync = static_cast<int>(Rope::step_period);
  static constexpr int jumps_per_anchor = 8;
  RopeStepper(const Rope& rope, std::size_t first_pos) : n_(rope.pairs()) { reset(rope, first_pos); }

  /// Moves to `pos` (any position) with exact anchors.
  void reset(const Rope& rope, std::size_t pos) {
    const double sc = rope.scale();
    for (std::size_t i = 0; i < n_; ++i) {
      const double f = rope.inv_freq()[i], a = double(pos) * f;
      c_[i] = std::cos(a) * sc;
      s_[i] = std::sin(a) * sc;
      step_c_[i] = std::cos(resync * f);
      step_s_[i] = std::sin(resync * f);
      fstep_c_[i] = static_cast<float>(std::cos(f));
      fstep_s_[i] = static_cast<float>(std::sin(f));
      fjump_c_[i] = static_cast<float>(step_c_[i]);
      fjump_s_[i] = static_cast<float>(step_s_[i]);
      double c = 1.0, s = 0.0;  // the resync step to the power jumps_per_anchor
      for (int k = 0; k < jumps_per_anchor; ++k) {
        const double cn = c * step_c_[i] - s * step_s_[i];
        s = s * step_c_[i] + c * step_s_[i];
        c = cn;
      }
      anchor_c_[i] = c;
      anchor_s_[i] = s;
    }
    since_anchor_ = 0;
    jumps_ = 0;
    refresh_float();
  }
  /// Moves resync positions ahead at once; only at an anchor (after reset or a previous jump).
  /// Steppers that jump do not advance() after their first jump.
  void jump() {
    CQ_ASSERT(since_anchor_ == 0);
    step(jumps_, jumps_per_anchor, anchor_c_.data(), anchor_s_.data(), fjump_c_.data(), fjump_s_.data());
  }
  /// cos / sin of the current position, one per pair, as float.
  const float* cos() const { return cf_.data(); }
  const float* sin() const { return sf_.data(); }
  void advance() {
    CQ_ASSERT(jumps_ == 0);  // the double anchor is the current one
    step(since_anchor_, resync, step_c_.data(), step_s_.data(), fstep_c_.data(), fstep_s_.data());
  }

 private:
  // Step `count` of `every`: the last moves the double anchor by (ac, as) and refreshes the float
  // values from it; the others move the float values by (fc, fs).
  void step(int& count, int every, const double* ac, const double* as, const float* fc, const float* fs) {
    if (++count == every) {
      count = 0;
      rotate(c_.data(), s_.data(), ac, as);
      refresh_float();
      return;
    }
    rotate(cf_.data(), sf_.data(), fc, fs);
  }
  // (c, s) <- (c, s) (step_c, step_s), pair by pair, as complex numbers.
  template <class F>
  void rotate(F* __restrict c, F* __restrict s, const F* __restrict step_c, const F* __restrict step_s) {
    for (std::size_t i = 0; i < n_; ++i) {
      const F cn = c[i] * step_c[i] - s[i] * step_s[i];
      const F sn = s[i] * step_c[i] + c[i] * step_s[i];
      c[i] = cn;
      s[i] = sn;
    }
  }
  void refresh_float() {
    for (std::size_t i = 0; i < n_; ++i) {
      cf_[i] = static_cast<float>(c_[i]);
      sf_[i] = static_cast<float>(s_[i]);
    }
  }
  std::size_t n_;
  std::array<double, Rope::max_pairs> c_, s_, step_c_, step_s_;  // the anchor and its resync step
  std::array<double, Rope::max_pairs> anchor_c_, anchor_s_;     // jumps_per_anchor resync steps
  std::array<float, Rope::max_pairs> cf_, sf_, fstep_c_, fstep_s_, fjump_c_, fjump_s_;
  int since_anchor_ = 0, jumps_ = 0;
};

/// Rotates x (head_dim floats) in place with the cos/sin of a stepper's current position.
inline void rope_rotate_stepped(const Rope& rope, const RopeStepper& st, float* __restrict x) {
  const std::size_t n = rope.pairs();
  const float* __restrict c = st.cos();
  const float* __restrict s = st.sin();
  if (rope.config().style == RopeStyle::rotate_half) {
    float* __restrict lo = x;
    float* __restrict hi = x + n;
    for (std::size_t j = 0; j < n; ++j) {
      const float a = lo[j], b = hi[j];
      lo[j] = a * c[j] - b * s[j];
      hi[j] = b * c[j] + a * s[j];
    }
  } else {
    for (std::size_t j = 0; j < n; ++j) {
      const float a = x[2 * j], b = x[2 * j + 1];
      x[2 * j] = a * c[j] - b * s[j];
      x[2 * j + 1] = b * c[j] + a * s[j];
    }
  }
}

/// Turns vectors back by a stepper's current rotation and scales them: out = scale * R(pos)^T in,
/// so that out . k = scale * in . R(pos) k. in and out are (head_dim, lanes): `lanes` vectors
/// side by side; channels past rotary_dim are only scaled.
inline void rope_rotate_back(const Rope& rope, const RopeStepper& st, float scale, const float* __restrict in,
                             std::size_t lanes, float* __restrict out) {
  const float* __restrict c = st.cos();
  const float* __restrict s = st.sin();
  const std::size_t n = rope.pairs();
  // Pair i's channels are (a, b) = (i, i + n) or (2i, 2i + 1); both forms kept apart so the loops
  // vectorise.
  auto turn = [&](std::size_t i, std::size_t a, std::size_t b) {
    const float ci = scale * c[i], si = scale * s[i];
    for (std::size_t l = 0; l < lanes; ++l) {
      const float xa = in[a * lanes + l], xb = in[b * lanes + l];
      out[a * lanes + l] = xa * ci + xb * si;
      out[b * lanes + l] = xb * ci - xa * si;
    }
  };
  if (rope.config().style == RopeStyle::rotate_half) {
    if (lanes == 1)
      for (std::size_t i = 0; i < n; ++i) {
        const float ci = scale * c[i], si = scale * s[i], xa = in[i], xb = in[i + n];
        out[i] = xa * ci + xb * si;
        out[i + n] = xb * ci - xa * si;
      }
    else
      for (std::size_t i = 0; i < n; ++i) turn(i, i, i + n);
  } else {
    for (std::size_t i = 0; i < n; ++i) turn(i, 2 * i, 2 * i + 1);
  }
  for (std::size_t d = rope.rotary_dim() * lanes; d < rope.head_dim() * lanes; ++d) out[d] = scale * in[d];
}

}  // namespace cq
