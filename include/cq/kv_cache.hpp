#pragma once
/// KVCache: a model's key/value cache stored as CQ codes, answering attention without
/// materialising K or V.
///
/// Layers x KV heads; each layer has its own key and value configuration (C, Bits), and each
/// (layer, head) its own key and value codebooks. Per (layer, head) the cache keeps:
///   - the first S tokens ("attention sinks") in full precision;
///   - every later token as key and value codes (encoded when appended);
///   - the most recent tokens in full precision: the window of W tokens attention reads exactly,
///     plus `max_rollback` more so truncate() can roll back without losing precision.
/// With pre_rope_keys, keys are coded before RoPE and rotated inside attention; full-precision key
/// rows are also kept rotated (computed once at append), so attention never re-rotates them.
/// A query at position p reads sinks, codes for [S, p + 1 - W) and full precision for the rest, so
/// a chunked prefill computes exactly what token-by-token decoding would.
///
/// Thread safety: const member functions (attend, read_token, memory, size) may run concurrently
/// with each other; append, truncate, clear and set_codebooks need exclusive access.

#include "cq/attention.hpp"
#include "cq/backend/native.hpp"
#include "cq/codebook.hpp"
#include "cq/concepts.hpp"
#include "cq/detail/aligned_buffer.hpp"
#include "cq/element.hpp"
#include "cq/error.hpp"
#include "cq/executor.hpp"
#include "cq/packed_codes.hpp"
#include "cq/quantizer.hpp"
#include "cq/rope.hpp"
#include "cq/views.hpp"

#include <cmath>
#include <cstring>
#include <vector>

namespace cq {

/// One CQ configuration: C channels per group, Bits bits per code.
struct QuantSpec {
  std::size_t channels = 8;
  int bits = 8;
  double bits_per_channel() const { return double(bits) / double(channels); }
};

/// A layer's key and value configurations (they may differ).
struct LayerSpec {
  QuantSpec key, value;
};

struct KVCacheConfig {
  std::size_t layers = 1;
  std::size_t kv_heads = 1;
  std::size_t head_dim = 128;
  LayerSpec spec;                      // every layer's configuration...
  std::vector<LayerSpec> layer_specs;  // ...or one per layer (then size() == layers)
  std::size_t window = 32;             // W: most recent tokens kept in full precision
  std::size_t sinks = 0;               // S: first tokens kept in full precision
  std::size_t capacity = 0;            // tokens per sequence; 0 = grow as needed
  std::size_t max_rollback = 64;       // how far truncate() may roll back
  bool pre_rope_keys = false;          // keys arrive (and are coded) before RoPE
  RopeConfig rope;                     // used when pre_rope_keys

  const LayerSpec& layer_spec(std::size_t l) const { return layer_specs.empty() ? spec : layer_specs[l]; }
};

/// Bytes held, by part. `window` counts every full-precision recent row (window + rollback).
struct MemoryUsage {
  std::size_t codes = 0, window = 0, sinks = 0, codebooks = 0;
  std::size_t total() const { return codes + window + sinks + codebooks; }
};

struct AttendOptions {
  float scale = 0.0f;                               // 0: 1 / sqrt(head_dim)
  Executor* executor = nullptr;                     // spread heads (or long ranges) over threads
  AttentionMethod method = AttentionMethod::fused;  // dequantize: the decode-then-attend baseline
};

template <element_type T = float, class Backend = backend::Native>
class KVCache {
 public:
  using value_type = T;

  explicit KVCache(KVCacheConfig cfg) : cfg_(std::move(cfg)) {
    CQ_CHECK(cfg_.layers >= 1 && cfg_.kv_heads >= 1, "KVCache: layers (", cfg_.layers, ") and kv_heads (",
             cfg_.kv_heads, ") must be >= 1");
    CQ_CHECK(cfg_.layer_specs.empty() || cfg_.layer_specs.size() == cfg_.layers, "KVCache: ", cfg_.layer_specs.size(),
             " layer specs for ", cfg_.layers, " layers");
    CQ_CHECK(!cfg_.pre_rope_keys || cfg_.head_dim % 2 == 0, "KVCache: pre-RoPE keys need an even head_dim, got ",
             cfg_.head_dim);
    if (cfg_.pre_rope_keys) inv_freq_ = rope_inv_freq(cfg_.rope, cfg_.head_dim);
    layers_.resize(cfg_.layers);
    for (std::size_t l = 0; l < cfg_.layers; ++l) {
      const LayerSpec& s = cfg_.layer_spec(l);
      check_cq_shape(cfg_.head_dim, s.key.channels, s.key.bits, "KVCache key config");
      check_cq_shape(cfg_.head_dim, s.value.channels, s.value.bits, "KVCache value config");
      Layer& L = layers_[l];
      L.key_cb.assign(cfg_.kv_heads, Codebook());
      L.value_cb.assign(cfg_.kv_heads, Codebook());
      for (std::size_t h = 0; h < cfg_.kv_heads; ++h) {
        Head hd;
        hd.key_codes = PackedCodes(cfg_.head_dim / s.key.channels, s.key.bits);
        hd.value_codes = PackedCodes(cfg_.head_dim / s.value.channels, s.value.bits);
        hd.recent_first = cfg_.sinks;
        L.heads.push_back(std::move(hd));
      }
    }
  }

