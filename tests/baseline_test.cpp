#include "test_util.hpp"

using namespace cq;

TEST_CASE("uniform baseline: error within half a step, bits include scale and zero point") {
  const std::size_t n = 70, D = 64;
  const auto x = synthetic_kv(n, D, {.seed = 12});
  for (auto axis : {UniformQuantizer<>::Axis::per_channel, UniformQuantizer<>::Axis::per_token}) {
    for (int bits : {1, 2, 4, 8}) {
      UniformQuantizer<> q(D, bits, 32, axis);
      CHECK(q.bits_per_channel() == doctest::Approx(bits + 1.0));
      const UniformCodes codes = q.encode(ConstMatrixView<float>(x.data(), n, D));
      std::vector<float> dec(n * D);
      q.decode(codes, MatrixView<float>(dec.data(), n, D));
      const std::size_t groups = axis == UniformQuantizer<>::Axis::per_channel ? 3 * D : n * 2;
      CHECK(codes.scale.size() == groups);
      for (std::size_t i = 0; i < n * D; ++i) {
        const std::size_t r = i / D, c = i % D;
        const std::size_t g = axis == UniformQuantizer<>::Axis::per_channel ? (r / 32) * D + c : r * 2 + c / 32;
        const float step = static_cast<float>(codes.scale[g]);
        // Half a step, plus slack for the fp16 rounding of the zero point and scale.
        REQUIRE(std::abs(dec[i] - x[i]) <= 0.5f * step + 2e-3f * (std::abs(x[i]) + 1.0f) * (1 << bits) * 0.01f + 1e-2f * step + 2e-3f);
      }
    }
  }
  CQ_CHECK_THROWS_CONTAINING(UniformQuantizer<>::values(100, 2, 32), "per-token groups of 32 do not divide dim 100");
  CQ_CHECK_THROWS_CONTAINING(UniformQuantizer<>::keys(64, 0), "bits must be in 1..16, got 0");
}

TEST_CASE("CQ beats the uniform baseline at equal bits per channel on KV-like data") {
  const std::size_t n = 4096, D = 64;
  const auto x = synthetic_kv(n, D, {.seed = 13});
  const ConstMatrixView<float> xv(x.data(), n, D);
  // 2 bits per channel: CQ-4c8b vs INT1 with g=32 (1 + 32/32 = 2 bits).
  CoupledQuantizer<4, 8> cq(D);
  FitOptions o;
  o.iterations = 10;
  cq.fit(xv, o);
  const auto cq_dec = cq.decode(cq.encode(xv));
  const double cq_mse = mse(xv, ConstMatrixView<float>(cq_dec.data(), n, D));
  auto int_mse = [&](UniformQuantizer<> q) {
    std::vector<float> d(n * D);
    q.decode(q.encode(xv), MatrixView<float>(d.data(), n, D));
    return mse(xv, ConstMatrixView<float>(d.data(), n, D));
  };
  const double k_mse = int_mse(UniformQuantizer<>::keys(D, 1, 32));
  const double v_mse = int_mse(UniformQuantizer<>::values(D, 1, 32));
  MESSAGE("2 bits/channel: CQ-4c8b mse ", cq_mse, ", INT1-g32 keys ", k_mse, ", values ", v_mse);
  CHECK(cq_mse < 0.5 * std::min(k_mse, v_mse));
}

