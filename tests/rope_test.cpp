// RoPE variants against a direct implementation of transformers' formulas, at positions up to
// 10^6, and pre-RoPE attention through the paged cache with each variant.
#include "attention_oracle.hpp"

#include <numbers>

using namespace cq;

namespace {

// Frequency i of r rotary channels, written directly from transformers' modeling_rope_utils.py
// (one frequency at a time, not cq's vectorised form).
double direct_frequency(const RopeConfig& c, std::size_t r, std::size_t i) {
  const double base = 1.0 / std::pow(c.theta, double(2 * i) / double(r));
  const double pi = std::numbers::pi;
  switch (c.scaling) {
    case RopeScaling::none: return base;
    case RopeScaling::linear: return base / c.factor;
    case RopeScaling::llama3: {
      const double wavelen = 2 * pi / base;
      const double low = c.original_max_position / c.low_freq_factor, high = c.original_max_position / c.high_freq_factor;
      if (wavelen < high) return base;
      if (wavelen > low) return base / c.factor;
      const double smooth = (c.original_max_position / wavelen - c.low_freq_factor) / (c.high_freq_factor - c.low_freq_factor);
      return (1 - smooth) * base / c.factor + smooth * base;
    }
    case RopeScaling::yarn: {
      auto dim_of = [&](double rot) { return r * std::log(c.original_max_position / (rot * 2 * pi)) / (2 * std::log(c.theta)); };
      double lo = std::floor(dim_of(c.beta_fast)), hi = std::ceil(dim_of(c.beta_slow));
      lo = std::max(lo, 0.0);
      hi = std::min(hi, double(r) - 1);
      if (lo == hi) hi += 0.001;
      const double ramp = std::min(1.0, std::max(0.0, (double(i) - lo) / (hi - lo)));
      const double extrapolation_factor = 1 - ramp;
      return base / c.factor * (1 - extrapolation_factor) + base * extrapolation_factor;
    }
  }
  return base;
}

// x rotated to position p, the rotate_half or interleaved way, only the first r channels.
std::vector<double> direct_rotate(const RopeConfig& c, std::size_t dim, const std::vector<float>& x, std::size_t p) {
  const std::size_t r = c.rotary_dim ? c.rotary_dim : dim;
  const double mscale = c.scaling == RopeScaling::yarn ? (c.attention_factor > 0 ? c.attention_factor : 0.1 * std::log(c.factor) + 1) : 1.0;
  std::vector<double> y(x.begin(), x.end());
  for (std::size_t i = 0; i < r / 2; ++i) {
    const double ang = double(p) * direct_frequency(c, r, i);
    const std::size_t a = c.style == RopeStyle::rotate_half ? i : 2 * i;
    const std::size_t b = c.style == RopeStyle::rotate_half ? i + r / 2 : 2 * i + 1;
    y[a] = mscale * (x[a] * std::cos(ang) - x[b] * std::sin(ang));
    y[b] = mscale * (x[b] * std::cos(ang) + x[a] * std::sin(ang));
  }
  return y;
}

std::vector<RopeConfig> variants() {
  std::vector<RopeConfig> v;
  RopeConfig c;
  v.push_back(c);  // LLaMA-2: theta 1e4, rotate_half
  c.style = RopeStyle::interleaved;
  v.push_back(c);  // GPT-J
  c = {};
  c.theta = 500000.0;
  c.scaling = RopeScaling::llama3;
  c.factor = 8.0;
  c.low_freq_factor = 1.0;
  c.high_freq_factor = 4.0;
  c.original_max_position = 8192;
  v.push_back(c);  // Llama 3.1
  c = {};
  c.theta = 1000000.0;
  c.scaling = RopeScaling::yarn;
  c.factor = 4.0;
  c.original_max_position = 32768;
  v.push_back(c);  // Qwen2.5 with YaRN
  c.attention_factor = 1.25;
  v.push_back(c);
  c = {};
  c.rotary_dim = 32;  // partial: a quarter of 128 channels (GPT-NeoX rotary_pct 0.25)
  v.push_back(c);
  c.scaling = RopeScaling::linear;
  c.factor = 2.0;
  c.style = RopeStyle::interleaved;
  v.push_back(c);
  return v;
}

}  // namespace

