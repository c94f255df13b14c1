#include "test_util.hpp"

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
  reject(st_file(R"({"t":{"dtype":"Q4","shape":[2],"data_offsets":[0,8]}})", 8), "unsupported dtype 'Q4'");
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
  CHECK(back.info().objective == cb.info().objective);  // %.17g round-trips doubles
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
  set.entries.emplace_back("layer.0.k", fitted_codebook(8, 2, 3));
  set.entries.emplace_back("layer.0.v", fitted_codebook(8, 4, 4));
  const auto back = io::load_codebooks(io::SafetensorsReader::from_memory(io::codebook_file_bytes(set)));
  REQUIRE(back.entries.size() == 2);
  CHECK(back.entries[1].first == "layer.0.v");
  CHECK(*back.find("layer.0.k") == set.entries[0].second);
  CHECK(back.metadata.at("model") == "toy");
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
  set.entries.emplace_back("codebook", cb);
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
  CQ_CHECK_THROWS_CONTAINING(load_bytes(patched("codebook.bits", "17")), "is not an integer in [0, 16]");
  CQ_CHECK_THROWS_CONTAINING(load_bytes(patched("codebook.channels", "3")), "invalid shape (dim 16, channels 3");
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
