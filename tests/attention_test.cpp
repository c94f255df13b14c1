#include "attention_oracle.hpp"

using namespace cq;

// The shared shape grid, GQA, windows, sinks, several query rows and pre-RoPE keys are the
// attention conformance suite's (tests/conformance); these are the single-purpose tests.

// The largest cos/sin error of a stepper moved `stride` positions at a time by `move`, against
// sincos in double, over 10^5 positions. The kernel steps in float between double anchors; a drift
// or an off-by-one at an anchor would show here long before it moves an attention output past its
// tolerance.
template <class Move>
double stepper_error(std::size_t stride, Move move) {
  const std::size_t dim = 128, first = 12345, count = 100000;
  const Rope rope(RopeConfig{}, dim);
  const std::vector<double>& f = rope.inv_freq();
  RopeStepper st(rope, first);
  double worst = 0.0;
  for (std::size_t p = first; p < first + count; p += stride, move(st))
    for (std::size_t i = 0; i < dim / 2; ++i) {
      const double a = double(p) * f[i];
      worst = std::max({worst, std::abs(st.cos()[i] - std::cos(a)), std::abs(st.sin()[i] - std::sin(a))});
    }
  return worst;
}

TEST_CASE("RopeStepper: cos/sin of every position (advance) and every anchor (jump) match sincos to float "
          "accuracy over 10^5 positions") {
  const double by_advance = stepper_error(1, [](RopeStepper& st) { st.advance(); });
  const double by_jump = stepper_error(RopeStepper::resync, [](RopeStepper& st) { st.jump(); });
  MESSAGE("largest errors: advance ", by_advance, ", jump ", by_jump);
  CHECK(by_advance < 2e-6);
  CHECK(by_jump < 2e-6);
}

TEST_CASE("LinePrefetch issues each run's lines in even shares per step and the rest at finish") {
  alignas(64) static const std::uint8_t a[64 * 64] = {}, b[16 * 64] = {};
  detail::LinePrefetch pf(a, sizeof a, b, 15 * 64 + 1, 8);  // 64 lines and 16 (the last one partial) over 8 steps
  for (int s = 1; s <= 3; ++s) {
    pf.step();
    CHECK(pf.issued(0) == std::size_t(8 * s));
    CHECK(pf.issued(1) == std::size_t(2 * s));
  }
  pf.finish();
  CHECK(pf.issued(0) == 64);
  CHECK(pf.issued(1) == 16);
  for (int s = 0; s < 4; ++s) pf.step();  // nothing past the runs' ends
  CHECK(pf.issued(0) == 64);
  CHECK(pf.issued(1) == 16);
  detail::LinePrefetch one(a, 3 * 64, nullptr, 0, 8);  // fewer lines than steps: one a step
  one.step();
  CHECK(one.issued(0) == 1);
  CHECK(one.issued(1) == 0);
}

TEST_CASE("splitting a long code range across threads gives the unsplit result") {
  // Grouped items of 4, 6 (lanes past the heads in the merged histograms), 8 and 12 (16 lanes)
  // heads, and one head (per-head path), in 2 and 4 pieces.
  KVCacheConfig cfg;
  cfg.head_dim = 128;
  cfg.spec = {{8, 8}, {8, 8}};
  const auto cache = test::random_cache<float>(cfg, 9000, 31);
  ThreadPool pool(4);
  const KVHeadView<float> view = cache.head_view(0, 0);
  for (std::size_t heads : {1, 4, 6, 8, 12})
    for (std::size_t parts : {2, 4}) {
      CAPTURE(heads);
      CAPTURE(parts);
      const auto q = test::random_normal(heads * 128, 32 + heads);
      std::vector<float> one(heads * 128), split(heads * 128);
      attend_head(view, q.data(), heads, 8999, 0.1f, one.data());
      attend_head(view, q.data(), heads, 8999, 0.1f, split.data(), AttentionMethod::fused, &pool, parts);
      std::vector<double> ref(one.begin(), one.end());
      CHECK(test::relative_error(split.data(), ref) < 1e-5);  // float sums in another order
      const auto oracle = test::oracle_attend(view, q.data(), heads, 8999, 0.1f);
      CHECK(test::relative_error(split.data(), oracle) < 1e-5);
    }
}

