#pragma once
/// Codebook files for a whole KV cache: one codebook per (layer, K|V, KV head), named
/// `layer.{l}.{k|v}.head.{h}`, plus file-wide metadata `kv.layers`, `kv.kv_heads` and
/// `kv.head_dim` (written by cq-calibrate). set_kv_layout() stamps that layout onto a set only when
/// the set fills it, so every file written from such a set is one load_kv_codebooks() accepts;
/// load_kv_codebooks() installs a file into a KVCache after checking it describes exactly that cache.

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

/// The shape of a KV cache a codebook file is for.
struct KVLayout {
  std::size_t layers = 0, kv_heads = 0, head_dim = 0;
};

namespace detail {

inline std::size_t kv_meta(const CodebookSet& set, const char* key) {
  auto it = set.metadata.find(key);
  CQ_CHECK(it != set.metadata.end(), "KV codebooks: metadata '", key, "' is missing (not a KV codebook file?)");
  std::size_t v = 0;
  const std::string& s = it->second;
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  CQ_CHECK(ec == std::errc{} && p == s.data() + s.size() && v >= 1, "KV codebooks: metadata '", key, "' = '", s,
           "' is not a positive integer");
  return v;
}

/// Checks that `set` holds a codebook for every (layer, K|V, head) of `layout`, each of dim
/// head_dim and configured like head 0 of its layer (a cache configures layers, not heads).
/// Stops at the first problem, so the work is bounded by the set's size, whatever the layout says.
inline void check_kv_codebooks(const CodebookSet& set, const KVLayout& layout) {
  for (std::size_t l = 0; l < layout.layers; ++l)
    for (bool value : {false, true}) {
      const Codebook* head0 = nullptr;
      for (std::size_t h = 0; h < layout.kv_heads; ++h) {
        const std::string name = kv_codebook_name(l, value, h);
        const Codebook* cb = set.find(name);
        CQ_CHECK(cb != nullptr, "KV codebooks: codebook '", name, "' is missing");
        CQ_CHECK(cb->dim() == layout.head_dim, "KV codebooks: '", name, "' has dim ", cb->dim(), " but head_dim is ",
                 layout.head_dim);
        if (h == 0) head0 = cb;
        CQ_CHECK(cb->channels() == head0->channels() && cb->bits() == head0->bits(), "KV codebooks: '", name, "' is ",
                 cb->channels(), "c", cb->bits(), "b but head 0 of layer ", l, " is ", head0->channels(), "c",
                 head0->bits(), "b");
      }
    }
}

}  // namespace detail

/// The layout a set's metadata records, after checking the set fills it.
inline KVLayout kv_layout(const CodebookSet& set) {
  const KVLayout layout{detail::kv_meta(set, "kv.layers"), detail::kv_meta(set, "kv.kv_heads"),
                        detail::kv_meta(set, "kv.head_dim")};
  detail::check_kv_codebooks(set, layout);
  return layout;
}

/// Stamps the cache layout onto a set of KV codebooks (cq-calibrate does this before saving).
/// Refuses, the set unchanged, a zero dimension or a set that does not fill the layout.
inline void set_kv_layout(CodebookSet& set, std::size_t layers, std::size_t kv_heads, std::size_t head_dim) {
  CQ_CHECK(layers >= 1 && kv_heads >= 1 && head_dim >= 1, "set_kv_layout: layers (", layers, "), kv_heads (",
           kv_heads, ") and head_dim (", head_dim, ") must be >= 1");
  detail::check_kv_codebooks(set, {layers, kv_heads, head_dim});
  set.metadata["kv.layers"] = std::to_string(layers);
  set.metadata["kv.kv_heads"] = std::to_string(kv_heads);
  set.metadata["kv.head_dim"] = std::to_string(head_dim);
}

/// A KVCacheConfig whose layers, heads, head_dim and per-layer K/V configurations are those of the
/// file (window, sinks, capacity and RoPE keep their defaults: they are the engine's choice).
inline KVCacheConfig kv_cache_config(const CodebookSet& set) {
  const KVLayout layout = kv_layout(set);
  KVCacheConfig cfg;
  cfg.layers = layout.layers;
  cfg.kv_heads = layout.kv_heads;
  cfg.head_dim = layout.head_dim;
  cfg.layer_specs.reserve(layout.layers);
  for (std::size_t l = 0; l < cfg.layers; ++l) {
    LayerSpec s;
    for (bool value : {false, true}) {
      const Codebook* cb = set.find(kv_codebook_name(l, value, 0));
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
  const KVLayout file = kv_layout(set);
  CQ_CHECK(file.layers == cfg.layers && file.kv_heads == cfg.kv_heads && file.head_dim == cfg.head_dim,
           "KV codebooks are for ", file.layers, " layers x ", file.kv_heads, " KV heads x head_dim ", file.head_dim,
           "; the cache has ", cfg.layers, " x ", cfg.kv_heads, " x ", cfg.head_dim);
  // Check everything first, so a bad file leaves the cache as it was (heads match head 0).
  for (std::size_t l = 0; l < file.layers; ++l)
    for (bool value : {false, true}) {
      const std::string name = kv_codebook_name(l, value, 0);
      const Codebook* cb = set.find(name);
      const QuantSpec& want = value ? cfg.layer_spec(l).value : cfg.layer_spec(l).key;
      CQ_CHECK(cb->channels() == want.channels && cb->bits() == want.bits, "KV codebooks: '", name, "' is ",
               cb->channels(), "c", cb->bits(), "b of dim ", file.head_dim, " but the cache's layer ", l, " uses ",
               want.channels, "c", want.bits, "b of dim ", cfg.head_dim);
    }
  for (std::size_t l = 0; l < file.layers; ++l)
    for (std::size_t h = 0; h < file.kv_heads; ++h)
      cache.set_codebooks(l, h, *set.find(kv_codebook_name(l, false, h)), *set.find(kv_codebook_name(l, true, h)));
}

template <class Cache>
void load_kv_codebooks(Cache& cache, const std::filesystem::path& path) {
  load_kv_codebooks(cache, load_codebooks(path));
}

}  // namespace cq::io