  const KVCacheConfig& config() const { return cfg_; }
  std::size_t size(std::size_t layer = 0) const { return layer_at(layer, "size").size; }

  /// Installs the codebooks of (layer, head); their shapes must match the layer's configuration.
  void set_codebooks(std::size_t layer, std::size_t head, Codebook key, Codebook value) {
    Layer& L = layer_at(layer, "set_codebooks");
    CQ_CHECK(head < cfg_.kv_heads, "set_codebooks: head ", head, " out of range (kv_heads = ", cfg_.kv_heads, ")");
    const LayerSpec& s = cfg_.layer_spec(layer);
    auto check = [&](const Codebook& cb, const QuantSpec& q, const char* what) {
      CQ_CHECK(cb.dim() == cfg_.head_dim && cb.channels() == q.channels && cb.bits() == q.bits, "set_codebooks: ", what,
               " codebook of layer ", layer, " head ", head, " is dim ", cb.dim(), ", C ", cb.channels(), ", ",
               cb.bits(), " bits; the layer needs dim ", cfg_.head_dim, ", C ", q.channels, ", ", q.bits, " bits");
    };
    check(key, s.key, "key");
    check(value, s.value, "value");
    L.key_cb[head] = std::move(key);
    L.value_cb[head] = std::move(value);
  }
  const Codebook& key_codebook(std::size_t layer, std::size_t head) const { return layer_at(layer, "key_codebook").key_cb.at(head); }
  const Codebook& value_codebook(std::size_t layer, std::size_t head) const {
    return layer_at(layer, "value_codebook").value_cb.at(head);
  }
  bool has_codebooks(std::size_t layer) const {
    for (const auto& cb : layer_at(layer, "has_codebooks").key_cb)
      if (cb.empty()) return false;
    return true;
  }

  /// Appends tokens to one layer: keys and values are (tokens, kv_heads * head_dim), head h in
  /// columns [h * head_dim, (h + 1) * head_dim). On any error nothing is appended.
  void append(std::size_t layer, ConstMatrixView<T> keys, ConstMatrixView<T> values) {
    Layer& L = layer_at(layer, "append");
    const std::size_t D = cfg_.head_dim, width = cfg_.kv_heads * D, m = keys.rows;
    check_view(keys, "append: keys");
    check_view(values, "append: values");
    CQ_CHECK(keys.cols == width && values.cols == width && values.rows == m, "append: keys are ", keys.rows, " x ",
             keys.cols, " and values ", values.rows, " x ", values.cols, "; both must be tokens x (kv_heads * head_dim) = ",
             "tokens x ", width);
    CQ_CHECK(has_codebooks(layer), "append: layer ", layer, " has no codebooks yet (set_codebooks or load them)");
    CQ_CHECK(cfg_.capacity == 0 || L.size + m <= cfg_.capacity, "append: the cache is full: layer ", layer, " holds ",
             L.size, " of ", cfg_.capacity, " tokens and cannot take ", m, " more");
    detail::check_finite_rows(keys, "append: keys");
    detail::check_finite_rows(values, "append: values");
    if (m == 0) return;

    const std::size_t S = cfg_.sinks;
    const std::size_t into_sinks = L.size < S ? std::min(m, S - L.size) : 0;
    const std::size_t coded = m - into_sinks;
    for (std::size_t h = 0; h < cfg_.kv_heads; ++h) {
      Head& hd = L.heads[h];
      const ConstMatrixView<T> kh = keys.middle_cols(h * D, D), vh = values.middle_cols(h * D, D);
      append_rows(hd.sink_k, kh.middle_rows(0, into_sinks));
      append_rows(hd.sink_v, vh.middle_rows(0, into_sinks));
      if (cfg_.pre_rope_keys) append_rotated(hd.sink_kr, kh.middle_rows(0, into_sinks), L.size);
      if (coded == 0) continue;
      const ConstMatrixView<T> kc = kh.middle_rows(into_sinks, coded), vc = vh.middle_rows(into_sinks, coded);
      const std::size_t first = hd.key_codes.size();
      hd.key_codes.resize(first + coded);
      hd.value_codes.resize(first + coded);
      encode_rows<Backend>(L.key_cb[h].view(), kc, hd.key_codes.view(), first);
      encode_rows<Backend>(L.value_cb[h].view(), vc, hd.value_codes.view(), first);
      append_rows(hd.recent_k, kc);
      append_rows(hd.recent_v, vc);
      if (cfg_.pre_rope_keys) append_rotated(hd.recent_kr, kc, L.size + into_sinks);
      trim_recent(hd, coded);
    }
    L.size += m;
  }

