#include "test_util.hpp"

#include <algorithm>
#include <bit>
#include <cstring>
#include <filesystem>
#include <fstream>

using namespace cq;
namespace fs = std::filesystem;

namespace {

// A safetensors file from a literal JSON header and `data_bytes` bytes of data.
std::vector<std::uint8_t> st_file(const std::string& header, std::size_t data_bytes, std::uint64_t claimed_len = 0) {
  std::vector<std::uint8_t> out(8 + header.size() + data_bytes, 0);
  const std::uint64_t n = claimed_len ? claimed_len : header.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<std::uint8_t>(n >> (8 * i));
  std::copy(header.begin(), header.end(), out.begin() + 8);
  return out;
}

fs::path temp_path(const std::string& name) { return fs::temp_directory_path() / ("cq_io_test_" + name); }

Codebook fitted_codebook(std::size_t D, std::size_t C, int bits) {
  const auto x = synthetic_kv(600, D, {.seed = 9});
  Codebook cb(D, C, bits);
  FitOptions o;
  o.iterations = 5;
  fit_codebook(cb, ConstMatrixView<float>(x.data(), 600, D), {}, o);
  return cb;
}

}  // namespace

TEST_CASE("json: parses what safetensors headers hold and rejects malformed text") {
  const auto v = io::json::parse(R"({"a": [1, 2.5, -3], "b": {"c": "x\"\u00e9\ud83d\ude00"}, "t": true, "n": null})");
  REQUIRE(v.kind == io::json::Value::Kind::object);
  CHECK(v.find("a")->items[0].is_uint);
  CHECK(v.find("a")->items[0].uint == 1);
  CHECK(!v.find("a")->items[1].is_uint);
  CHECK(!v.find("a")->items[2].is_uint);
  CHECK(v.find("b")->find("c")->string == "x\"\xc3\xa9\xf0\x9f\x98\x80");
  for (const char* bad : {"", "{", "{\"a\":}", "[1,]", "{\"a\":1,\"a\":2}", "\"\\x\"", "01", "1.", "[1] x", "\"\\ud800\"",
                          "{\"a\" 1}", "tru", "\"abc", "\"\x01\""})
    CHECK_THROWS_AS(io::json::parse(bad), Error);
  std::string deep(100, '[');
  CQ_CHECK_THROWS_CONTAINING(io::json::parse(deep), "nesting too deep");
  std::string s;
  io::json::write_string(s, "q\"\\\n\x01");
  CHECK(io::json::parse(s).string == "q\"\\\n\x01");
}

TEST_CASE("safetensors: writer output reads back with every dtype") {
  io::SafetensorsWriter w;
  w.set_metadata("k", "v");
  const std::vector<float> f{1.5f, -2.25f, 3.0f, 0.0f, 5.0f, 6.0f};
  w.add_f32("f", {2, 3}, f.data());
  w.add_f16("h", {6}, f.data());
  const std::vector<std::int32_t> ints{7, -8};
  w.add("i", DType::i32, {2}, ints.data(), 8);
  w.add("empty", DType::f32, {0, 4}, nullptr, 0);
  auto r = io::SafetensorsReader::from_memory(w.bytes());
  CHECK(r.metadata().at("k") == "v");
  CHECK(r.read_floats("f") == f);
  CHECK(r.read_floats("h") == f);  // all exactly representable in fp16
  CHECK(r.get("f").shape == std::vector<std::uint64_t>{2, 3});
  CHECK(r.get("empty").numel() == 0);
  CHECK(r.read_floats("empty").empty());  // regression: memcpy of zero bytes from null (found by fuzzing)
  CQ_CHECK_THROWS_CONTAINING(r.read_floats("i"), "dtype I32, expected a float type");
  CQ_CHECK_THROWS_CONTAINING(r.get("nope"), "no tensor named 'nope'");
  CQ_CHECK_THROWS_CONTAINING(w.add_f32("f", {1}, f.data()), "added twice");
}

TEST_CASE("safetensors: hostile headers are rejected with a message naming the problem") {
  auto reject = [](std::vector<std::uint8_t> bytes, const char* needle) {
    CQ_CHECK_THROWS_CONTAINING(io::SafetensorsReader::from_memory(std::move(bytes), "bad.st"), needle);
  };
  reject({1, 2, 3}, "too short for a safetensors header");
  reject(st_file("{}", 0, 1000), "runs past the end");
  reject(st_file("{}", 0, 200'000'000), "exceeds the 100000000-byte limit");
  reject(st_file("{\"a\":", 0), "malformed header");
  reject(st_file("[1]", 0), "not a JSON object");
  reject(st_file(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 4), "past the end of the 4-byte data section");
  reject(st_file(R"({"t":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8), "holds 8 bytes but dtype F32 and its shape need 12");
  reject(st_file(R"({"t":{"dtype":"Q4","shape":[2],"data_offsets":[0,8]}})", 8), "unknown dtype 'Q4'");
  reject(st_file(R"({"t":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", 8), "not a non-negative integer");
  reject(st_file(R"({"t":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}})", 8), "shape product overflows");
  reject(st_file(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}})", 8), "are reversed");
  reject(st_file(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0]}})", 8), "needs data_offsets");
  reject(st_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", 8),
         "overlap");
  reject(st_file(R"({"__metadata__":{"x":1}})", 0), "metadata value of 'x' is not a string");
  reject(st_file(R"({"t":{"shape":[2],"data_offsets":[0,8]}})", 8), "has no dtype string");
}

