#include "test_util.hpp"

#include <set>

using namespace cq;

TEST_CASE("pack_chunk and unpack_chunk round-trip every width 1..16") {
  cq::detail::Rng rng(3);
  for (int bits = 1; bits <= 16; ++bits) {
    std::uint32_t codes[32], back[32];
    for (auto& c : codes) c = static_cast<std::uint32_t>(rng.below(1u << bits));
    std::vector<std::uint8_t> chunk(detail::chunk_bytes(bits) + 8, 0xAB);  // guard bytes after the chunk
    detail::pack_chunk(codes, bits, chunk.data());
    detail::unpack_chunk(chunk.data(), bits, back);
    for (int i = 0; i < 32; ++i) {
      CHECK(back[i] == codes[i]);
      CHECK(detail::read_code(chunk.data(), static_cast<unsigned>(i), bits) == codes[i]);
    }
    for (std::size_t i = detail::chunk_bytes(bits); i < chunk.size(); ++i) CHECK(chunk[i] == 0xAB);
  }
}

TEST_CASE("write_code touches only its own bits") {
  for (int bits = 1; bits <= 16; ++bits) {
    std::vector<std::uint8_t> chunk(detail::chunk_bytes(bits), 0);
    const std::uint32_t all_ones = (1u << bits) - 1u;
    for (unsigned i = 0; i < 32; ++i) detail::write_code(chunk.data(), i, bits, all_ones);
    for (unsigned i = 0; i < 32; i += 3) detail::write_code(chunk.data(), i, bits, 0);
    for (unsigned i = 0; i < 32; ++i) CHECK(detail::read_code(chunk.data(), i, bits) == (i % 3 == 0 ? 0u : all_ones));
  }
}

TEST_CASE("PackedCodes: append, get, unpack round-trip at odd sizes for every width") {
  cq::detail::Rng rng(5);
  for (int bits = 1; bits <= 16; ++bits) {
    for (std::size_t groups : {1u, 3u, 16u}) {
      for (std::size_t n : {1u, 31u, 33u, 95u}) {
        PackedCodes pc(groups, bits);
        std::vector<std::uint32_t> all;
        // Append in uneven pieces so chunks are filled partly, then completed.
        std::size_t done = 0;
        while (done < n) {
          const std::size_t piece = std::min<std::size_t>(n - done, 1 + rng.below(40));
          std::vector<std::uint32_t> codes(piece * groups);
          for (auto& c : codes) c = static_cast<std::uint32_t>(rng.below(1u << bits));
          pc.append(codes.data(), piece);
          all.insert(all.end(), codes.begin(), codes.end());
          done += piece;
        }
        REQUIRE(pc.size() == n);
        CHECK(pc.size_bytes() == (n + 31) / 32 * groups * 4 * bits);
        for (std::size_t t = 0; t < n; ++t)
          for (std::size_t g = 0; g < groups; ++g) REQUIRE(pc.get(t, g) == all[t * groups + g]);
        std::vector<std::uint32_t> back(n * groups);
        pc.unpack(0, n, back.data());
        CHECK(back == all);
        if (n > 5) {  // an unaligned window
          std::vector<std::uint32_t> part(3 * groups);
          pc.unpack(n - 4, 3, part.data());
          CHECK(std::equal(part.begin(), part.end(), all.begin() + static_cast<std::ptrdiff_t>((n - 4) * groups)));
        }
      }
    }
  }
}

TEST_CASE("PackedCodes: truncate then re-append equals never having appended") {
  for (int bits : {1, 4, 5, 8, 11, 16}) {
    cq::detail::Rng rng(static_cast<std::uint64_t>(bits));
    const std::size_t G = 5;
    std::vector<std::uint32_t> a(70 * G), b(20 * G);
    for (auto& c : a) c = static_cast<std::uint32_t>(rng.below(1u << bits));
    for (auto& c : b) c = static_cast<std::uint32_t>(rng.below(1u << bits));
    PackedCodes x(G, bits), y(G, bits);
    x.append(a.data(), 70);
    x.truncate(45);
    x.append(b.data(), 20);
    y.append(a.data(), 45);
    y.append(b.data(), 20);
    CHECK(x == y);
    x.truncate(0);
    CHECK(x.size() == 0);
    CHECK(x == PackedCodes(G, bits));
  }
}

TEST_CASE("PackedCodes: set overwrites one code; views share storage") {
  PackedCodes pc(4, 7, 40);
  pc.set(33, 2, 100);
  CHECK(pc.get(33, 2) == 100);
  CHECK(pc.get(33, 1) == 0);
  CHECK(pc.get(32, 2) == 0);
  PackedCodesView v = pc.view();
  v.set(0, 0, 127);
  CHECK(pc.get(0, 0) == 127);
  ConstPackedCodesView cv = v;
  CHECK(cv.get(33, 2) == 100);
}

TEST_CASE("PackedCodes: bad input throws and leaves the container unchanged") {
  CQ_CHECK_THROWS_CONTAINING(PackedCodes(4, 0), "bits must be in 1..16, got 0");
  CQ_CHECK_THROWS_CONTAINING(PackedCodes(4, 17), "got 17");
  CQ_CHECK_THROWS_CONTAINING(PackedCodes(0, 8), "groups must be >= 1");
  PackedCodes pc(2, 3);
  std::vector<std::uint32_t> ok{1, 2, 3, 4};
  pc.append(ok.data(), 2);
  const PackedCodes before = pc;
  std::vector<std::uint32_t> bad{1, 2, 3, 8};  // 8 does not fit in 3 bits
  CQ_CHECK_THROWS_CONTAINING(pc.append(bad.data(), 2), "code 8 at token 1, group 1 does not fit in 3 bits");
  CHECK(pc == before);
  CQ_CHECK_THROWS_CONTAINING(pc.set(0, 0, 9), "code 9 does not fit in 3 bits");
  CQ_CHECK_THROWS_CONTAINING(pc.get(2, 0), "(token 2, group 0) is outside 2 x 2");
  CQ_CHECK_THROWS_CONTAINING(pc.truncate(3), "3 exceeds size 2");
  CHECK(pc == before);
}
