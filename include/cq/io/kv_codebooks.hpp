#pragma once
/// Codebook files for a whole KV cache: one codebook per (layer, K|V, KV head), named
/// `layer.{l}.{k|v}.head.{h}`, plus file-wide metadata `kv.layers`, `kv.kv_heads` and
/// `kv.head_dim` (written by cq-calibrate). set_kv_layout() stamps that layout onto a set only when
/// the set fills it, so every file written from such a set is one load_kv_codebooks() accepts.
///
/// How the keys were taken is recorded too: `kv.key_rope` = `pre` (before RoPE) or `post`, and for
/// pre-RoPE keys the RoPE settings they were fitted with (`kv.rope.theta`, `.style`,
/// `.rotary_dim`, `.scaling` and the scaling's parameters). A cache configured otherwise refuses
/// the file, naming both; a file without the record is refused too (cq-calibrate --stamp adds it).
///
/// load_kv_codebooks(path) returns the model-wide KVCodebooks every PagedKVCache shares;
/// load_kv_codebooks(cache, ...) installs a file into a one-sequence KVCache.

#include "cq/error.hpp"
#include "cq/io/codebook_file.hpp"
#include "cq/kv_cache.hpp"
#include "cq/kv_codebooks.hpp"
#include "cq/rope.hpp"

#include <charconv>
#include <cmath>
#include <map>
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

/// Records how the keys of a set's key codebooks were taken (see the top of this file); the RoPE
/// settings only for pre-RoPE keys, validated for head_dim. Throws, the set unchanged.
inline void set_kv_key_rope(CodebookSet& set, KeyRope key_rope, const RopeConfig& rope, std::size_t head_dim) {
  CQ_CHECK(key_rope != KeyRope::unknown, "set_kv_key_rope: say whether keys were taken before or after RoPE");
  std::map<std::string, std::string> m = set.metadata;
  for (auto it = m.begin(); it != m.end();) it = it->first.rfind("kv.rope.", 0) == 0 ? m.erase(it) : std::next(it);
  m["kv.key_rope"] = key_rope == KeyRope::pre ? "pre" : "post";
  if (key_rope == KeyRope::pre) {
    Rope(rope, head_dim);  // validates
    m["kv.rope.theta"] = detail::format_double(rope.theta);
    m["kv.rope.style"] = rope_style_name(rope.style);
    m["kv.rope.rotary_dim"] = std::to_string(rope.rotary_dim);
    m["kv.rope.scaling"] = rope_scaling_name(rope.scaling);
    if (rope.scaling != RopeScaling::none) m["kv.rope.factor"] = detail::format_double(rope.factor);
    if (rope.scaling == RopeScaling::llama3) {
      m["kv.rope.low_freq_factor"] = detail::format_double(rope.low_freq_factor);
      m["kv.rope.high_freq_factor"] = detail::format_double(rope.high_freq_factor);
    }
    if (rope.scaling == RopeScaling::llama3 || rope.scaling == RopeScaling::yarn)
      m["kv.rope.original_max_position"] = detail::format_double(rope.original_max_position);
    if (rope.scaling == RopeScaling::yarn) {
      m["kv.rope.beta_fast"] = detail::format_double(rope.beta_fast);
      m["kv.rope.beta_slow"] = detail::format_double(rope.beta_slow);
      m["kv.rope.attention_factor"] = detail::format_double(rope.attention_factor);
    }
  }
  set.metadata = std::move(m);
}

/// How a set's keys were taken: its record, or KeyRope::unknown when it has none. Throws naming
/// the key for a record it cannot read.
inline std::pair<KeyRope, RopeConfig> kv_key_rope(const CodebookSet& set) {
  RopeConfig rope;
  const auto it = set.metadata.find("kv.key_rope");
  if (it == set.metadata.end()) return {KeyRope::unknown, rope};
  CQ_CHECK(it->second == "pre" || it->second == "post", "KV codebooks: kv.key_rope = '", it->second,
           "' (expected pre or post)");
  if (it->second == "post") return {KeyRope::post, rope};
  auto text = [&](const std::string& key) -> const std::string* {
    const auto f = set.metadata.find("kv.rope." + key);
    return f == set.metadata.end() ? nullptr : &f->second;
  };
  auto number = [&](const std::string& key, double& out) {
    if (const std::string* v = text(key)) {
      auto [p, ec] = std::from_chars(v->data(), v->data() + v->size(), out);
      CQ_CHECK(ec == std::errc{} && p == v->data() + v->size(), "KV codebooks: kv.rope.", key, " = '", *v,
               "' is not a number");
    }
  };
  number("theta", rope.theta);
  if (const std::string* v = text("style")) {
    CQ_CHECK(*v == "rotate_half" || *v == "interleaved", "KV codebooks: kv.rope.style = '", *v,
             "' (expected rotate_half or interleaved)");
    rope.style = *v == "interleaved" ? RopeStyle::interleaved : RopeStyle::rotate_half;
  }
  double rotary = 0.0;
  number("rotary_dim", rotary);
  CQ_CHECK(rotary >= 0.0 && rotary <= 65536.0 && rotary == std::floor(rotary), "KV codebooks: kv.rope.rotary_dim = ",
           rotary, " is not a channel count");
  rope.rotary_dim = static_cast<std::size_t>(rotary);
  if (const std::string* v = text("scaling")) {
    bool known = false;
    for (RopeScaling s : {RopeScaling::none, RopeScaling::linear, RopeScaling::llama3, RopeScaling::yarn})
      if (*v == rope_scaling_name(s)) rope.scaling = s, known = true;
    CQ_CHECK(known, "KV codebooks: kv.rope.scaling = '", *v, "' (expected none, linear, llama3 or yarn)");
  }
  number("factor", rope.factor);
  number("low_freq_factor", rope.low_freq_factor);
  number("high_freq_factor", rope.high_freq_factor);
  number("original_max_position", rope.original_max_position);
  number("beta_fast", rope.beta_fast);
  number("beta_slow", rope.beta_slow);
  number("attention_factor", rope.attention_factor);
  return {KeyRope::pre, rope};
}