  /// Attention for the last q.rows tokens of `layer` (causal: row i is at position
  /// size - q.rows + i). q and out are (rows, q_heads * head_dim); q_heads must be a multiple of
  /// kv_heads, query head j reading KV head j / (q_heads / kv_heads).
  void attend(std::size_t layer, ConstMatrixView<float> q, MatrixView<float> out, const AttendOptions& opt = {}) const {
    const Layer& L = layer_at(layer, "attend");
    const std::size_t D = cfg_.head_dim;
    check_view(q, "attend: q");
    check_view(out, "attend: out");
    CQ_CHECK(q.cols % D == 0 && (q.cols / D) % cfg_.kv_heads == 0 && q.cols > 0, "attend: q has ", q.cols,
             " columns; it needs q_heads * head_dim with q_heads a multiple of kv_heads = ", cfg_.kv_heads);
    CQ_CHECK(out.rows == q.rows && out.cols == q.cols, "attend: out is ", out.rows, " x ", out.cols, ", q is ", q.rows,
             " x ", q.cols);
    CQ_CHECK(q.rows <= L.size, "attend: ", q.rows, " query rows but layer ", layer, " holds ", L.size, " tokens");
    const std::size_t group = q.cols / D / cfg_.kv_heads;
    const float scale = opt.scale != 0.0f ? opt.scale : 1.0f / std::sqrt(float(D));
    const std::size_t items = cfg_.kv_heads * q.rows;
    std::vector<KVHeadView<T>> views;
    views.reserve(cfg_.kv_heads);
    for (std::size_t h = 0; h < cfg_.kv_heads; ++h) views.push_back(head_view(layer, h));
    auto item = [&](std::size_t i, Executor* split_exec, std::size_t parts) {
      const std::size_t h = i % cfg_.kv_heads, r = i / cfg_.kv_heads;
      const std::size_t pos = L.size - q.rows + r;
      attend_head<Backend>(views[h], q.row(r) + h * group * D, group, pos, scale, out.row(r) + h * group * D,
                           opt.method, split_exec, parts);
    };
    const std::size_t threads = opt.executor ? opt.executor->concurrency() : 1;
    if (threads > 1 && items < threads) {
      // Fewer (head, query) items than threads: split each one's code range instead.
      for (std::size_t i = 0; i < items; ++i) item(i, opt.executor, threads);
    } else {
      parallel_for(opt.executor, items, [&](std::size_t i) { item(i, nullptr, 1); });
    }
  }

