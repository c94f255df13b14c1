// Sizes formed from caller-supplied numbers: a product or sum that would wrap around throws
// cq::Error naming the quantity, before anything is allocated, read or written.
#include "test_util.hpp"

using namespace cq;

namespace {
constexpr std::size_t huge = SIZE_MAX / 4;  // fits, but times any factor >= 4 does not
}

TEST_CASE("checked size arithmetic names the quantity and its operands") {
  CHECK(detail::checked_mul(3, 5, "x") == 15);
  CHECK(detail::checked_mul(SIZE_MAX, 0, "x") == 0);
  CHECK(detail::checked_add(SIZE_MAX - 1, 1, "x") == SIZE_MAX);
  CHECK(detail::checked_limit(65535, 65535, "x") == 65535);
  CQ_CHECK_THROWS_CONTAINING(detail::checked_mul(huge, 8, "rows x cols"),
                             "rows x cols: 4611686018427387903 x 8 overflows std::size_t");
  CQ_CHECK_THROWS_CONTAINING(detail::checked_add(SIZE_MAX, 1, "first + rows"),
                             "first + rows: 18446744073709551615 + 1 overflows std::size_t");
  CQ_CHECK_THROWS_CONTAINING(detail::checked_limit(65536, 65535, "grid y"), "grid y = 65536 exceeds 65535");
}

TEST_CASE("one bits check: every quantizer and container rejects bits outside 1..16 alike") {
  for (int bits : {0, -3, 17}) {
    const std::string s = "bits must be in 1..16, got " + std::to_string(bits);
    const char* msg = s.c_str();
    CQ_CHECK_THROWS_CONTAINING(check_code_bits(bits, "x"), msg);
    CQ_CHECK_THROWS_CONTAINING(PackedCodes(4, bits), msg);
    CQ_CHECK_THROWS_CONTAINING(Codebook(16, 4, bits), msg);
    CQ_CHECK_THROWS_CONTAINING(packed_code_bytes(64, 4, bits), msg);
    CQ_CHECK_THROWS_CONTAINING(UniformQuantizer<>::keys(64, bits), msg);
    CQ_CHECK_THROWS_CONTAINING(check_cq_shape(16, 4, bits, "x"), msg);
  }
}

TEST_CASE("packed code sizes that overflow throw instead of wrapping") {
  // (tokens + 31) / 32 once wrapped to 0 bytes for the largest token counts.
  CQ_CHECK_THROWS_CONTAINING(packed_code_bytes(SIZE_MAX, 2, 8), "packed code bytes");
  CQ_CHECK_THROWS_CONTAINING(packed_code_bytes(huge, 64, 16), "overflows std::size_t");
  CHECK(packed_code_bytes(SIZE_MAX / 64, 1, 1) == (SIZE_MAX / 64 + 31) / 32 * 4);
  CQ_CHECK_THROWS_CONTAINING(PackedCodes(1u << 20, 16, huge), "overflows std::size_t");
  CQ_CHECK_THROWS_CONTAINING(ConstPackedCodesView(nullptr, huge, 64, 8).size_bytes(), "packed code bytes");

  PackedCodes pc(3, 8);
  const std::vector<std::uint32_t> one_token{1, 2, 3};
  pc.append(one_token.data(), 1);
  const PackedCodes before = pc;
  // The codes are never read: the count is refused first.
  CQ_CHECK_THROWS_CONTAINING(pc.append(one_token.data(), SIZE_MAX / 2), "PackedCodes::append: tokens x groups");
  CQ_CHECK_THROWS_CONTAINING(pc.reserve(SIZE_MAX), "packed code bytes");
  CQ_CHECK_THROWS_CONTAINING(pc.resize(SIZE_MAX), "packed code bytes");
  CHECK(pc == before);
}

TEST_CASE("aligned buffers and codebooks of sizes that overflow throw cq::Error") {
  CQ_CHECK_THROWS_CONTAINING(detail::AlignedBuffer<float>{SIZE_MAX / 2}, "AlignedBuffer: elements x element size");
  CQ_CHECK_THROWS_CONTAINING(detail::AlignedBuffer<std::uint8_t>{SIZE_MAX - 8}, "AlignedBuffer: bytes");
  detail::AlignedBuffer<double> b(3, 1.5);
  CQ_CHECK_THROWS_CONTAINING(b.reserve(SIZE_MAX / 4), "AlignedBuffer");
  CHECK(b.size() == 3);
  CHECK(b[2] == 1.5);
  CQ_CHECK_THROWS_CONTAINING(Codebook(SIZE_MAX / 1024, 1, 16), "Codebook: dim x 2^bits centroid floats");
}