TEST_CASE("RoPE: every variant rotates like transformers' formulas, to positions 10^6") {
  const std::size_t D = 128;
  const auto x = test::random_normal(D, 1);
  for (const RopeConfig& c : variants()) {
    CAPTURE(describe(c));
    const Rope rope(c, D);
    for (std::size_t p : {std::size_t{0}, std::size_t{1}, std::size_t{17}, std::size_t{4095}, std::size_t{8192},
                          std::size_t{65537}, std::size_t{999999}, std::size_t{1000000}}) {
      CAPTURE(p);
      std::vector<float> y = x;
      rope.rotate(y.data(), p);
      const auto want = direct_rotate(c, D, x, p);
      CHECK(test::relative_error(y.data(), want) < 1e-6);
    }
    // The stepper, across a resync boundary, far out.
    RopeStepper st(rope, 999000);
    double worst = 0.0;
    for (std::size_t p = 999000; p < 1000001; ++p, st.advance()) {
      if (p % 97 != 0 && p < 1000000 - 40) continue;
      std::vector<float> y = x;
      rope_rotate_stepped(rope, st, y.data());
      worst = std::max(worst, test::relative_error(y.data(), direct_rotate(c, D, x, p)));
    }
    CHECK(worst < 3e-6);
  }
}

TEST_CASE("RoPE: queries turned back to anchors and keys turned by the step table score like R(pos) k, to 10^6") {
  // What attention does with coded pre-RoPE keys: q . R(p) k = (R(a)^T q) . R(p - a) k, the
  // anchor a every step_period positions (RopeStepper::jump: float steps between exact double
  // anchors), R(t) from Rope::steps().
  const std::size_t D = 128;
  const auto x = test::random_normal(D, 1), q = test::random_normal(D, 2);
  double qn = 0.0, xn = 0.0;
  for (std::size_t d = 0; d < D; ++d) qn += double(q[d]) * q[d], xn += double(x[d]) * x[d];
  for (const RopeConfig& c : variants()) {
    CAPTURE(describe(c));
    const Rope rope(c, D);
    const RopeSteps rs = rope.steps();
    REQUIRE(rs.period == RopeStepper::resync);
    for (std::size_t first : {std::size_t{0}, std::size_t{4096 + 32}, std::size_t{999000}}) {
      CAPTURE(first);
      RopeStepper st(rope, first);
      std::vector<float> qr(D);
      double worst = 0.0;
      for (std::size_t a = first; a < first + 40 * rs.period; a += rs.period, st.jump()) {
        rope_rotate_back(rope, st, 0.5f, q.data(), 1, qr.data());
        for (std::size_t t = 0; t < rs.period; ++t) {
          double got = 0.0;
          for (std::size_t d = 0; d < D; ++d) {
            const float k = d < rs.rotary_dim ? x[d] * rs.cos(t)[d] + x[rs.partner(d)] * rs.sin(t)[d] : x[d];
            got += double(qr[d]) * k;
          }
          const auto want = direct_rotate(c, D, x, a + t);
          double w = 0.0;
          for (std::size_t d = 0; d < D; ++d) w += 0.5 * q[d] * want[d];
          worst = std::max(worst, std::abs(got - w) / (0.5 * std::sqrt(qn * xn)));
        }
      }
      CHECK(worst < 1e-6);
    }
  }
}

