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
