// Property tests over random shapes and seeds: packing is lossless for every width 1..16 at odd
// sizes and through unaligned engine-owned views; encode/decode agree with the reference for any
// C (not only powers of two), element type, row stride and pointer alignment.
#include "conformance/quantizer_conformance.hpp"

using namespace cq;

TEST_CASE("property: packed codes round-trip through appends, sets, truncates and unaligned views") {
  cq::detail::Rng rng(2026);
  for (int trial = 0; trial < 300; ++trial) {
    const int bits = 1 + static_cast<int>(rng.below(16));
    const std::size_t groups = 1 + rng.below(20);
    const std::uint32_t limit = 1u << bits;
    CAPTURE(trial);
    CAPTURE(bits);
    CAPTURE(groups);
    PackedCodes pc(groups, bits);
    std::vector<std::uint32_t> ref;
    for (int step = 0; step < 6; ++step) {
      const std::size_t n = rng.below(90);
      std::vector<std::uint32_t> codes(n * groups);
      for (auto& c : codes) c = static_cast<std::uint32_t>(rng.below(limit));
      pc.append(codes.data(), n);
      ref.insert(ref.end(), codes.begin(), codes.end());
      if (pc.size() && rng.below(2)) {  // overwrite a random code
        const std::size_t t = rng.below(pc.size()), g = rng.below(groups);
        const auto c = static_cast<std::uint32_t>(rng.below(limit));
        pc.set(t, g, c);
        ref[t * groups + g] = c;
      }
      if (pc.size() && rng.below(3) == 0) {  // roll back
        const std::size_t keep = rng.below(pc.size() + 1);
        pc.truncate(keep);
        ref.resize(keep * groups);
      }
    }
    REQUIRE(pc.size() * groups == ref.size());
    std::vector<std::uint32_t> back(ref.size());
    pc.unpack(0, pc.size(), back.data());
    REQUIRE(back == ref);
    // The same bytes seen through a view at an odd address in engine-owned memory.
    std::vector<std::uint8_t> engine(pc.size_bytes() + 1, 0);
    std::copy(pc.data(), pc.data() + pc.size_bytes(), engine.begin() + 1);
    const ConstPackedCodesView v(engine.data() + 1, pc.size(), groups, bits);
    for (std::size_t i = 0; i < ref.size(); ++i) REQUIRE(v.get(i / groups, i % groups) == ref[i]);
  }
}

TEST_CASE("property: encode/decode match the reference for random shapes, strides and alignments") {
  cq::detail::Rng rng(77);
  for (int trial = 0; trial < 60; ++trial) {
    const std::size_t C = 1 + rng.below(8), G = 1 + rng.below(6), dim = C * G;
    const int bits = 1 + static_cast<int>(rng.below(10));
    const std::size_t rows = 1 + rng.below(70), stride = dim + rng.below(5), offset = rng.below(3);
    CAPTURE(trial);
    CAPTURE(C);
    CAPTURE(G);
    CAPTURE(bits);
    CAPTURE(rows);
    CAPTURE(stride);
    const Codebook cb = test::random_codebook(dim, C, bits, 1000 + static_cast<std::uint64_t>(trial));
    const auto raw = test::random_normal(offset + rows * stride, 2000 + static_cast<std::uint64_t>(trial));
    auto run = [&]<class T>() {
      const std::vector<T> buf = test::convert<T>(raw);
      const ConstMatrixView<T> x(buf.data() + offset, rows, dim, stride);  // strided, not 64-byte aligned
      const std::size_t first = rng.below(40);
      PackedCodes ref(G, bits, first + rows), got(G, bits, first + rows);
      encode_rows<backend::Scalar>(cb.view(), x, ref.view(), first);
      encode_rows<backend::Native>(cb.view(), x, got.view(), first);
      for (std::size_t r = 0; r < rows; ++r)
        for (std::size_t g = 0; g < G; ++g) {
          const std::uint32_t a = ref.get(first + r, g), b = got.get(first + r, g);
          if (a != b) {
            std::vector<T> row(x.row(r), x.row(r) + dim);
            REQUIRE(test::is_nearest(cb, row.data(), g, b));
          }
        }
      std::vector<T> d1(rows * (dim + 2)), d2(rows * (dim + 2));
      backend::Scalar::decode(cb.view(), got.view(), first, MatrixView<T>(d1.data(), rows, dim, dim + 2));
      backend::Native::decode(cb.view(), got.view(), first, MatrixView<T>(d2.data(), rows, dim, dim + 2));
      REQUIRE(d1 == d2);
    };
    run.template operator()<float>();
    run.template operator()<half>();
    run.template operator()<bfloat16>();
  }
}