TEST_CASE("codebook files round-trip bit-exactly, with their metadata") {
  const Codebook cb = fitted_codebook(16, 4, 5);
  const fs::path p = temp_path("roundtrip.safetensors");
  io::save_codebook(p, cb);
  CHECK(!fs::exists(fs::path(p.string() + ".tmp")));
  const Codebook back = io::load_codebook(p);
  CHECK(back == cb);
  CHECK(back.info().method == "kmeans");
  CHECK(back.info().iterations == cb.info().iterations);
  CHECK(back.info().calibration_rows == 600);
  CHECK(back.info().objective == cb.info().objective);  // written as the shortest text that reads back exactly
  CHECK(back.info().seed == cb.info().seed);
  // It is a plain safetensors file another reader can open.
  auto r = io::SafetensorsReader::open(p);
  CHECK(r.meta("format") == "cq-codebooks");
  CHECK(r.meta("cq_version") == CQ_VERSION_STRING);
  CHECK(r.meta("codebook.bits") == "5");
  CHECK(r.get("codebook.centroids").shape == std::vector<std::uint64_t>{4, 32, 4});
  // Quantizers built from the loaded file encode identically.
  const auto x = synthetic_kv(100, 16, {.seed = 10});
  CoupledQuantizer<4, 5> a(cb), b(back);
  CHECK(a.encode(ConstMatrixView<float>(x.data(), 100, 16)) == b.encode(ConstMatrixView<float>(x.data(), 100, 16)));
  // Compact (F16) storage rounds each centroid to fp16.
  io::save_codebook(p, cb, io::CodebookStorage::f16);
  const Codebook h = io::load_codebook(p);
  for (std::size_t i = 0; i < cb.size(); ++i) CHECK(h.data()[i] == static_cast<float>(half(cb.data()[i])));
  fs::remove(p);
}

TEST_CASE("codebook files: several named codebooks and file-wide metadata") {
  io::CodebookSet set;
  set.metadata["model"] = "toy";
  set.add("layer.0.k", fitted_codebook(8, 2, 3));
  set.add("layer.0.v", fitted_codebook(8, 4, 4));
  const auto back = io::load_codebooks(io::SafetensorsReader::from_memory(io::codebook_file_bytes(set)));
  REQUIRE(back.size() == 2);
  CHECK(back.entries()[1].first == "layer.0.v");
  CHECK(*back.find("layer.0.k") == set.entries()[0].second);
  CHECK(back.metadata == set.metadata);  // the file's own keys (format, names, ...) are not the caller's
}

TEST_CASE("fuzzer findings stay fixed") {
  // cq_fuzz_safetensors, 2026-11-29: a codebook file whose tensor list holds an empty F32 tensor
  // made read_floats call memcpy with null pointers (undefined even for zero bytes).
  io::SafetensorsWriter w;
  w.set_metadata("format", "cq-codebooks");
  w.set_metadata("names", "codebook");
  w.add("codebook.centroids", DType::f32, {0, 256, 8}, nullptr, 0);
  w.add("other", DType::f32, {0}, nullptr, 0);
  auto r = io::SafetensorsReader::from_memory(w.bytes());
  for (const auto& t : r.tensors()) CHECK(r.read_floats(t).empty());
  CHECK_THROWS_AS(io::load_codebooks(r), Error);  // metadata missing: refused, no UB on the way
  Codebook empty;
  empty.set_all(nullptr);  // an empty codebook copies nothing
  CHECK(empty.size() == 0);
}

