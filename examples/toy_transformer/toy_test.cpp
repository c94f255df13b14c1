// Tests of the toy transformer's C++ model: it reproduces the PyTorch reference logits, and
// chunked evaluation through a CQ cache equals token-by-token decoding.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include "caches.hpp"

#include <doctest/doctest.h>

#include <cstring>

namespace {
const std::filesystem::path dir = CQ_TOY_MODEL_DIR;
const toy::Model& model() {
  static const toy::Model m(dir / "model.safetensors");
  return m;
}
}  // namespace

TEST_CASE("the C++ model reproduces train.py's reference logits (chunked and token by token)") {
  auto r = cq::io::SafetensorsReader::open(dir / "reference_logits.safetensors");
  const auto raw = r.read_bytes(r.get("tokens"));
  std::vector<std::int32_t> t32(raw.size() / 4);
  std::memcpy(t32.data(), raw.data(), raw.size());
  const std::vector<int> tokens(t32.begin(), t32.end());
  const auto ref = r.read_floats("logits");
  toy::FloatCache cache(model());
  cache.reset();
  const toy::Mat logits = model().forward(tokens, cache);
  REQUIRE(logits.size() == static_cast<Eigen::Index>(ref.size()));
  for (std::size_t i = 0; i < ref.size(); ++i) REQUIRE(std::abs(logits.data()[i] - ref[i]) < 1e-4f);
  cache.reset();
  for (std::size_t t = 0; t < tokens.size(); ++t) {
    const toy::Mat one = model().forward({tokens[t]}, cache);
    for (int j = 0; j < 256; ++j) REQUIRE(std::abs(one(0, j) - ref[t * 256 + j]) < 1e-4f);
  }
}

TEST_CASE("a CQ cache evaluates a chunk exactly as token-by-token decoding") {
  const cq::KVCodebooks books = cq::io::load_kv_codebooks(dir / "codebooks" / "8c8b-fisher.safetensors");
  toy::CQCache chunked(model(), books, 32, true), stepped(model(), books, 32, true);
  std::vector<int> tokens;
  for (char c : std::string("In the beginning God created the heaven and the earth. And the earth was without form"))
    tokens.push_back(static_cast<unsigned char>(c));
  chunked.reset();
  stepped.reset();
  const toy::Mat all = model().forward(tokens, chunked);
  for (std::size_t t = 0; t < tokens.size(); ++t) {
    const toy::Mat one = model().forward({tokens[t]}, stepped);
    for (int j = 0; j < 256; ++j) REQUIRE(one(0, j) == doctest::Approx(all(t, j)).epsilon(1e-4));
  }
}

TEST_CASE("KV codebook files refuse a cache of another shape") {
  const auto set = cq::io::load_codebooks(dir / "codebooks" / "4c8b-uniform.safetensors");
  cq::KVCacheConfig cfg = cq::io::kv_cache_config(set);
  cfg.pre_rope_keys = true;  // the file records keys taken before RoPE
  CHECK(cfg.layers == 4);
  CHECK(cfg.kv_heads == 2);
  CHECK(cfg.layer_spec(3).value.channels == 4);
  cq::KVCache<float> ok(cfg);
  cq::io::load_kv_codebooks(ok, set);
  CHECK(ok.has_codebooks(3));
  cfg.kv_heads = 4;
  cq::KVCache<float> heads(cfg);
  CHECK_THROWS_WITH_AS(cq::io::load_kv_codebooks(heads, set), doctest::Contains("4 layers x 2 KV heads x head_dim 128; the cache has 4 x 4 x 128"), cq::Error);
  cfg = cq::io::kv_cache_config(set);
  cfg.pre_rope_keys = true;
  cfg.layer_specs[2].key = {8, 8};
  cq::KVCache<float> spec(cfg);
  CHECK_THROWS_WITH_AS(cq::io::load_kv_codebooks(spec, set), doctest::Contains("'layer.2.k.head.0' is 4c8b of dim 128 but the cache's layer 2 uses 8c8b"), cq::Error);
  CHECK(!spec.has_codebooks(0));  // nothing installed
}
