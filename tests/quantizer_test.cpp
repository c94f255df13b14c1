#include "test_util.hpp"

using namespace cq;

TEST_CASE("CoupledQuantizer exposes its configuration as constants") {
  using Q = CoupledQuantizer<8, 8>;
  static_assert(Q::channels == 8 && Q::bits == 8 && Q::num_centroids == 256);
  static_assert(Q::bits_per_channel == 1.0);
  static_assert(CQ2c8b<>::bits_per_channel == 4.0 && CQ4c8b<>::bits_per_channel == 2.0);
  static_assert(CQ8c10b<>::bits_per_channel == 1.25);
  static_assert(quantizer_backend<backend::Scalar> && quantizer_backend<backend::Native>);
  Q q(128);
  CHECK(q.dim() == 128);
  CHECK(q.groups() == 16);
  CHECK(!q.fitted());
}

TEST_CASE_TEMPLATE("encode returns the true nearest centroid; decode(encode(x)) MSE equals the objective", T, float,
                   half, bfloat16) {
  const std::size_t n = 1200, D = 24;
  const auto xf = synthetic_kv(n, D, {.seed = 21});
  const auto x = test::convert<T>(xf);
  CoupledQuantizer<3, 6, T> q(D);
  FitOptions o;
  o.iterations = 15;
  o.max_points_per_centroid = 0;  // train on every row, so the objective is over the same rows
  const FitReport rep = q.fit(ConstMatrixView<T>(x.data(), n, D), o);
  CHECK(q.fitted());
  CHECK(q.codebook().info().dtype == std::string(dtype_name(dtype_of<T>)));
  const PackedCodes codes = q.encode(ConstMatrixView<T>(x.data(), n, D));
  for (std::size_t i = 0; i < n; ++i)
    for (std::size_t g = 0; g < q.groups(); ++g) REQUIRE(test::is_nearest(q.codebook(), x.data() + i * D, g, codes.get(i, g)));
  // Reconstruction error, measured in float from the T inputs, equals the fit's objective.
  std::vector<float> dec(n * D);
  CoupledQuantizer<3, 6, float> qf(q.codebook());
  qf.decode(codes.view(), MatrixView<float>(dec.data(), n, D));
  std::vector<float> xin(n * D);
  for (std::size_t i = 0; i < n * D; ++i) xin[i] = to_float(x[i]);
  const double err = mse(ConstMatrixView<float>(xin.data(), n, D), ConstMatrixView<float>(dec.data(), n, D));
  CHECK(err == doctest::Approx(rep.final_objective()).epsilon(1e-5));
  CHECK(q.codebook().info().objective == rep.final_objective());
  // T-typed decode is the float decode rounded to T.
  std::vector<T> dec_t(n * D);
  q.decode(codes.view(), MatrixView<T>(dec_t.data(), n, D));
  for (std::size_t i = 0; i < n * D; ++i) REQUIRE(dec_t[i] == from_float<T>(dec[i]));
}

TEST_CASE("encode_append and view-based encode agree with encode") {
  const std::size_t D = 16;
  const auto x = synthetic_kv(300, D, {.seed = 2});
  CoupledQuantizer<4, 5> q(D);
  q.fit(ConstMatrixView<float>(x.data(), 300, D));
  const PackedCodes all = q.encode(ConstMatrixView<float>(x.data(), 300, D));
  PackedCodes pieces(q.groups(), 5);
  for (std::size_t r = 0; r < 300;) {
    const std::size_t take = std::min<std::size_t>(300 - r, 1 + (r * 7) % 45);
    q.encode_append(ConstMatrixView<float>(x.data() + r * D, take, D), pieces);
    r += take;
  }
  CHECK(pieces == all);
  PackedCodes engine_owned(q.groups(), 5, 300);
  q.encode(ConstMatrixView<float>(x.data() + 100 * D, 200, D), engine_owned.view(), 100);
  q.encode(ConstMatrixView<float>(x.data(), 100, D), engine_owned.view(), 0);
  CHECK(engine_owned == all);
  // Strided input (every other row of a wider matrix) encodes the same as packed rows.
  std::vector<float> wide(300 * 2 * D, 0.0f);
  for (std::size_t r = 0; r < 300; ++r) std::copy_n(x.data() + r * D, D, wide.data() + r * 2 * D + D);
  const PackedCodes strided = q.encode(ConstMatrixView<float>(wide.data() + D, 300, D, 2 * D));
  CHECK(strided == all);
}