TEST_CASE("RoPE: invalid settings are refused, naming the field") {
  RopeConfig c;
  c.theta = 0.0;
  CQ_CHECK_THROWS_CONTAINING(Rope(c, 64), "rope: theta must be finite and > 1, got 0");
  c.theta = std::nan("");
  CQ_CHECK_THROWS_CONTAINING(Rope(c, 64), "theta must be finite");
  c = {};
  c.theta = -5.0;
  CQ_CHECK_THROWS_CONTAINING(Rope(c, 64), "got -5");
  c = {};
  c.rotary_dim = 30;
  CQ_CHECK_THROWS_CONTAINING(Rope(c, 16), "rotary_dim 30 must be even, >= 2 and <= head_dim 16");
  c = {};
  c.scaling = RopeScaling::llama3;
  c.low_freq_factor = 4.0;
  c.high_freq_factor = 1.0;
  CQ_CHECK_THROWS_CONTAINING(Rope(c, 64), "llama3 needs 0 < low_freq_factor < high_freq_factor");
  c = {};
  c.scaling = RopeScaling::yarn;
  c.factor = 0.5;
  CQ_CHECK_THROWS_CONTAINING(Rope(c, 64), "scaling factor must be finite and >= 1, got 0.5");
  CQ_CHECK_THROWS_CONTAINING(Rope(RopeConfig{}, 2048), "exceeds 512");
}

TEST_CASE("RoPE: pre-RoPE keys through the paged cache, every variant, positions from an offset") {
  // Keys are appended before RoPE and rotated inside attention (coded and full-precision ones);
  // the reference rotates what read_token returns with the direct implementation, in double.
  for (const RopeConfig& rc : variants()) {
    CAPTURE(describe(rc));
    const std::size_t D = 64, n = 300, first = 700000;  // positions 700000 .. 700299
    RopeConfig c = rc;
    if (c.rotary_dim) c.rotary_dim = 16;
    KVCodebooks cb(1, 1, D, {{{4, 8}, {4, 8}}}, KeyRope::pre, c);
    cb.set(0, 0, test::random_codebook(D, 4, 8, 1), test::random_codebook(D, 4, 8, 2));
    PagedCacheOptions o;
    o.page_tokens = 64;
    o.window = 16;
    o.sinks = 3;
    o.code_pages = 10;
    o.full_pages = 20;
    o.pre_rope_keys = true;
    o.rope = c;
    PagedKVCache<float> cache(cb, o);
    const SeqId s = cache.add_sequence(first);
    const auto k = test::random_normal(n * D, 3), v = test::random_normal(n * D, 4);
    for (std::size_t t = 0; t < n; t += 50)
      cache.append(0, s, ConstMatrixView<float>(k.data() + t * D, 50, D), ConstMatrixView<float>(v.data() + t * D, 50, D));
    const auto q = test::random_normal(2 * D, 5);
    std::vector<float> out(2 * D);
    cache.attend(0, s, ConstMatrixView<float>(q.data(), 1, 2 * D), MatrixView<float>(out.data(), 1, 2 * D));
    std::vector<double> ref(2 * D, 0.0);
    for (std::size_t h = 0; h < 2; ++h) {
      std::vector<double> sc(n);
      std::vector<std::vector<float>> vals(n, std::vector<float>(D));
      double m = -1e300;
      for (std::size_t p = 0; p < n; ++p) {
        std::vector<float> key(D);
        cache.read_token(0, s, 0, p, key.data(), vals[p].data());
        const auto kr = direct_rotate(c, D, key, first + p);
        double d = 0;
        for (std::size_t i = 0; i < D; ++i) d += double(q[h * D + i]) * kr[i];
        sc[p] = d / 8.0;
        m = std::max(m, sc[p]);
      }
      double z = 0;
      for (auto& x : sc) z += x = std::exp(x - m);
      for (std::size_t p = 0; p < n; ++p)
        for (std::size_t i = 0; i < D; ++i) ref[h * D + i] += sc[p] / z * vals[p][i];
    }
    CHECK(test::relative_error(out.data(), ref) < 1e-5);
  }
}
