// Property tests over random shapes and seeds: packing is lossless for every width 1..16 at odd
// sizes and through unaligned engine-owned views; encode/decode agree with the reference for any
// C (not only powers of two), element type, row stride and pointer alignment; every file writer
// in io/ produces files its reader returns unchanged (random names and metadata in any UTF-8,
// doubles at every extreme, shapes with zeros), and refuses what a reader would refuse.
#include "conformance/quantizer_conformance.hpp"

#include <bit>
#include <cstring>
#include <map>

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

// ---- Every writer in io/ round-trips through its own reader, for every input it accepts ----------

namespace {

// Random valid UTF-8 of 0..max_len code points: ASCII (quotes, backslashes and control characters
// included), then 2-, 3- and 4-byte sequences (surrogates excluded).
std::string random_utf8(cq::detail::Rng& rng, std::size_t max_len) {
  std::string s;
  const std::size_t n = rng.below(max_len + 1);
  for (std::size_t i = 0; i < n; ++i) {
    std::uint32_t cp = 0;
    switch (rng.below(6)) {
      case 0: cp = static_cast<std::uint32_t>(rng.below(0x20)); break;  // control characters
      case 1: cp = "\"\\/,.:{}[]"[rng.below(10)]; break;
      case 2: cp = 0x20 + static_cast<std::uint32_t>(rng.below(0x60)); break;
      case 3: cp = 0x80 + static_cast<std::uint32_t>(rng.below(0x780)); break;
      case 4:
        do cp = 0x800 + static_cast<std::uint32_t>(rng.below(0xF800));
        while (cp >= 0xD800 && cp <= 0xDFFF);
        break;
      default: cp = 0x10000 + static_cast<std::uint32_t>(rng.below(0x100000)); break;
    }
    io::json::append_utf8(s, cp);
  }
  return s;
}

// Bytes that are not UTF-8: a lone continuation byte, a truncated sequence, an overlong form, a
// surrogate or a code point past U+10FFFF, somewhere in valid text.
std::string random_non_utf8(cq::detail::Rng& rng) {
  static const char* const bad[] = {"\x80", "\xc3", "\xe2\x82", "\xc0\xaf", "\xed\xb0\x80", "\xf4\x90\x80\x80", "\xff"};
  const std::string s = random_utf8(rng, 3);
  return rng.below(2) ? bad[rng.below(7)] + s : s + bad[rng.below(7)];
}

double random_double(cq::detail::Rng& rng) {
  static const double special[] = {0.0, -0.0, std::numeric_limits<double>::denorm_min(),
                                   -std::numeric_limits<double>::denorm_min(), std::numeric_limits<double>::min(),
                                   std::numeric_limits<double>::max(), std::numeric_limits<double>::lowest(),
                                   std::numeric_limits<double>::infinity(), -std::numeric_limits<double>::infinity(),
                                   std::numeric_limits<double>::epsilon()};
  if (rng.below(3) == 0) return special[rng.below(10)];
  double d;
  do d = std::bit_cast<double>(rng.next());  // every exponent, denormals included
  while (std::isnan(d));
  return d;
}

std::vector<std::uint64_t> random_shape(cq::detail::Rng& rng) {
  std::vector<std::uint64_t> shape(rng.below(5));
  for (auto& d : shape) d = rng.below(6);  // zeros included
  return shape;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * 4) == 0);
}

}  // namespace

TEST_CASE("property: the safetensors writer's files read back as written, and what it refuses leaves it unchanged") {
  cq::detail::Rng rng(404);
  for (int trial = 0; trial < 150; ++trial) {
    CAPTURE(trial);
    io::SafetensorsWriter w;
    std::map<std::string, std::string> meta;
    std::map<std::string, std::pair<DType, std::vector<std::uint64_t>>> tensors;
    std::map<std::string, std::vector<std::uint8_t>> data;
    for (std::size_t i = rng.below(5); i-- > 0;) {
      std::string k = random_utf8(rng, 6), v = random_utf8(rng, 12);
      w.set_metadata(k, v);
      meta[k] = v;
    }
    for (std::size_t i = rng.below(6); i-- > 0;) {
      std::string name = random_utf8(rng, 8);
      if (name == "__metadata__" || tensors.count(name)) continue;
      const DType d = all_dtypes[rng.below(std::size(all_dtypes))];
      auto shape = random_shape(rng);
      shape.push_back(8);  // whole bytes for the sub-byte dtypes too
      std::uint64_t n = 1;
      for (auto x : shape) n *= x;
      std::vector<std::uint8_t> bytes(n * dtype_bits(d) / 8);
      for (auto& b : bytes) b = static_cast<std::uint8_t>(rng.below(256));
      w.add(name, d, shape, bytes.data(), bytes.size());
      tensors[name] = {d, shape};
      data[name] = bytes;
    }
    const auto file = w.bytes();
    // Inputs a reader would refuse are refused, and change nothing.
    const float one = 1.0f;
    CHECK_THROWS_AS(w.set_metadata(random_non_utf8(rng), "v"), Error);
    CHECK_THROWS_AS(w.set_metadata("k", random_non_utf8(rng)), Error);
    CHECK_THROWS_AS(w.add_f32(random_non_utf8(rng), {1}, &one), Error);
    CHECK_THROWS_AS(w.add_f32("__metadata__", {1}, &one), Error);
    if (!tensors.empty()) CHECK_THROWS_AS(w.add_f32(tensors.begin()->first, {1}, &one), Error);
    REQUIRE(w.bytes() == file);
    auto r = io::SafetensorsReader::from_memory(file);
    CHECK(r.metadata() == meta);
    REQUIRE(r.tensors().size() == tensors.size());
    for (const auto& [name, info] : tensors) {
      const io::TensorInfo& t = r.get(name);
      CHECK(t.dtype == info.first);
      CHECK(t.shape == info.second);
      CHECK(r.read_bytes(t) == data[name]);
    }
  }
}