  /// Rolls every layer back to `tokens` tokens (speculative decoding). Always possible when it
  /// removes at most max_rollback tokens and no more than the last append added (append a draft,
  /// truncate its rejected part): every append keeps window + max_rollback + (its tokens) rows in
  /// full precision. Deeper rollbacks succeed while that history still reaches the new window
  /// (consecutive rollbacks share it; appends replenish it), and always when only sinks remain;
  /// otherwise truncate throws and the cache is unchanged.
  void truncate(std::size_t tokens) {
    for (std::size_t l = 0; l < cfg_.layers; ++l) {
      const Layer& L = layers_[l];
      CQ_CHECK(tokens <= L.size, "truncate: ", tokens, " tokens exceed layer ", l, "'s ", L.size);
      const std::size_t lo = window_start(tokens);
      for (const Head& hd : L.heads)
        CQ_CHECK(lo >= tokens || lo >= hd.recent_first, "truncate: cannot roll layer ", l, " back to ", tokens,
                 " tokens: full precision is kept only from position ", hd.recent_first, " (max_rollback = ",
                 cfg_.max_rollback, ")");
    }
    for (Layer& L : layers_) {
      for (Head& hd : L.heads) {
        const std::size_t S = cfg_.sinks, D = cfg_.head_dim;
        hd.sink_k.resize(std::min(tokens, S) * D);
        hd.sink_v.resize(std::min(tokens, S) * D);
        if (cfg_.pre_rope_keys) hd.sink_kr.resize(std::min(tokens, S) * D);
        const std::size_t coded = tokens > S ? tokens - S : 0;
        hd.key_codes.truncate(std::min(coded, hd.key_codes.size()));
        hd.value_codes.truncate(std::min(coded, hd.value_codes.size()));
        if (tokens <= hd.recent_first) {
          hd.recent_k.clear();
          hd.recent_v.clear();
          hd.recent_kr.clear();
          hd.recent_first = std::max(tokens, S);
        } else {
          hd.recent_k.resize((tokens - hd.recent_first) * D);
          hd.recent_v.resize((tokens - hd.recent_first) * D);
          if (cfg_.pre_rope_keys) hd.recent_kr.resize((tokens - hd.recent_first) * D);
        }
      }
      L.size = std::min(L.size, tokens);
    }
  }
  void clear() { truncate(0); }

  /// The key and value of one cached token as attention sees it now (full precision inside the
  /// sinks and the current window, decoded from codes elsewhere), as floats. Keys are as appended
  /// (before RoPE when pre_rope_keys).
  void read_token(std::size_t layer, std::size_t head, std::size_t position, float* key, float* value) const {
    const Layer& L = layer_at(layer, "read_token");
    CQ_CHECK(head < cfg_.kv_heads && position < L.size, "read_token: (head ", head, ", position ", position,
             ") outside ", cfg_.kv_heads, " heads x ", L.size, " tokens");
    const Head& hd = L.heads[head];
    const std::size_t D = cfg_.head_dim, S = cfg_.sinks;
    if (position < S || position >= window_start(L.size)) {
      const T* k = position < S ? hd.sink_k.data() + position * D : hd.recent_k.data() + (position - hd.recent_first) * D;
      const T* v = position < S ? hd.sink_v.data() + position * D : hd.recent_v.data() + (position - hd.recent_first) * D;
      for (std::size_t i = 0; i < D; ++i) {
        key[i] = to_float(k[i]);
        value[i] = to_float(v[i]);
      }
      return;
    }
    decode_rows<Backend>(L.key_cb[head].view(), hd.key_codes.view(), position - S, MatrixView<float>(key, 1, D));
    decode_rows<Backend>(L.value_cb[head].view(), hd.value_codes.view(), position - S, MatrixView<float>(value, 1, D));
  }

  /// Bytes held, by part, over all layers and heads.
  MemoryUsage memory() const {
    MemoryUsage m;
    for (const Layer& L : layers_) {
      for (std::size_t h = 0; h < cfg_.kv_heads; ++h) {
        const Head& hd = L.heads[h];
        m.codes += hd.key_codes.size_bytes() + hd.value_codes.size_bytes();
        m.window += (hd.recent_k.size() + hd.recent_v.size() + hd.recent_kr.size()) * sizeof(T);
        m.sinks += (hd.sink_k.size() + hd.sink_v.size() + hd.sink_kr.size()) * sizeof(T);
        m.codebooks += L.key_cb[h].size_bytes() + L.value_cb[h].size_bytes();
      }
    }
    return m;
  }

  /// Views of one (layer, head) for attend_head (valid until the next non-const call).
  KVHeadView<T> head_view(std::size_t layer, std::size_t head) const {
    const Layer& L = layer_at(layer, "head_view");
    const Head& hd = L.heads.at(head);
    const std::size_t D = cfg_.head_dim;
    KVHeadView<T> v;
    v.head_dim = D;
    v.key_codebook = L.key_cb[head].view();
    v.value_codebook = L.value_cb[head].view();
    v.key_codes = hd.key_codes.view();
    v.value_codes = hd.value_codes.view();
    const auto& sk = cfg_.pre_rope_keys ? hd.sink_kr : hd.sink_k;
    const auto& rk = cfg_.pre_rope_keys ? hd.recent_kr : hd.recent_k;
    v.sink_keys = ConstMatrixView<T>(sk.data(), sk.size() / D, D);
    v.sink_values = ConstMatrixView<T>(hd.sink_v.data(), hd.sink_v.size() / D, D);
    v.recent_keys = ConstMatrixView<T>(rk.data(), rk.size() / D, D);
    v.recent_values = ConstMatrixView<T>(hd.recent_v.data(), hd.recent_v.size() / D, D);
    v.recent_first = hd.recent_first;
    v.sinks = cfg_.sinks;
    v.window = cfg_.window;
    v.rope = cfg_.pre_rope_keys ? &cfg_.rope : nullptr;
    v.rope_inv_freq = cfg_.pre_rope_keys ? inv_freq_.data() : nullptr;
    return v;
  }