/// A set's codebooks as the model-wide KVCodebooks every paged cache shares (layout, per-layer
/// configurations and the key RoPE record from the set).
inline KVCodebooks kv_codebooks(const CodebookSet& set) {
  const KVLayout layout = kv_layout(set);
  std::vector<LayerSpec> specs;
  for (std::size_t l = 0; l < layout.layers; ++l) {
    const Codebook *k = set.find(kv_codebook_name(l, false, 0)), *v = set.find(kv_codebook_name(l, true, 0));
    specs.push_back({{k->channels(), k->bits()}, {v->channels(), v->bits()}});
  }
  const auto [key_rope, rope] = kv_key_rope(set);
  KVCodebooks cb(layout.layers, layout.kv_heads, layout.head_dim, std::move(specs), key_rope, rope);
  for (std::size_t l = 0; l < layout.layers; ++l)
    for (std::size_t h = 0; h < layout.kv_heads; ++h)
      cb.set(l, h, *set.find(kv_codebook_name(l, false, h)), *set.find(kv_codebook_name(l, true, h)));
  return cb;
}

/// Reads a KV codebook file as the model-wide KVCodebooks.
inline KVCodebooks load_kv_codebooks(const std::filesystem::path& path) { return kv_codebooks(load_codebooks(path)); }

/// A KVCodebooks as a set (layout and key RoPE record stamped), for save_codebooks.
inline CodebookSet kv_codebook_set(const KVCodebooks& cb) {
  CQ_CHECK(cb.complete(), "kv_codebook_set: not every codebook is installed");
  CodebookSet set;
  for (std::size_t l = 0; l < cb.layers(); ++l)
    for (bool value : {false, true})
      for (std::size_t h = 0; h < cb.kv_heads(); ++h)
        set.add(kv_codebook_name(l, value, h), value ? cb.value(l, h) : cb.key(l, h));
  set_kv_layout(set, cb.layers(), cb.kv_heads(), cb.head_dim());
  set_kv_key_rope(set, cb.key_rope(), cb.rope(), cb.head_dim());
  return set;
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
/// layer count, head count, head_dim, any codebook's configuration or key RoPE record differs from
/// the cache's.
template <class Cache>
void load_kv_codebooks(Cache& cache, const CodebookSet& set) {
  const KVCacheConfig& cfg = cache.config();
  const KVLayout file = kv_layout(set);
  CQ_CHECK(file.layers == cfg.layers && file.kv_heads == cfg.kv_heads && file.head_dim == cfg.head_dim,
           "KV codebooks are for ", file.layers, " layers x ", file.kv_heads, " KV heads x head_dim ", file.head_dim,
           "; the cache has ", cfg.layers, " x ", cfg.kv_heads, " x ", cfg.head_dim);
  const auto [key_rope, rope] = kv_key_rope(set);
  CQ_CHECK(key_rope != KeyRope::unknown, "KV codebooks: the file does not record whether keys were coded before or ",
           "after RoPE; re-run cq-calibrate, or stamp it with cq-calibrate --stamp");
  const KeyRope cache_keys = cfg.pre_rope_keys ? KeyRope::pre : KeyRope::post;
  CQ_CHECK(key_rope == cache_keys, "KV codebooks: the cache takes ", key_rope_name(cache_keys), " keys but the file's key ",
           "codebooks were fitted on ", key_rope_name(key_rope), " keys");
  CQ_CHECK(!cfg.pre_rope_keys || rope == cfg.rope, "KV codebooks: the cache's RoPE (", describe(cfg.rope),
           ") differs from the one the file's key codebooks were fitted with (", describe(rope), ")");
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