TEST_CASE("property: codebook files (F32 and F16) and KV codebook files load back as the set that was saved") {
  cq::detail::Rng rng(505);
  for (int trial = 0; trial < 40; ++trial) {
    CAPTURE(trial);
    const auto storage = rng.below(2) ? io::CodebookStorage::f16 : io::CodebookStorage::f32;
    io::CodebookSet set;
    for (std::size_t i = rng.below(4); i-- > 0;) {
      const std::string k = random_utf8(rng, 6);
      if (k != "format" && k != "cq_version" && k != "names") set.metadata[k] = random_utf8(rng, 10);
    }
    // A KV layout filled by the set (or, half the time, ordinary names).
    const bool kv = rng.below(2);
    const std::size_t layers = 1 + rng.below(3), heads = 1 + rng.below(3), C = 1 + rng.below(4);
    const std::size_t dim = C * (1 + rng.below(3));
    std::vector<std::string> names;
    for (std::size_t l = 0; l < (kv ? layers : 1); ++l)
      for (bool value : {false, true}) {
        const int bits = 1 + static_cast<int>(rng.below(5));
        for (std::size_t h = 0; h < (kv ? heads : 1 + rng.below(2)); ++h) {
          std::string name = kv ? io::kv_codebook_name(l, value, h) : random_utf8(rng, 5);
          if (name.empty() || name.find(',') != std::string::npos || set.find(name)) continue;
          Codebook cb = test::random_codebook(dim, C, bits, rng.below(1000));
          cb.info() = FitInfo{random_utf8(rng, 6), random_utf8(rng, 4), random_utf8(rng, 4),
                              static_cast<std::uint32_t>(rng.below(1u << 31)) * 2u, rng.below(1ull << 62) * 3,
                              rng.below(1ull << 62) * 4, random_double(rng)};
          set.add(name, cb);
          names.push_back(name);
        }
      }
    if (kv) {
      io::set_kv_layout(set, layers, heads, dim);
      io::set_kv_key_rope(set, KeyRope::post, {}, dim);
    }
    const auto back = io::load_codebooks(io::SafetensorsReader::from_memory(io::codebook_file_bytes(set, storage)));
    CHECK(back.metadata == set.metadata);
    REQUIRE(back.size() == set.size());
    for (std::size_t i = 0; i < set.size(); ++i) {
      const std::string& name = set.entries()[i].first;
      const Codebook& cb = set.entries()[i].second;
      CAPTURE(name);
      CHECK(back.entries()[i].first == name);
      const Codebook& got = back.entries()[i].second;
      CHECK(got == io::stored_codebook(cb, storage, name));
      const FitInfo &a = cb.info(), &b = got.info();
      CHECK(b.method == (a.method == "none" ? "unknown" : a.method));
      CHECK(b.init == a.init);
      CHECK(b.dtype == a.dtype);
      CHECK(b.iterations == a.iterations);
      CHECK(b.calibration_rows == a.calibration_rows);
      CHECK(b.seed == a.seed);
      CHECK(std::bit_cast<std::uint64_t>(b.objective) == std::bit_cast<std::uint64_t>(a.objective));
    }
    if (kv) {
      KVCacheConfig cfg = io::kv_cache_config(back);
      cfg.window = 1;
      KVCache<float> cache(cfg);
      io::load_kv_codebooks(cache, back);
      for (std::size_t l = 0; l < layers; ++l) CHECK(cache.has_codebooks(l));
    }
    // A key the file records itself is refused rather than silently replaced.
    io::CodebookSet clash = set;
    clash.metadata[names.empty() ? "names" : names[rng.below(names.size())] + ".seed"] = "7";
    CHECK_THROWS_AS(io::codebook_file_bytes(clash, storage), Error);
  }
}

TEST_CASE("property: .npy files written as float32 read back bit-exactly, zero-sized axes included") {
  cq::detail::Rng rng(606);
  for (int trial = 0; trial < 200; ++trial) {
    CAPTURE(trial);
    auto shape = random_shape(rng);
    std::uint64_t n = 1;
    for (auto d : shape) n *= d;
    std::vector<float> v(n);
    for (auto& x : v) x = static_cast<float>(random_double(rng)) * (rng.below(2) ? 1.0f : 1e-39f);  // denormals too
    const io::NpyArray a = io::parse_npy(io::npy_bytes_f32(shape, v.data()));
    CHECK(a.shape == shape);
    CHECK(a.dtype == DType::f32);
    CHECK(same_bits(io::npy_floats(a, "a"), v));
  }
}
