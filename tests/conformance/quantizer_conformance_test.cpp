#include "quantizer_conformance.hpp"

using namespace cq;

TEST_CASE_TEMPLATE_DEFINE("backend conformance: codes and decoded rows match the scalar reference", Backend, conformance) {
  INFO("instruction set of this build: ", simd_isa_name());
  std::uint64_t seed = 1;
  for (int bits : {1, 2, 3, 4, 5, 7, 8, 9, 10, 12})
    for (std::size_t C : {1u, 2u, 3u, 4u, 8u, 16u})
      for (std::size_t n : {1u, 33u, 77u}) {
        const std::size_t dim = C * (C >= 8 ? 2 : 5);
        if (bits >= 10 && (n > 33 || C > 4)) continue;  // keep the big codebooks cheap
        test::check_backend_against_reference<Backend, float>(n, dim, C, bits, ++seed);
        test::check_backend_against_reference<Backend, half>(n, dim, C, bits, ++seed);
        test::check_backend_against_reference<Backend, bfloat16>(n, dim, C, bits, ++seed);
      }
}
TEST_CASE_TEMPLATE_APPLY(conformance, test::conformance_backends);

TEST_CASE_TEMPLATE_DEFINE("backend conformance: k-means fits agree with the reference backend", Backend, kmeans_conf) {
  const std::size_t n = 2000, D = 16;
  const auto x = synthetic_kv(n, D, {.seed = 77});
  FitOptions o;
  o.iterations = 10;
  Codebook ref(D, 4, 6), got(D, 4, 6);
  const FitReport rr = fit_codebook<backend::Scalar>(ref, ConstMatrixView<float>(x.data(), n, D), {}, o);
  const FitReport rg = fit_codebook<Backend>(got, ConstMatrixView<float>(x.data(), n, D), {}, o);
  // Ties can flip an assignment and move a centroid slightly, so compare the objectives.
  CHECK(rg.final_objective() == doctest::Approx(rr.final_objective()).epsilon(1e-3));
}
TEST_CASE_TEMPLATE_APPLY(kmeans_conf, test::conformance_backends);

TEST_CASE_TEMPLATE_DEFINE("backend conformance: nearest centroids stay exact when rows and centroids share a large offset",
                          Backend, offsets) {
  // Adding the same constant to every row and every centroid changes no distance, so the codes
  // must stay those of the true nearest centroids (checked in double on the float inputs) and the
  // error must stay the un-offset one.
  const test::GaussianFit& f = test::gaussian_fit();
  const std::size_t n = 1024, D = f.dim;
  double mse_at_zero = 0.0;
  for (double offset : {0.0, 1e1, 1e2, 1e3, 3e3, 1e4, 1e5}) {
    CAPTURE(offset);
    const Codebook cb = test::offset_codebook(f.cb, offset);
    std::vector<float> x(n * D);
    for (std::size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(double(f.x[i]) + offset);
    const ConstMatrixView<float> xv(x.data(), n, D);
    PackedCodes ref(cb.groups(), cb.bits(), n), got(cb.groups(), cb.bits(), n);
    encode_rows<backend::Scalar>(cb.view(), xv, ref.view(), 0);
    encode_rows<Backend>(cb.view(), xv, got.view(), 0);
    std::size_t wrong = 0;
    for (std::size_t r = 0; r < n; ++r)
      for (std::size_t g = 0; g < cb.groups(); ++g) wrong += !test::is_nearest(cb, x.data() + r * D, g, got.get(r, g));
    CHECK(wrong == 0);
    const double mse_ref = test::reconstruction_mse(cb, ref, x), mse_got = test::reconstruction_mse(cb, got, x);
    CHECK(mse_got == doctest::Approx(mse_ref).epsilon(1e-6));
    if (offset == 0.0) mse_at_zero = mse_ref;
    // Rounding the offset rows and centroids to float adds at most ulp^2 / 6 per element.
    CHECK(mse_ref == doctest::Approx(mse_at_zero).epsilon(1e-3));
  }
}
TEST_CASE_TEMPLATE_APPLY(offsets, test::conformance_backends);

TEST_CASE_TEMPLATE_DEFINE("backend conformance: a fit with an outlier channel at 1e4 reaches the un-offset objective",
                          Backend, outlier_fit) {
  // Channel 0 of every group sits near 1e4 (as outlier channels of real keys do); the offset moves
  // every centroid along that channel and changes no distance, so the fit must end where the
  // fit of the un-offset rows ends.
  const std::size_t n = 4096, D = 32, C = 8;
  const auto x = test::random_normal(n * D, 99);
  std::vector<float> xo = x;
  for (std::size_t i = 0; i < n; ++i)
    for (std::size_t g = 0; g < D / C; ++g) xo[i * D + g * C] += 1e4f;
  FitOptions o;
  o.iterations = 10;
  Codebook plain(D, C, 8), outlier(D, C, 8);
  const FitReport rp = fit_codebook<Backend>(plain, ConstMatrixView<float>(x.data(), n, D), {}, o);
  const FitReport ro = fit_codebook<Backend>(outlier, ConstMatrixView<float>(xo.data(), n, D), {}, o);
  CHECK(ro.final_objective() == doctest::Approx(rp.final_objective()).epsilon(0.01));
}
TEST_CASE_TEMPLATE_APPLY(outlier_fit, test::conformance_backends);
