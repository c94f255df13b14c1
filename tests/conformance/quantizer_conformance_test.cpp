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
