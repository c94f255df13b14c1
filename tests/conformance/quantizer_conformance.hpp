#pragma once
// One conformance suite, run against every quantizer backend this translation unit has: codes
// equal the scalar reference (ties aside: a differing code must be an equally near centroid) and
// decoded values equal it bit for bit. Included by quantizer_conformance_test.cpp, which is compiled
// for several instruction sets.

#include "../test_util.hpp"
#include "backends.hpp"

namespace cq::test {


template <class Backend, element_type T>
void check_backend_against_reference(std::size_t n, std::size_t dim, std::size_t C, int bits, std::uint64_t seed) {
  CAPTURE(Backend::name);
  CAPTURE(n);
  CAPTURE(dim);
  CAPTURE(C);
  CAPTURE(bits);
  const Codebook cb = random_codebook(dim, C, bits, seed);
  // Inputs near the centroids' scale, plus exact copies of centroids (distance 0) for some rows.
  std::vector<T> x = convert<T>(random_normal(n * dim, seed + 1));
  for (std::size_t r = 0; r < n; r += 7)
    for (std::size_t g = 0; g < cb.groups(); ++g)
      for (std::size_t j = 0; j < C; ++j) x[r * dim + g * C + j] = from_float<T>(cb.centroid(g, (r * 13 + g) % cb.num_centroids(), j));
  ConstMatrixView<T> xv(x.data(), n, dim);

  PackedCodes ref(cb.groups(), bits, n), got(cb.groups(), bits, n);
  encode_rows<backend::Scalar>(cb.view(), xv, ref.view(), 0);
  encode_rows<Backend>(cb.view(), xv, got.view(), 0);
  std::size_t differing = 0;
  for (std::size_t r = 0; r < n; ++r)
    for (std::size_t g = 0; g < cb.groups(); ++g) {
      const std::uint32_t a = ref.get(r, g), b = got.get(r, g);
      REQUIRE(b < cb.num_centroids());
      if (a != b) {
        ++differing;
        REQUIRE(is_nearest(cb, x.data() + r * dim, g, b));
      }
    }
  // Each differing code was verified above to be an equally near centroid; dense codebooks (C = 1,
  // 4096 centroids on a line) have many such near-ties, so this bound is loose.
  CHECK(differing <= 2 + n * cb.groups() / 10);

  // Decode: bit-identical to the reference, from an unaligned first token too.
  std::vector<T> d_ref(n * dim), d_got(n * dim);
  Backend::decode(cb.view(), ref.view(), 0, MatrixView<T>(d_got.data(), n, dim));
  backend::Scalar::decode(cb.view(), ref.view(), 0, MatrixView<T>(d_ref.data(), n, dim));
  CHECK(d_ref == d_got);
  if (n > 3) {
    std::vector<T> part(2 * dim);
    Backend::decode(cb.view(), ref.view(), n - 3, MatrixView<T>(part.data(), 2, dim));
    CHECK(std::equal(part.begin(), part.end(), d_ref.begin() + static_cast<std::ptrdiff_t>((n - 3) * dim)));
  }
}

}  // namespace cq::test