TEST_CASE("scores far apart in magnitude stay accurate (the lazy reference maximum rescales)") {
  // Large queries give scores spanning hundreds of nats; the running reference must be raised
  // (accumulators rescaled) several times without losing accuracy.
  KVCacheConfig cfg;
  cfg.head_dim = 64;
  cfg.spec = {{4, 8}, {4, 8}};
  cfg.window = 8;
  const auto cache = test::random_cache<float>(cfg, 2000, 41);
  auto q = test::random_normal(64, 42, 30.0f);
  std::vector<float> out(64);
  const auto view = cache.head_view(0, 0);
  attend_head(view, q.data(), 1, 1999, 1.0f, out.data());
  CHECK(test::relative_error(out.data(), test::oracle_attend(view, q.data(), 1, 1999, 1.0f)) < 1e-5);
}

TEST_CASE("pre-RoPE KVCache: attention equals dense attention over keys rotated from what was appended") {
  // Independent of the cache's rotated copies: every key comes from read_token (as appended,
  // before RoPE, decoded where coded) and is rotated here with the reference Rope::rotate.
  for (RopeStyle style : {RopeStyle::rotate_half, RopeStyle::interleaved}) {
    KVCacheConfig cfg;
    cfg.head_dim = 64;
    cfg.kv_heads = 1;
    cfg.spec = {{4, 8}, {4, 8}};
    cfg.window = 16;
    cfg.sinks = 3;
    cfg.pre_rope_keys = true;
    cfg.rope.theta = 500.0;
    cfg.rope.style = style;
    const auto cache = test::random_cache<float>(cfg, 300, 51);
    const auto q = test::random_normal(2 * 64, 52);
    std::vector<float> out(2 * 64);
    cache.attend(0, ConstMatrixView<float>(q.data(), 1, 128), MatrixView<float>(out.data(), 1, 128));
    std::vector<double> ref(2 * 64, 0.0);
    for (std::size_t h = 0; h < 2; ++h) {
      std::vector<double> s(300);
      std::vector<std::vector<float>> vals(300, std::vector<float>(64));
      double m = -1e300;
      for (std::size_t p = 0; p < 300; ++p) {
        std::vector<float> k(64);
        cache.read_token(0, 0, p, k.data(), vals[p].data());
        Rope(cfg.rope, 64).rotate(k.data(), p);
        double d = 0;
        for (std::size_t i = 0; i < 64; ++i) d += double(q[h * 64 + i]) * k[i];
        s[p] = d / 8.0;
        m = std::max(m, s[p]);
      }
      double z = 0;
      for (auto& x : s) z += x = std::exp(x - m);
      for (std::size_t p = 0; p < 300; ++p)
        for (std::size_t i = 0; i < 64; ++i) ref[h * 64 + i] += s[p] / z * vals[p][i];
    }
    CHECK(test::relative_error(out.data(), ref) < 1e-5);
  }
}

