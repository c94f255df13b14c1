#pragma once
/// Codebook files for a whole KV cache: one codebook per (layer, K|V, KV head), named
/// `layer.{l}.{k|v}.head.{h}`, plus file-wide metadata `kv.layers`, `kv.kv_heads` and
/// `kv.head_dim` (written by cq-calibrate). load_kv_codebooks() installs such a file into a
/// KVCache after checking it describes exactly that cache.

#include "cq/error.hpp"
#include "cq/io/codebook_file.hpp"
#include "cq/kv_cache.hpp"

#include <charconv>
#include <filesystem>
#include <string>

namespace cq::io {

inline std::string kv_codebook_name(std::size_t layer, bool value, std::size_t head) {
  return "layer." + std::to_string(layer) + (value ? ".v" : ".k") + ".head." + std::to_string(head);
}

namespace detail {
inline std::size_t kv_meta(const CodebookSet& set, const char* key) {
  auto it = set.metadata.find(key);
  CQ_CHECK(it != set.metadata.end(), "KV codebooks: metadata '", key, "' is missing (not a KV codebook file?)");
  std::size_t v = 0;
  const std::string& s = it->second;
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  CQ_CHECK(ec == std::errc{} && p == s.data() + s.size() && v >= 1 && v <= (1u << 20), "KV codebooks: metadata '", key,
           "' = '", s, "' is not a positive integer");
  return v;
}
}  // namespace detail

/// Stamps the cache layout onto a set of KV codebooks (cq-calibrate does this).
inline void set_kv_layout(CodebookSet& set, std::size_t layers, std::size_t kv_heads, std::size_t head_dim) {
  set.metadata["kv.layers"] = std::to_string(layers);
  set.metadata["kv.kv_heads"] = std::to_string(kv_heads);
  set.metadata["kv.head_dim"] = std::to_string(head_dim);
}

/// A KVCacheConfig whose layers, heads, head_dim and per-layer K/V configurations are those of the
/// file (window, sinks, capacity and RoPE keep their defaults: they are the engine's choice).
inline KVCacheConfig kv_cache_config(const CodebookSet& set) {
  KVCacheConfig cfg;
  cfg.layers = detail::kv_meta(set, "kv.layers");
  cfg.kv_heads = detail::kv_meta(set, "kv.kv_heads");
  cfg.head_dim = detail::kv_meta(set, "kv.head_dim");
  for (std::size_t l = 0; l < cfg.layers; ++l) {
    LayerSpec s;
    for (bool value : {false, true}) {
      const std::string name = kv_codebook_name(l, value, 0);
      const Codebook* cb = set.find(name);
      CQ_CHECK(cb != nullptr, "KV codebooks: codebook '", name, "' is missing");
      (value ? s.value : s.key) = QuantSpec{cb->channels(), cb->bits()};
    }
    cfg.layer_specs.push_back(s);
  }
  return cfg;
}

/// Installs every codebook of `set` into `cache`. Refuses (throws, cache unchanged) a file whose
/// layer count, head count, head_dim or any codebook's configuration differs from the cache's.
template <class Cache>
void load_kv_codebooks(Cache& cache, const CodebookSet& set) {
  const KVCacheConfig& cfg = cache.config();
  const std::size_t layers = detail::kv_meta(set, "kv.layers"), heads = detail::kv_meta(set, "kv.kv_heads"),
                    dim = detail::kv_meta(set, "kv.head_dim");
  CQ_CHECK(layers == cfg.layers && heads == cfg.kv_heads && dim == cfg.head_dim, "KV codebooks are for ", layers,
           " layers x ", heads, " KV heads x head_dim ", dim, "; the cache has ", cfg.layers, " x ", cfg.kv_heads, " x ",
           cfg.head_dim);
  // Check everything first, so a bad file leaves the cache as it was.
  for (std::size_t l = 0; l < layers; ++l)
    for (std::size_t h = 0; h < heads; ++h)
      for (bool value : {false, true}) {
        const std::string name = kv_codebook_name(l, value, h);
        const Codebook* cb = set.find(name);
        CQ_CHECK(cb != nullptr, "KV codebooks: codebook '", name, "' is missing");
        const QuantSpec& want = value ? cfg.layer_spec(l).value : cfg.layer_spec(l).key;
        CQ_CHECK(cb->dim() == dim && cb->channels() == want.channels && cb->bits() == want.bits, "KV codebooks: '", name,
                 "' is ", cb->channels(), "c", cb->bits(), "b of dim ", cb->dim(), " but the cache's layer ", l, " uses ",
                 want.channels, "c", want.bits, "b of dim ", dim);
      }
  for (std::size_t l = 0; l < layers; ++l)
    for (std::size_t h = 0; h < heads; ++h)
      cache.set_codebooks(l, h, *set.find(kv_codebook_name(l, false, h)), *set.find(kv_codebook_name(l, true, h)));
}

template <class Cache>
void load_kv_codebooks(Cache& cache, const std::filesystem::path& path) {
  load_kv_codebooks(cache, load_codebooks(path));
}

}  // namespace cq::io