 private:
  struct Head {
    PackedCodes key_codes, value_codes;               // positions [S, size)
    detail::AlignedBuffer<T> sink_k, sink_v;          // (min(size, S), D)
    detail::AlignedBuffer<T> recent_k, recent_v;      // (rows, D), row r is position recent_first + r
    detail::AlignedBuffer<T> sink_kr, recent_kr;      // pre_rope_keys only: the same keys after RoPE
    std::size_t recent_first = 0;
  };
  struct Layer {
    std::vector<Codebook> key_cb, value_cb;
    std::vector<Head> heads;
    std::size_t size = 0;
  };

  const Layer& layer_at(std::size_t l, const char* what) const {
    CQ_CHECK(l < layers_.size(), what, ": layer ", l, " out of range (layers = ", layers_.size(), ")");
    return layers_[l];
  }
  Layer& layer_at(std::size_t l, const char* what) {
    CQ_CHECK(l < layers_.size(), what, ": layer ", l, " out of range (layers = ", layers_.size(), ")");
    return layers_[l];
  }
  /// First position of the full-precision window of a sequence of n tokens.
  std::size_t window_start(std::size_t n) const { return std::max(cfg_.sinks, n > cfg_.window ? n - cfg_.window : 0); }

  void append_rows(detail::AlignedBuffer<T>& buf, ConstMatrixView<T> rows) const {
    const std::size_t D = cfg_.head_dim, old = buf.size();
    buf.resize(old + rows.rows * D);
    for (std::size_t r = 0; r < rows.rows; ++r) std::memcpy(buf.data() + old + r * D, rows.row(r), D * sizeof(T));
  }
  /// Appends keys rotated to positions first, first + 1, ... (pre-RoPE caches' attention copy).
  void append_rotated(detail::AlignedBuffer<T>& buf, ConstMatrixView<T> rows, std::size_t first) const {
    const std::size_t D = cfg_.head_dim, old = buf.size();
    buf.resize(old + rows.rows * D);
    std::vector<float> tmp(D);
    for (std::size_t r = 0; r < rows.rows; ++r) {
      for (std::size_t i = 0; i < D; ++i) tmp[i] = to_float(rows(r, i));
      rope_rotate(cfg_.rope, inv_freq_.data(), D, first + r, tmp.data());
      for (std::size_t i = 0; i < D; ++i) buf[old + r * D + i] = from_float<T>(tmp[i]);
    }
  }
  /// Keeps the full-precision rows a query or a rollback can need: window + max_rollback, and all
  /// of the latest append (its queries' windows reach back into it). Drops older rows in bulk.
  void trim_recent(Head& hd, std::size_t appended) const {
    const std::size_t D = cfg_.head_dim;
    const std::size_t keep = cfg_.window + cfg_.max_rollback + appended;
    const std::size_t rows = hd.recent_k.size() / D;
    if (rows <= 2 * keep) return;  // amortise the move
    const std::size_t drop = rows - keep;
    std::memmove(hd.recent_k.data(), hd.recent_k.data() + drop * D, keep * D * sizeof(T));
    std::memmove(hd.recent_v.data(), hd.recent_v.data() + drop * D, keep * D * sizeof(T));
    hd.recent_k.resize(keep * D);
    hd.recent_v.resize(keep * D);
    if (cfg_.pre_rope_keys) {
      std::memmove(hd.recent_kr.data(), hd.recent_kr.data() + drop * D, keep * D * sizeof(T));
      hd.recent_kr.resize(keep * D);
    }
    hd.recent_first += drop;
  }

  KVCacheConfig cfg_;
  std::vector<double> inv_freq_;  // RoPE inverse frequencies (pre_rope_keys)
  std::vector<Layer> layers_;
};

}  // namespace cq