TEST_CASE("encode and decode ranges whose end overflows are refused") {
  const std::size_t D = 8;
  const auto x = synthetic_kv(64, D, {.seed = 3});
  CoupledQuantizer<4, 4> q(D);
  q.fit(ConstMatrixView<float>(x.data(), 64, D));
  PackedCodes codes(2, 4, 10);
  const PackedCodes before = codes;
  // first + rows once wrapped to a small number that passed the bounds check.
  CQ_CHECK_THROWS_CONTAINING(q.encode(ConstMatrixView<float>(x.data(), 2, D), codes.view(), SIZE_MAX),
                             "encode: first + rows: 18446744073709551615 + 2 overflows");
  CHECK(codes == before);
  std::vector<float> out(2 * D);
  CQ_CHECK_THROWS_CONTAINING(q.decode(codes.view(), MatrixView<float>(out.data(), 2, D), SIZE_MAX - 1),
                             "decode: first + rows");
  CQ_CHECK_THROWS_CONTAINING(
      fisher_weights(ConstMatrixView<float>(x.data(), SIZE_MAX / 2, 4), 1), "fisher_weights: rows x groups");
}

TEST_CASE("k-means refuses centroid counts that are not 2^bits and caps that overflow") {
  const std::size_t n = 200, C = 2;
  const auto x = synthetic_kv(n, C, {.seed = 5});
  std::vector<float> out(64 * C);
  const ConstMatrixView<float> pts(x.data(), n, C);
  for (std::size_t K : {std::size_t{0}, std::size_t{1}, std::size_t{12}, std::size_t{1} << 17, SIZE_MAX})
    CQ_CHECK_THROWS_CONTAINING(kmeans<backend::Scalar>(pts, nullptr, K, {}, 0, out.data()),
                               "is not 2^bits for bits in 1..16");
  CQ_CHECK_THROWS_CONTAINING(kmeans<backend::Scalar>(ConstMatrixView<float>(x.data(), 10, C), nullptr, 16, {}, 0,
                                                     out.data()),
                             "kmeans: 10 points are fewer than the 16 centroids");
  // max_points_per_centroid x K once wrapped to 0 and left no training rows; a cap that large
  // means no subsampling.
  Codebook cb(C, C, 4);
  FitOptions o;
  o.iterations = 3;
  o.max_points_per_centroid = SIZE_MAX / 8 + 1;  // x 16 centroids = 2^65
  CHECK(fit_codebook(cb, pts, {}, o).rows_used == n);
}

TEST_CASE("bad indices, pointers and counts throw cq::Error, never std::length_error or a wild access") {
  const Codebook cb = test::random_codebook(16, 4, 3, 9);
  CQ_CHECK_THROWS_CONTAINING(cb.centroid(4, 0, 0),
                             "Codebook::centroid: (group 4, centroid 0, channel 0) is outside 4 x 8 x 4");
  CQ_CHECK_THROWS_CONTAINING(cb.centroid(0, 8, 0), "(group 0, centroid 8, channel 0)");
  CQ_CHECK_THROWS_CONTAINING(cb.centroid(0, 0, 4), "(group 0, centroid 0, channel 4)");
  CQ_CHECK_THROWS_CONTAINING(cb.group_data(4), "Codebook::group_data: group 4 out of range (groups = 4)");
  CQ_CHECK_THROWS_CONTAINING(cb.group(7), "Codebook::group: group 7 out of range (groups = 4)");
  Codebook copy = cb;
  CQ_CHECK_THROWS_CONTAINING(copy.set_group(1, nullptr), "Codebook::set_group: centroids is null");
  CQ_CHECK_THROWS_CONTAINING(copy.set_all(nullptr), "Codebook::set_all: centroids is null");
  CHECK(copy == cb);
  PackedCodes pc(2, 4, 3);
  CQ_CHECK_THROWS_CONTAINING(pc.append(nullptr, 3), "PackedCodes::append: codes is null for 3 tokens");
  CQ_CHECK_THROWS_CONTAINING(pc.unpack(0, 2, nullptr), "PackedCodes::unpack: codes is null for 2 tokens");
  CHECK(pc.size() == 3);
  // A thread count no vector can hold: std::length_error inside, cq::Error outside.
  CQ_CHECK_THROWS_CONTAINING(ThreadPool(SIZE_MAX), "ThreadPool(18446744073709551615): starting worker thread 1");
}