TEST_CASE("bad input throws cq::Error naming the argument and the value") {
  CQ_CHECK_THROWS_CONTAINING((CoupledQuantizer<8, 8>(100)), "dim 100 is not a multiple of channels per group 8");
  CQ_CHECK_THROWS_CONTAINING(Codebook(16, 4, 0), "bits must be in 1..16, got 0");
  CQ_CHECK_THROWS_CONTAINING(Codebook(16, 4, 17), "bits must be in 1..16, got 17");
  CQ_CHECK_THROWS_CONTAINING(Codebook(16, 0, 4), "channels per group must be >= 1, got 0");

  const std::size_t D = 8;
  auto x = synthetic_kv(200, D, {.seed = 1});
  CoupledQuantizer<4, 8> big(D);
  CQ_CHECK_THROWS_CONTAINING(big.fit(ConstMatrixView<float>(x.data(), 200, D)),
                             "200 calibration rows are fewer than the 256 centroids");
  CoupledQuantizer<4, 4> q(D);
  CQ_CHECK_THROWS_CONTAINING(q.encode(ConstMatrixView<float>(x.data(), 10, D)), "no fitted codebook");
  CQ_CHECK_THROWS_CONTAINING(q.fit(ConstMatrixView<float>(x.data(), 100, 4)), "x has 4 columns but the codebook's dim is 8");
  x[37 * D + 5] = std::numeric_limits<float>::quiet_NaN();
  CQ_CHECK_THROWS_CONTAINING(q.fit(ConstMatrixView<float>(x.data(), 200, D)), "x(37, 5) = nan is not finite");
  x[37 * D + 5] = std::numeric_limits<float>::infinity();
  CQ_CHECK_THROWS_CONTAINING(q.fit(ConstMatrixView<float>(x.data(), 200, D)), "x(37, 5) = inf is not finite");
  x[37 * D + 5] = 0.5f;
  CHECK(!q.fitted());  // failed fits left the quantizer untouched

  std::vector<float> w(200 * 2, 1.0f);
  w[3 * 2 + 1] = -0.5f;
  CQ_CHECK_THROWS_CONTAINING(q.fit(ConstMatrixView<float>(x.data(), 200, D), ConstMatrixView<float>(w.data(), 200, 2)),
                             "weights(3, 1) = -0.5 must be finite and non-negative");
  w[3 * 2 + 1] = 1.0f;
  CQ_CHECK_THROWS_CONTAINING(q.fit(ConstMatrixView<float>(x.data(), 200, D), ConstMatrixView<float>(w.data(), 200, 1)),
                             "weights are 200 x 1 but must be rows x groups = 200 x 2");
  std::vector<float> zeros(200 * 2, 0.0f);
  CQ_CHECK_THROWS_CONTAINING(q.fit(ConstMatrixView<float>(x.data(), 200, D), ConstMatrixView<float>(zeros.data(), 200, 2)),
                             "weights of group 0 sum to zero");

  q.fit(ConstMatrixView<float>(x.data(), 200, D));
  const Codebook before = q.codebook();
  CQ_CHECK_THROWS_CONTAINING(q.fit(ConstMatrixView<float>(x.data(), 10, D)), "10 calibration rows are fewer than the 16");
  CHECK(q.codebook() == before);  // a failed refit keeps the old codebook
  CQ_CHECK_THROWS_CONTAINING(q.encode(ConstMatrixView<float>(x.data(), 10, 4)), "x has 4 columns but the codebook's dim is 8");
  PackedCodes wrong(3, 4);
  CQ_CHECK_THROWS_CONTAINING(q.encode_append(ConstMatrixView<float>(x.data(), 10, D), wrong), "codes are 3 groups x 4 bits");
  CHECK(wrong.size() == 0);
  PackedCodes small(2, 4, 5);
  CQ_CHECK_THROWS_CONTAINING(q.encode(ConstMatrixView<float>(x.data(), 10, D), small.view(), 0), "do not fit in codes of 5 tokens");
  std::vector<float> out(10 * D);
  CQ_CHECK_THROWS_CONTAINING(q.decode(small.view(), MatrixView<float>(out.data(), 10, D)), "exceed the 5 coded tokens");
  CQ_CHECK_THROWS_CONTAINING(q.encode(ConstMatrixView<float>(x.data(), 10, D, 4)), "stride 4 is smaller than cols 8");
  CQ_CHECK_THROWS_CONTAINING((CoupledQuantizer<2, 4>(before)), "codebook has channels = 4, bits = 4");
}

TEST_CASE("fisher_weights sums squared gradients over each group") {
  std::vector<float> g2{1, 2, 3, 4, 5, 6, 7, 8};  // 2 rows x 4 channels
  const auto w = fisher_weights(ConstMatrixView<float>(g2.data(), 2, 4), 2);
  CHECK(w == std::vector<float>{3, 7, 11, 15});
  CQ_CHECK_THROWS_CONTAINING(fisher_weights(ConstMatrixView<float>(g2.data(), 2, 4), 3), "dim 4 is not a multiple of channels 3");
}