TEST_CASE("codebook files: truncated, lying or inconsistent files throw") {
  const Codebook cb = fitted_codebook(16, 4, 5);
  io::CodebookSet set;
  set.add("codebook", cb);
  const std::vector<std::uint8_t> good = io::codebook_file_bytes(set);
  auto load_bytes = [](std::vector<std::uint8_t> b) {
    auto r = io::SafetensorsReader::from_memory(std::move(b), "cb.st");
    return io::load_codebooks(r);
  };
  // Truncated anywhere: the header or the data.
  for (std::size_t cut : {std::size_t{4}, std::size_t{20}, good.size() / 2, good.size() - 1}) {
    CAPTURE(cut);
    CHECK_THROWS_AS(load_bytes(std::vector<std::uint8_t>(good.begin(), good.begin() + static_cast<std::ptrdiff_t>(cut))), Error);
  }
  // Metadata that disagrees with the tensor, or is not a number.
  auto patched = [&](const std::string& key, const std::string& value) {
    auto r = io::SafetensorsReader::from_memory(good);
    io::SafetensorsWriter w;
    for (const auto& [k, v] : r.metadata()) w.set_metadata(k, k == key ? value : v);
    const auto c = r.read_floats("codebook.centroids");
    w.add_f32("codebook.centroids", {4, 32, 4}, c.data());
    return w.bytes();
  };
  CQ_CHECK_THROWS_CONTAINING(load_bytes(patched("codebook.bits", "6")), "does not match (groups, centroids, channels) = (4, 64, 4)");
  CQ_CHECK_THROWS_CONTAINING(load_bytes(patched("codebook.bits", "17")), "codebook 'codebook': bits must be in 1..16, got 17");
  CQ_CHECK_THROWS_CONTAINING(load_bytes(patched("codebook.channels", "3")), "dim 16 is not a multiple of channels per group 3");
  CQ_CHECK_THROWS_CONTAINING(load_bytes(patched("codebook.dim", "abc")), "'codebook.dim' = 'abc' is not an integer");
  CQ_CHECK_THROWS_CONTAINING(load_bytes(patched("format", "other")), "not a cq codebook file (format = 'other'");
  CQ_CHECK_THROWS_CONTAINING(load_bytes(patched("names", "codebook,ghost")), "metadata key 'ghost.channels' is missing");
  // A non-finite centroid.
  {
    io::SafetensorsWriter w;
    auto r = io::SafetensorsReader::from_memory(good);
    for (const auto& [k, v] : r.metadata()) w.set_metadata(k, v);
    auto c = r.read_floats("codebook.centroids");
    c[17] = std::numeric_limits<float>::infinity();
    w.add_f32("codebook.centroids", {4, 32, 4}, c.data());
    CQ_CHECK_THROWS_CONTAINING(load_bytes(w.bytes()), "value 17 is not finite");
  }
  // A wrong dtype for the centroids.
  {
    io::SafetensorsWriter w;
    auto r = io::SafetensorsReader::from_memory(good);
    for (const auto& [k, v] : r.metadata()) w.set_metadata(k, v);
    std::vector<std::int32_t> ints(4 * 32 * 4, 1);
    w.add("codebook.centroids", DType::i32, {4, 32, 4}, ints.data(), ints.size() * 4);
    CQ_CHECK_THROWS_CONTAINING(load_bytes(w.bytes()), "has dtype I32, expected F32, F16 or BF16");
  }
  CQ_CHECK_THROWS_CONTAINING(io::load_codebook(temp_path("does_not_exist")), "cannot read file");
}

// ---- Files cq writes must be files cq reads -------------------------------------------------------

