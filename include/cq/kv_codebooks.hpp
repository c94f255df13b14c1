#pragma once
/// KVCodebooks: the codebooks of a whole model, one per (layer, K|V, KV head), loaded once and
/// shared by every sequence of every cache (a cache holds a reference, never a copy). Alongside
/// the codebooks it records how the keys they were fitted on were taken: before or after RoPE,
/// and with which RoPE settings, so a cache configured otherwise can refuse them.

#include "cq/codebook.hpp"
#include "cq/error.hpp"
#include "cq/rope.hpp"

#include <cstddef>
#include <cstdint>
#include <vector>

namespace cq {

/// One CQ configuration: C channels per group, Bits bits per code.
struct QuantSpec {
  std::size_t channels = 8;
  int bits = 8;
  double bits_per_channel() const { return double(bits) / double(channels); }
  friend bool operator==(const QuantSpec&, const QuantSpec&) = default;
};

/// A layer's key and value configurations (they may differ).
struct LayerSpec {
  QuantSpec key, value;
  friend bool operator==(const LayerSpec&, const LayerSpec&) = default;
};

/// How the keys a set of key codebooks was fitted on were taken.
enum class KeyRope : std::uint8_t {
  unknown,  // not recorded (files written before cq recorded it): refused by caches
  pre,      // before RoPE: the cache codes keys as given and rotates them inside attention
  post,     // after RoPE: keys are given and coded rotated
};
inline const char* key_rope_name(KeyRope k) {
  return k == KeyRope::pre ? "pre-RoPE" : k == KeyRope::post ? "post-RoPE" : "unknown";
}

class KVCodebooks {
 public:
  KVCodebooks() = default;
  /// Empty codebooks for `layers` x `kv_heads` heads of `head_dim`; `specs` holds one LayerSpec
  /// for every layer, or one for all. Keys fitted `key_rope` with `rope` (its settings matter for
  /// pre-RoPE keys only). Throws cq::Error naming the bad field.
  KVCodebooks(std::size_t layers, std::size_t kv_heads, std::size_t head_dim, std::vector<LayerSpec> specs,
              KeyRope key_rope = KeyRope::post, RopeConfig rope = {})
      : layers_(layers), heads_(kv_heads), dim_(head_dim), specs_(std::move(specs)), key_rope_(key_rope),
        rope_(rope) {
    CQ_CHECK(layers >= 1 && layers <= (1u << 20), "KVCodebooks: layers must be in 1..2^20, got ", layers);
    CQ_CHECK(kv_heads >= 1 && kv_heads <= (1u << 20), "KVCodebooks: kv_heads must be in 1..2^20, got ", kv_heads);
    CQ_CHECK(head_dim >= 1 && head_dim <= (1u << 16), "KVCodebooks: head_dim must be in 1..65536, got ", head_dim);
    CQ_CHECK(specs_.size() == 1 || specs_.size() == layers, "KVCodebooks: ", specs_.size(), " layer specs for ", layers,
             " layers (give one per layer, or one for all)");
    CQ_CHECK(layers * kv_heads <= (std::size_t{1} << 24), "KVCodebooks: ", layers, " layers x ", kv_heads,
             " KV heads exceed 2^24 (layer, head) pairs");
    for (const LayerSpec& s : specs_) {
      check_cq_shape(head_dim, s.key.channels, s.key.bits, "KVCodebooks key spec");
      check_cq_shape(head_dim, s.value.channels, s.value.bits, "KVCodebooks value spec");
    }
    if (key_rope_ == KeyRope::pre) Rope(rope_, head_dim);  // validates the settings
    books_.resize(layers * kv_heads * 2);
  }

  std::size_t layers() const { return layers_; }
  std::size_t kv_heads() const { return heads_; }
  std::size_t head_dim() const { return dim_; }
  const LayerSpec& spec(std::size_t layer) const {
    at(layer, 0, "KVCodebooks::spec");
    return specs_.size() == 1 ? specs_[0] : specs_[layer];
  }
  KeyRope key_rope() const { return key_rope_; }
  const RopeConfig& rope() const { return rope_; }

  /// Installs the key and value codebooks of (layer, head); their shapes must match the layer's
  /// spec. On error nothing changes.
  void set(std::size_t layer, std::size_t head, Codebook key, Codebook value) {
    const std::size_t i = at(layer, head, "KVCodebooks::set");
    const LayerSpec& s = spec(layer);
    auto check = [&](const Codebook& cb, const QuantSpec& q, const char* what) {
      CQ_CHECK(cb.dim() == dim_ && cb.channels() == q.channels && cb.bits() == q.bits, "KVCodebooks::set: ", what,
               " codebook of layer ", layer, " head ", head, " is dim ", cb.dim(), ", C ", cb.channels(), ", ",
               cb.bits(), " bits; the layer needs dim ", dim_, ", C ", q.channels, ", ", q.bits, " bits");
    };
    check(key, s.key, "key");
    check(value, s.value, "value");
    books_[i] = std::move(key);
    books_[i + 1] = std::move(value);
  }
  const Codebook& key(std::size_t layer, std::size_t head) const { return books_[at(layer, head, "KVCodebooks::key")]; }
  const Codebook& value(std::size_t layer, std::size_t head) const {
    return books_[at(layer, head, "KVCodebooks::value") + 1];
  }
  /// Whether every codebook of `layer` is installed.
  bool complete(std::size_t layer) const {
    for (std::size_t h = 0; h < heads_; ++h)
      if (key(layer, h).empty() || value(layer, h).empty()) return false;
    return true;
  }
  bool complete() const {
    for (std::size_t l = 0; l < layers_; ++l)
      if (!complete(l)) return false;
    return true;
  }

  /// Bytes the codebooks hold (centroids and the derived tables the kernels read), counted once
  /// however many caches and sequences use them.
  std::size_t memory() const {
    std::size_t b = 0;
    for (const Codebook& cb : books_) b += cb.allocated_bytes();
    return b;
  }

 private:
  std::size_t at(std::size_t layer, std::size_t head, const char* what) const {
    CQ_CHECK(layer < layers_, what, ": layer ", layer, " out of range (layers = ", layers_, ")");
    CQ_CHECK(head < heads_, what, ": KV head ", head, " out of range (kv_heads = ", heads_, ")");
    return (layer * heads_ + head) * 2;
  }

  std::size_t layers_ = 0, heads_ = 0, dim_ = 0;
  std::vector<LayerSpec> specs_;
  KeyRope key_rope_ = KeyRope::unknown;
  RopeConfig rope_;
  std::vector<Codebook> books_;  // (layers, kv_heads, K|V)
};

}  // namespace cq