TEST_CASE("uniform baseline: non-finite inputs and inputs beyond fp16 scales are refused, not coded as inf") {
  const std::size_t n = 40, D = 64;
  auto x = synthetic_kv(n, D, {.seed = 14});
  const auto keys = UniformQuantizer<>::keys(D, 4);
  x[3 * D + 5] = std::numeric_limits<float>::quiet_NaN();
  CQ_CHECK_THROWS_CONTAINING(keys.encode(ConstMatrixView<float>(x.data(), n, D)), "x(3, 5) = nan is not finite");
  x[3 * D + 5] = -std::numeric_limits<float>::infinity();
  CQ_CHECK_THROWS_CONTAINING(keys.encode(ConstMatrixView<float>(x.data(), n, D)), "x(3, 5) = -inf is not finite");
  x[3 * D + 5] = 70000.0f;
  CQ_CHECK_THROWS_CONTAINING(UniformQuantizer<>::values(D, 4).encode(ConstMatrixView<float>(x.data(), n, D)),
                             "x(3, 5) = 70000 is beyond the fp16 range");
  // At 1 bit the scale is max - min: two fp16-sized inputs can still make it too large.
  x[3 * D + 5] = 40000.0f;
  x[4 * D + 5] = -40000.0f;
  CQ_CHECK_THROWS_CONTAINING(UniformQuantizer<>::keys(D, 1).encode(ConstMatrixView<float>(x.data(), n, D)),
                             "the scale (max - min) / (2^1 - 1) = 80000 of the group at row 0, column 5 does not fit fp16");
  // Two bits fit the same group: every decoded value is finite and within half a step.
  const auto two = UniformQuantizer<>::keys(D, 2);
  const UniformCodes c = two.encode(ConstMatrixView<float>(x.data(), n, D));
  std::vector<float> dec(n * D);
  two.decode(c, MatrixView<float>(dec.data(), n, D));
  for (std::size_t i = 0; i < n * D; ++i) {
    REQUIRE(std::isfinite(dec[i]));
    REQUIRE(std::abs(dec[i] - x[i]) <= 0.51f * static_cast<float>(c.scale[(i / D / 32) * D + i % D]) + 32.0f);
  }
}

TEST_CASE("uniform baseline: values up to fp16's largest decode finite in fp16 too") {
  // Groups spanning [0, 65504]: at 2 bits the scale 21834.7 rounds up to 21840 in fp16, and the
  // top code would decode to 65520, which is inf in fp16; such scales are rounded down instead.
  cq::detail::Rng rng(21);
  const std::size_t n = 64, D = 32;
  std::vector<half> x(n * D);
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = half(65504.0f * float(rng.uniform()));
  for (std::size_t c = 0; c < D; ++c) {
    x[c] = half(65504.0f);                                  // row 0: the top of every key group
    x[D + c] = half(c % 2 ? 65504.0f : 0.0f);               // row 1: a value group spanning it all
  }
  for (int bits : {2, 3, 5, 8}) {
    for (auto q : {UniformQuantizer<half>::keys(D, bits), UniformQuantizer<half>::values(D, bits)}) {
      const UniformCodes codes = q.encode(ConstMatrixView<half>(x.data(), n, D));
      std::vector<half> dec(n * D);
      q.decode(codes, MatrixView<half>(dec.data(), n, D));
      for (std::size_t i = 0; i < n * D; ++i) {
        REQUIRE(std::isfinite(static_cast<float>(dec[i])));
        REQUIRE(std::abs(static_cast<float>(dec[i]) - static_cast<float>(x[i])) <=
                0.51f * 65504.0f / float((1 << bits) - 1) + 64.0f);
      }
    }
  }
}

TEST_CASE("uniform baseline: decoding codes of another quantizer's shape is refused") {
  const std::size_t n = 70, D = 64;
  const auto x = synthetic_kv(n, D, {.seed = 15});
  const ConstMatrixView<float> xv(x.data(), n, D);
  const UniformCodes k = UniformQuantizer<>::keys(D, 4, 32).encode(xv);
  std::vector<float> out(n * D);
  const MatrixView<float> ov(out.data(), n, D);
  CQ_CHECK_THROWS_CONTAINING(UniformQuantizer<>::keys(32, 4, 32).decode(k, MatrixView<float>(out.data(), n, 32)),
                             "codes hold 64 channels x 4 bits, the quantizer 32 x 4");
  CQ_CHECK_THROWS_CONTAINING(UniformQuantizer<>::keys(D, 2, 32).decode(k, ov), "codes hold 64 channels x 4 bits");
  // Same dim and bits, other grouping: 3 x 64 scales, where group size 16 needs 5 x 64 and
  // per-token groups of 32 need 70 x 2.
  CQ_CHECK_THROWS_CONTAINING(UniformQuantizer<>::keys(D, 4, 16).decode(k, ov),
                             "codes carry 192 scales and 192 zero points, 70 tokens need 320 (group size 16, per channel)");
  CQ_CHECK_THROWS_CONTAINING(UniformQuantizer<>::values(D, 4, 32).decode(k, ov), "70 tokens need 140");
  UniformCodes cut = k;
  cut.zero.pop_back();
  CQ_CHECK_THROWS_CONTAINING(UniformQuantizer<>::keys(D, 4, 32).decode(cut, ov), "192 scales and 191 zero points");
  UniformQuantizer<>::keys(D, 4, 32).decode(k, ov);  // the matching shape decodes
}