namespace {

// 600 rows of synthetic KV data whose channel 3 sits in [-99999, -99993]: fine in F32, beyond fp16.
std::vector<float> rows_with_a_huge_channel() {
  auto x = synthetic_kv(600, 16, {.seed = 4});
  for (std::size_t r = 0; r < 600; ++r) x[r * 16 + 3] = -99999.0f + float(r % 7);
  return x;
}

std::vector<std::string> files_in(const fs::path& dir) {
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(dir)) names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

fs::path fresh_dir(const std::string& name) {
  const fs::path d = temp_path(name);
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

}  // namespace

TEST_CASE("codebook files: F16 storage refuses centroids beyond fp16's range instead of writing an unloadable file") {
  const auto x = rows_with_a_huge_channel();
  Codebook cb(16, 4, 4);
  fit_codebook(cb, ConstMatrixView<float>(x.data(), 600, 16), {}, {});
  const fs::path dir = fresh_dir("f16_range");
  const fs::path p = dir / "cb.safetensors";
  // Group 0 holds channel 3: value 3 (centroid 0, channel 3) is about -1e5.
  CQ_CHECK_THROWS_CONTAINING(io::save_codebook(p, cb, io::CodebookStorage::f16),
                             "save_codebooks: codebook 'codebook': value 3 = -999");
  CQ_CHECK_THROWS_CONTAINING(io::save_codebook(p, cb, io::CodebookStorage::f16), "beyond the F16 range");
  CHECK(files_in(dir).empty());  // nothing written, no temporary left
  CQ_CHECK_THROWS_CONTAINING(io::stored_codebook(cb, io::CodebookStorage::f16, "k"), "codebook 'k': value 3 = -999");
  io::save_codebook(p, cb);  // F32 holds it
  CHECK(io::load_codebook(p) == cb);
  // In range: what stored_codebook predicts is exactly what a load returns.
  const Codebook small = fitted_codebook(16, 4, 4);
  io::save_codebook(p, small, io::CodebookStorage::f16);
  const Codebook loaded = io::load_codebook(p);
  CHECK(loaded == io::stored_codebook(small, io::CodebookStorage::f16, "codebook"));
  CHECK(!(loaded == small));  // rounding happened
  io::SafetensorsWriter w;
  const std::vector<float> v{1.0f, 70000.0f};
  CQ_CHECK_THROWS_CONTAINING(w.add_f16("t", {2}, v.data()), "tensor 't': value 1 = 70000 is beyond the F16 range");
  fs::remove_all(dir);
}

TEST_CASE("safetensors writer: refuses what readers refuse, and leaves itself unchanged") {
  io::SafetensorsWriter w;
  const float one = 1.0f;
  w.add_f32("kept", {1}, &one);
  const auto before = w.bytes();
  CQ_CHECK_THROWS_CONTAINING(w.add_f32("__metadata__", {1}, &one), "cannot be named '__metadata__'");
  CQ_CHECK_THROWS_CONTAINING(w.add_f32("bad\xff", {1}, &one), "tensor name 'bad\xff' is not valid UTF-8");
  CQ_CHECK_THROWS_CONTAINING(w.add_f32("\xc0\x80", {1}, &one), "not valid UTF-8");  // overlong NUL
  CQ_CHECK_THROWS_CONTAINING(w.add_f32("\xed\xa0\x80", {1}, &one), "not valid UTF-8");  // a surrogate
  CQ_CHECK_THROWS_CONTAINING(w.set_metadata("k\xfe", "v"), "metadata key 'k\xfe' is not valid UTF-8");
  CQ_CHECK_THROWS_CONTAINING(w.set_metadata("k", "\xf4\x90\x80\x80"), "metadata value of 'k' is not valid UTF-8");
  CQ_CHECK_THROWS_CONTAINING(w.add_f32("kept", {1}, &one), "added twice");
  // A shape whose size wraps 64 bits must not pass for an empty tensor.
  CQ_CHECK_THROWS_CONTAINING(w.add_f32("wrap", {std::uint64_t{1} << 62, 8}, nullptr), "'wrap': shape product overflows");
  CQ_CHECK_THROWS_CONTAINING(w.add("wrap", DType::f32, {std::uint64_t{1} << 62, 4}, nullptr, 0), "shape product overflows");
  CQ_CHECK_THROWS_CONTAINING(w.add_f16("wrap", {std::uint64_t{1} << 63, 2}, nullptr), "shape product overflows");
  CQ_CHECK_THROWS_CONTAINING(w.add("half_byte", DType::f4, {3}, "ab", 2), "3 elements of F4 are 12 bits, not whole bytes");
  CHECK(w.bytes() == before);
  // Valid UTF-8 of every length, quotes, backslashes and control characters are fine.
  w.set_metadata("k\"\\\x01\n", "\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80");
  w.add_f32("\x7f\"\t\xf4\x8f\xbf\xbf", {1}, &one);
  auto r = io::SafetensorsReader::from_memory(w.bytes());
  CHECK(r.metadata().at("k\"\\\x01\n") == "\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80");
  CHECK(r.read_floats("\x7f\"\t\xf4\x8f\xbf\xbf") == std::vector<float>{1.0f});
}

TEST_CASE("safetensors writer: refuses a header past the 100 MB readers accept") {
  io::SafetensorsWriter w;
  w.set_metadata("big", std::string(io::max_safetensors_header, 'a'));
  CQ_CHECK_THROWS_CONTAINING((void)w.bytes(), "past the 100000000-byte limit readers accept");
}

TEST_CASE("codebook files: names and metadata the file records itself are refused, not overwritten") {
  const Codebook cb = fitted_codebook(8, 2, 3);
  io::CodebookSet set;
  set.add("a", cb);
  CQ_CHECK_THROWS_CONTAINING(set.add("a", cb), "codebook 'a' added twice");
  CQ_CHECK_THROWS_CONTAINING(set.add("a,b", cb), "must be non-empty and contain no comma");
  CQ_CHECK_THROWS_CONTAINING(set.add("", cb), "must be non-empty");
  CHECK(set.size() == 1);
  for (const char* key : {"format", "cq_version", "names", "a.bits", "a.objective", "a.method"}) {
    CAPTURE(key);
    io::CodebookSet s = set;
    s.metadata[key] = "mine";
    CQ_CHECK_THROWS_CONTAINING(io::codebook_file_bytes(s), "is one the codebook file records itself");
  }
  io::CodebookSet empty;  // written with names = "": reads back as an empty set
  empty.metadata["model"] = "none yet";
  const auto none = io::load_codebooks(io::SafetensorsReader::from_memory(io::codebook_file_bytes(empty)));
  CHECK(none.size() == 0);
  CHECK(none.metadata == empty.metadata);
  set.metadata["b.bits"] = "not a codebook of this set";  // an ordinary key
  set.metadata["a.note"] = "not a field";
  const auto back = io::load_codebooks(io::SafetensorsReader::from_memory(io::codebook_file_bytes(set)));
  CHECK(back.metadata == set.metadata);
  // A file listing a codebook twice is refused by name (a writer never makes one).
  io::SafetensorsWriter w;
  auto r = io::SafetensorsReader::from_memory(io::codebook_file_bytes(set));
  for (const auto& [k, v] : r.metadata()) w.set_metadata(k, k == "names" ? "a,a" : v);
  const auto c = r.read_floats("a.centroids");
  w.add_f32("a.centroids", r.get("a.centroids").shape, c.data());
  CQ_CHECK_THROWS_CONTAINING(io::load_codebooks(io::SafetensorsReader::from_memory(w.bytes(), "twice.st")),
                             "twice.st: the file lists codebook 'a' twice");
}

TEST_CASE("codebook files: a codebook wider than the old 2^20-channel limit round-trips") {
  const std::size_t C = (std::size_t{1} << 20) + 1;
  Codebook cb(C, C, 1);
  cb.set_all(test::random_normal(cb.size(), 3).data());
  io::CodebookSet set;
  set.add("wide", cb);
  const auto back = io::load_codebooks(io::SafetensorsReader::from_memory(io::codebook_file_bytes(set)));
  CHECK(*back.find("wide") == cb);
}

TEST_CASE("codebook files: the objective's text reads back bit-exactly, extremes included") {
  const double values[] = {0.0, -0.0, std::numeric_limits<double>::denorm_min(), std::numeric_limits<double>::min(),
                           std::numeric_limits<double>::max(), std::numeric_limits<double>::lowest(), 0.1, 1.0 / 3.0,
                           -std::numeric_limits<double>::infinity(), std::numeric_limits<double>::infinity()};
  for (double v : values) {
    CAPTURE(v);
    Codebook cb = fitted_codebook(8, 2, 2);
    cb.info().objective = v;
    io::CodebookSet set;
    set.add("c", cb);
    const auto back = io::load_codebooks(io::SafetensorsReader::from_memory(io::codebook_file_bytes(set)));
    CHECK(std::bit_cast<std::uint64_t>(back.find("c")->info().objective) == std::bit_cast<std::uint64_t>(v));
  }
  Codebook cb = fitted_codebook(8, 2, 2);
  cb.info().objective = std::numeric_limits<double>::quiet_NaN();
  io::CodebookSet set;
  set.add("c", cb);
  CHECK(std::isnan(io::load_codebooks(io::SafetensorsReader::from_memory(io::codebook_file_bytes(set)))
                       .find("c")->info().objective));
}

TEST_CASE("KV codebook files: set_kv_layout refuses a layout the set does not fill") {
  const Codebook cb = fitted_codebook(8, 2, 3), other = fitted_codebook(8, 4, 3);
  io::CodebookSet set;
  set.add(io::kv_codebook_name(0, false, 0), cb);
  set.add(io::kv_codebook_name(0, true, 0), cb);
  CQ_CHECK_THROWS_CONTAINING(io::set_kv_layout(set, 0, 1, 8), "layers (0), kv_heads (1) and head_dim (8) must be >= 1");
  CQ_CHECK_THROWS_CONTAINING(io::set_kv_layout(set, 1, 0, 8), "kv_heads (0)");
  CQ_CHECK_THROWS_CONTAINING(io::set_kv_layout(set, 1, 1, 0), "head_dim (0)");
  CQ_CHECK_THROWS_CONTAINING(io::set_kv_layout(set, 2, 1, 8), "codebook 'layer.1.k.head.0' is missing");
  CQ_CHECK_THROWS_CONTAINING(io::set_kv_layout(set, 1, 1, 16), "'layer.0.k.head.0' has dim 8 but head_dim is 16");
  CHECK(set.metadata.empty());  // unchanged
  set.add(io::kv_codebook_name(0, false, 1), other);
  set.add(io::kv_codebook_name(0, true, 1), cb);
  CQ_CHECK_THROWS_CONTAINING(io::set_kv_layout(set, 1, 2, 8), "'layer.0.k.head.1' is 4c3b but head 0 of layer 0 is 2c3b");
  io::set_kv_layout(set, 1, 1, 8);  // head 1 is extra: the one-head layout is complete
  io::set_kv_key_rope(set, KeyRope::post, {}, 8);
  const auto back = io::load_codebooks(io::SafetensorsReader::from_memory(io::codebook_file_bytes(set)));
  KVCache<float> cache(io::kv_cache_config(back));
  io::load_kv_codebooks(cache, back);
  CHECK(cache.has_codebooks(0));
}

TEST_CASE("npy writer: shapes the reader once refused, and sizes that wrap, are handled") {
  // Rank 40, and a rank so high the header needs format version 2.0 (over 64 KiB).
  for (std::size_t rank : {std::size_t{40}, std::size_t{25000}}) {
    CAPTURE(rank);
    std::vector<std::uint64_t> shape(rank, 1);
    shape[0] = 3;
    const float v[3] = {1.5f, -0.0f, std::numeric_limits<float>::denorm_min()};
    const auto bytes = io::npy_bytes_f32(shape, v);
    CHECK(bytes[6] == (rank > 10000 ? 2 : 1));
    const io::NpyArray a = io::parse_npy(bytes);
    CHECK(a.shape == shape);
    const auto f = io::npy_floats(a, "a");
    CHECK(std::memcmp(f.data(), v, sizeof v) == 0);
  }
  CQ_CHECK_THROWS_CONTAINING(io::npy_bytes_f32({std::uint64_t{1} << 62, 8}, nullptr), "shape product overflows");
}

// ---- Valid files are read --------------------------------------------------------------------------

TEST_CASE("safetensors: every dtype the format defines opens, with its size checked") {
  io::SafetensorsWriter w;
  const std::vector<std::uint8_t> zeros(64, 0);
  for (DType d : all_dtypes) w.add(std::string(dtype_name(d)), d, {8}, zeros.data(), dtype_bits(d));
  auto r = io::SafetensorsReader::from_memory(w.bytes());
  REQUIRE(r.tensors().size() == std::size(all_dtypes));
  for (DType d : all_dtypes) {
    CAPTURE(dtype_name(d));
    const io::TensorInfo& t = r.get(dtype_name(d));
    CHECK(t.dtype == d);
    CHECK(t.end - t.begin == dtype_bits(d));
    const std::string name(dtype_name(d));
    if (d == DType::f32 || d == DType::f16 || d == DType::bf16 || d == DType::f64)
      CHECK(r.read_floats(t) == std::vector<float>(8, 0.0f));
    else
      CQ_CHECK_THROWS_CONTAINING(r.read_floats(t), ("tensor '" + name + "' has dtype " + name + ", expected a float type").c_str());
    // One byte more than its dtype and shape need: refused, naming both.
    const std::string one = R"({"t":{"dtype":")" + name + R"(","shape":[8],"data_offsets":[0,)" +
                            std::to_string(dtype_bits(d) + 1) + "]}}";
    const std::string need = "dtype " + name + " and its shape need " + std::to_string(dtype_bits(d));
    CQ_CHECK_THROWS_CONTAINING(io::SafetensorsReader::from_memory(st_file(one, 80)), need.c_str());
  }
  CQ_CHECK_THROWS_CONTAINING(
      io::SafetensorsReader::from_memory(st_file(R"({"t":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}})", 2)),
      "3 elements of F4 are 12 bits, not whole bytes");
  CHECK(io::parse_dtype("F8_E4M3") == DType::f8_e4m3);
  CHECK(io::parse_dtype("f32") == std::nullopt);  // names are case-sensitive, as in the format
}

TEST_CASE("safetensors: an F8_E4M3 scale beside F32 tensors, and a rank above 8, are read") {
  const std::string header =
      R"({"k":{"dtype":"F32","shape":[1,1,1,1,1,1,1,1,1,2],"data_offsets":[0,8]},"k_scale":{"dtype":"F8_E4M3","shape":[1],"data_offsets":[8,9]}})";
  auto bytes = st_file(header, 9);
  const float k[2] = {0.5f, -2.0f};
  std::memcpy(bytes.data() + 8 + header.size(), k, 8);
  auto r = io::SafetensorsReader::from_memory(bytes);
  CHECK(r.read_floats("k") == std::vector<float>{0.5f, -2.0f});
  CHECK(r.get("k").shape.size() == 10);
  CQ_CHECK_THROWS_CONTAINING(r.read_floats("k_scale"), "tensor 'k_scale' has dtype F8_E4M3, expected a float type");
}

namespace {

// A .npy file of format `version` from a header dict and raw data (padded as numpy pads).
std::vector<std::uint8_t> npy_file(const std::string& dict, const std::vector<std::uint8_t>& data, int version = 1) {
  const std::size_t prefix = version == 1 ? 10 : 12;
  std::string h = dict;
  while ((prefix + h.size() + 1) % 64 != 0) h += ' ';
  h += '\n';
  std::string file = std::string("\x93NUMPY", 6) + static_cast<char>(version) + '\0';
  for (std::size_t b = 0; b < prefix - 8; ++b) file += static_cast<char>(h.size() >> (8 * b));
  file += h;
  file.append(reinterpret_cast<const char*>(data.data()), data.size());
  return std::vector<std::uint8_t>(file.begin(), file.end());
}

template <class T>
std::vector<std::uint8_t> raw(std::initializer_list<T> v, bool big_endian = false) {
  std::vector<std::uint8_t> out;
  for (T x : v) {
    std::uint8_t b[sizeof(T)];
    std::memcpy(b, &x, sizeof(T));
    if (big_endian) std::reverse(b, b + sizeof(T));
    out.insert(out.end(), b, b + sizeof(T));
  }
  return out;
}

}  // namespace

TEST_CASE("npy: headers numpy reads are read, big-endian and Fortran-ordered data included") {
  const auto f4 = raw<float>({1.0f, 2.5f, -3.0f});
  const std::vector<float> want{1.0f, 2.5f, -3.0f};
  const char* same_array[] = {
      "{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }",   // what numpy writes
      "{'descr': 'f4', 'fortran_order': False, 'shape': (3,)}",      // no byte order, no trailing comma
      "{'descr': '=f4', 'fortran_order': False, 'shape': (3,), }",   // native order
      "{'shape': (3,), 'fortran_order': False, 'descr': '<f4'}",     // any key order
      "{\"descr\": \"<f4\", \"fortran_order\": False, \"shape\": (3,)}",  // double quotes
      "{'descr':'<f4','fortran_order':False,'shape':(3L,)}",          // Python 2 longs, no spaces
      "{\t'descr' : '<f4' ,\n 'fortran_order' : False ,\r\n 'shape' : ( 3 , ) , }",
      "{'descr': '<f4', 'fortran_order': False, 'shape': (7, 7), 'shape': (3,)}",  // last value wins
  };
  for (const char* dict : same_array) {
    CAPTURE(dict);
    const io::NpyArray a = io::parse_npy(npy_file(dict, f4));
    CHECK(a.shape == std::vector<std::uint64_t>{3});
    CHECK(io::npy_floats(a, "a") == want);
  }
  for (int version : {2, 3}) {
    CAPTURE(version);
    CHECK(io::npy_floats(io::parse_npy(npy_file(same_array[0], f4, version)), "a") == want);
  }
  // Big-endian data is byte-swapped, element by element (complex: part by part).
  CHECK(io::npy_floats(io::parse_npy(npy_file("{'descr': '>f4', 'fortran_order': False, 'shape': (3,), }",
                                              raw<float>({1.0f, 2.5f, -3.0f}, true))), "a") == want);
  CHECK(io::npy_floats(io::parse_npy(npy_file("{'descr': '>f8', 'fortran_order': False, 'shape': (1,), }",
                                              raw<double>({0.25}, true))), "a") == std::vector<float>{0.25f});
  const io::NpyArray i2 = io::parse_npy(npy_file("{'descr': '>i2', 'fortran_order': False, 'shape': (2,), }",
                                                 raw<std::int16_t>({-2, 300}, true)));
  CHECK(i2.dtype == DType::i16);
  CHECK(i2.bytes == raw<std::int16_t>({-2, 300}));
  const io::NpyArray c8 = io::parse_npy(npy_file("{'descr': '>c8', 'fortran_order': False, 'shape': (1,), }",
                                                 raw<float>({1.0f, -2.0f}, true)));
  CHECK(c8.dtype == DType::c64);
  CHECK(c8.bytes == raw<float>({1.0f, -2.0f}));
  // Fortran order (first index fastest): a 2x3 array [[1, 2, 3], [4, 5, 6]] stored column by column.
  const io::NpyArray fo = io::parse_npy(npy_file("{'descr': '<f4', 'fortran_order': True, 'shape': (2, 3), }",
                                                 raw<float>({1, 4, 2, 5, 3, 6})));
  CHECK(io::npy_floats(fo, "fo") == std::vector<float>{1, 2, 3, 4, 5, 6});
  const io::NpyArray f3 = io::parse_npy(npy_file("{'descr': '<u2', 'fortran_order': True, 'shape': (2, 2, 2), }",
                                                 raw<std::uint16_t>({0, 4, 2, 6, 1, 5, 3, 7})));
  CHECK(f3.bytes == raw<std::uint16_t>({0, 1, 2, 3, 4, 5, 6, 7}));
  // Integer, bool and bfloat16 arrays: opened with their dtype; as floats only the float ones.
  const io::NpyArray u1 = io::parse_npy(npy_file("{'descr': '|u1', 'fortran_order': False, 'shape': (2,), }", {7, 9}));
  CHECK(u1.dtype == DType::u8);
  CQ_CHECK_THROWS_CONTAINING(io::npy_floats(u1, "u1.npy"), "u1.npy: .npy array has dtype U8, expected a float type");
  CHECK(io::parse_npy(npy_file("{'descr': '|b1', 'fortran_order': False, 'shape': (1,), }", {1})).dtype == DType::boolean);
  CHECK(io::npy_floats(io::parse_npy(npy_file("{'descr': '<V2', 'fortran_order': False, 'shape': (1,), }", {0x80, 0x3f})),
                       "bf") == std::vector<float>{1.0f});
  // Refused clearly: dtypes cq has no name for, structured arrays, keys numpy refuses too.
  const struct {
    const char* dict;
    std::size_t bytes;
    const char* message;
  } refused[] = {
      {"{'descr': '<c16', 'fortran_order': False, 'shape': (1,), }", 16, "x.npy: unsupported .npy dtype '<c16'"},
      {"{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (1,), }", 4, "structured .npy dtypes are not supported"},
      {"{'descr': '<f4', 'fortran_order': 0, 'shape': (1,), }", 4, "fortran_order is not a bool"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (1,), 'x': 1}", 4, "unknown key"},
  };
  for (const auto& c : refused) {
    CAPTURE(c.dict);
    CQ_CHECK_THROWS_CONTAINING(io::parse_npy(npy_file(c.dict, std::vector<std::uint8_t>(c.bytes)), "x.npy"), c.message);
  }
}

// ---- The output path is hostile too ----------------------------------------------------------------

TEST_CASE("atomic writes: a pre-existing temporary name or link is never followed, a failure leaves nothing") {
  const fs::path dir = fresh_dir("atomic");
  const fs::path out = dir / "out.safetensors", victim = dir / "victim.txt";
  std::ofstream(victim) << "precious";
  fs::create_symlink(victim, out.string() + ".tmp");  // where the old writer put its temporary
  const Codebook cb = fitted_codebook(8, 2, 3);
  io::save_codebook(out, cb);
  CHECK(fs::is_regular_file(fs::symlink_status(out)));
  CHECK(io::load_codebook(out) == cb);
  std::ifstream in(victim);
  std::string content;
  in >> content;
  CHECK(content == "precious");
  CHECK(fs::read_symlink(out.string() + ".tmp") == victim);
  // A link at the target itself is replaced by the file, not written through.
  const fs::path link = dir / "link.safetensors";
  fs::create_symlink(victim, link);
  io::save_codebook(link, cb);
  CHECK(fs::is_regular_file(fs::symlink_status(link)));
  std::ifstream in2(victim);
  in2 >> content;
  CHECK(content == "precious");
  // The target is a directory: the rename fails, the temporary file is removed.
  const fs::path sub = dir / "sub";
  fs::create_directories(sub / "occupied");
  const auto listing = files_in(dir);
  CQ_CHECK_THROWS_CONTAINING(io::save_codebook(sub, cb), "cannot rename the temporary file into place");
  CHECK(files_in(dir) == listing);
  CHECK(files_in(sub) == std::vector<std::string>{"occupied"});
  // A directory that does not exist: refused naming the path.
  CQ_CHECK_THROWS_CONTAINING(io::save_codebook(dir / "no" / "such.safetensors", cb), "cannot create a temporary file");
  fs::remove_all(dir);
}

// ---- Cost proportional to the input ----------------------------------------------------------------
// Inputs big enough that a quadratic parse or lookup (the old linear scans) takes minutes; the
// timeouts are safety nets far above what a linear load takes, even under sanitizers.

TEST_CASE("json: an object of 200000 keys parses, and a duplicate among them is named" * doctest::timeout(20)) {
  std::string text = "{";
  for (int i = 0; i < 200000; ++i) text += (i ? ",\"" : "\"") + std::to_string(i) + "\":0";
  const auto v = io::json::parse(text + "}");
  CHECK(v.size() == 200000);
  CHECK(v.keys[199999] == "199999");
  CQ_CHECK_THROWS_CONTAINING(io::json::parse(text + ",\"123456\":1}"), "duplicate key \"123456\" in the object at byte 0");
}

TEST_CASE("KV codebook files: 80 layers x 64 KV heads (10240 codebooks) load and install" * doctest::timeout(60)) {
  const std::size_t layers = 80, heads = 64, dim = 2;
  Codebook cb(dim, 1, 1);
  const float c[4] = {0.0f, 1.0f, -1.0f, 2.0f};
  cb.set_all(c);
  io::CodebookSet set;
  for (std::size_t l = 0; l < layers; ++l)
    for (bool value : {false, true})
      for (std::size_t h = 0; h < heads; ++h) set.add(io::kv_codebook_name(l, value, h), cb);
  io::set_kv_layout(set, layers, heads, dim);
  io::set_kv_key_rope(set, KeyRope::post, {}, dim);
  auto r = io::SafetensorsReader::from_memory(io::codebook_file_bytes(set));
  CHECK(r.tensors().size() == 10240);
  const io::CodebookSet back = io::load_codebooks(r);
  CHECK(back.size() == 10240);
  KVCacheConfig cfg = io::kv_cache_config(back);
  cfg.window = 1;
  KVCache<float> cache(cfg);
  io::load_kv_codebooks(cache, back);
  CHECK(cache.has_codebooks(79));
}