TEST_CASE("attend_head trusts nothing it is handed: inconsistent views, positions and options are refused") {
  // Views an engine builds itself: every part is checked against the others once per call.
  KVCacheConfig cfg;
  cfg.head_dim = 64;
  cfg.spec = {{4, 8}, {4, 8}};
  cfg.window = 8;
  const auto cache = test::random_cache<float>(cfg, 300, 61);
  const KVHeadView<float> good = cache.head_view(0, 0);
  const auto q = test::random_normal(64, 62);
  std::vector<float> out(64, 0.0f);
  attend_head(good, q.data(), 1, 299, 0.0f, out.data());
  const std::vector<float> before = out;

  const Codebook values16 = test::random_codebook(64, 4, 8, 63);  // 16 groups
  const Codebook keys4bit = test::random_codebook(64, 4, 4, 64);
  KVHeadView<float> v = good;
  v.value_codes.groups = 8;  // codes of 8 groups against a 16-group value codebook
  CQ_CHECK_THROWS_CONTAINING(attend_head(v, q.data(), 1, 299, 0.0f, out.data()),
                             "value codes are 8 groups x 8 bits but the value codebook has 16 groups x 8 bits");
  v = good;
  v.key_codebook = keys4bit.view();  // 8-bit codes against a 4-bit codebook
  CQ_CHECK_THROWS_CONTAINING(attend_head(v, q.data(), 1, 299, 0.0f, out.data()),
                             "key codes are 16 groups x 8 bits but the key codebook has 16 groups x 4 bits");
  v = good;
  v.recent_values.rows = 3;  // fewer full-precision value rows than the window reads
  CQ_CHECK_THROWS_CONTAINING(attend_head(v, q.data(), 1, 299, 0.0f, out.data()), "the window of position 299 is [292, 300) but full-precision rows cover keys [224, 300) and values [224, 227)");
  v = good;
  v.value_codebook = test::random_codebook(32, 4, 8, 65).view();
  CQ_CHECK_THROWS_CONTAINING(attend_head(v, q.data(), 1, 299, 0.0f, out.data()), "value codebook has dim 32");
  CQ_CHECK_THROWS_CONTAINING(attend_head(good, q.data(), 1, SIZE_MAX, 0.0f, out.data()), "position 18446744073709551615");
  CQ_CHECK_THROWS_CONTAINING(attend_head(good, q.data(), 1, 300, 0.0f, out.data()), "the window of position 300 is [293, 301)");
  for (float bad : {std::nanf(""), std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity()})
    CQ_CHECK_THROWS_CONTAINING(attend_head(good, q.data(), 1, 299, bad, out.data()), "is not finite");
  for (float bad : {std::nanf(""), std::numeric_limits<float>::infinity(), -1.0f}) {
    const std::string want = detail::concat("logits_soft_cap ", bad, " must be 0 (none) or finite and positive");
    CQ_CHECK_THROWS_CONTAINING(attend_head(good, q.data(), 1, 299, {0.0f, bad}, out.data()), want.c_str());
  }
  CHECK(out == before);  // nothing was written by the refused calls
}

TEST_CASE("logit soft-capping: the SIMD tanh matches std::tanh at every magnitude and tail length") {
  // Logits from 0 and subnormals to 1e30, both signs, n not a multiple of any vector width; the
  // error that matters to a softmax is absolute (a relative error in the weight), so against cap.
  std::vector<float> x;
  for (float m : {0.0f, 1e-40f, 1e-30f, 1e-6f, 1e-3f, 0.1f, 0.5f, 0.9f, 1.0f, 1.7f, 3.0f, 9.0f, 20.0f, 44.0f, 100.0f,
                  1e4f, 1e30f})
    for (float sign : {1.0f, -1.0f}) x.push_back(sign * m);
  const auto r = test::random_normal(75, 71, 5.0f);
  x.insert(x.end(), r.begin(), r.end());
  for (float cap : {0.5f, 30.0f, 50.0f})
    for (std::size_t n : {x.size(), std::size_t{1}, std::size_t{13}, std::size_t{37}}) {
      std::vector<float> got(x.begin(), x.begin() + n), want(got);
      backend::Native::soft_cap(got.data(), n, cap);
      backend::Scalar::soft_cap(want.data(), n, cap);
      for (std::size_t i = 0; i < n; ++i) {
        CAPTURE(x[i]);
        CAPTURE(cap);
        CHECK(std::abs(got[i] - want[i]) <= 4e-7f * cap);
        CHECK(std::abs(got[i]) <= cap);
        CHECK(std::signbit(got[i]) == std::signbit(x[i]));
      }
    }
}
