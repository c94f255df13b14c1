#pragma once
/// KVCache: one sequence with its own codebooks, the convenience face of PagedKVCache for
/// programs that decode one stream (examples, tools, tests). It owns a KVCodebooks and a
/// PagedKVCache holding one sequence, and grows its pool as the sequence grows. Engines serving
/// many sequences use KVCodebooks and PagedKVCache directly (cache/paged_kv_cache.hpp).
///
/// Thread safety: const member functions (attend, read_token, memory, size) may run concurrently
/// with each other; append, truncate, clear and set_codebooks need exclusive access.

#include "cq/cache/paged_kv_cache.hpp"
#include "cq/kv_codebooks.hpp"

#include <memory>
#include <vector>

namespace cq {

struct KVCacheConfig {
  std::size_t layers = 1;
  std::size_t kv_heads = 1;
  std::size_t head_dim = 128;
  LayerSpec spec;                      // every layer's configuration...
  std::vector<LayerSpec> layer_specs;  // ...or one per layer (then size() == layers)
  std::size_t window = 32;             // W: most recent tokens kept in full precision
  std::size_t sinks = 0;               // S: first tokens kept in full precision
  std::size_t capacity = 0;            // tokens per layer; 0 = grow as needed
  std::size_t max_rollback = 64;       // rollback beyond the last append truncate() always honours
  bool pre_rope_keys = false;          // keys arrive (and are coded) before RoPE
  RopeConfig rope;                     // used when pre_rope_keys
  std::size_t page_tokens = 256;       // see PagedCacheOptions
  std::size_t full_page_rows = 8;

  const LayerSpec& layer_spec(std::size_t l) const { return layer_specs.empty() ? spec : layer_specs[l]; }
};

template <element_type T = float, class Backend = backend::Native>
class KVCache {
 public:
  using value_type = T;

  explicit KVCache(KVCacheConfig cfg)
      : cfg_(std::move(cfg)),
        codebooks_(std::make_unique<KVCodebooks>(
            cfg_.layers, cfg_.kv_heads, cfg_.head_dim,
            cfg_.layer_specs.empty() ? std::vector<LayerSpec>{cfg_.spec} : cfg_.layer_specs,
            cfg_.pre_rope_keys ? KeyRope::pre : KeyRope::post, cfg_.rope)),
        cache_(std::make_unique<PagedKVCache<T, Backend>>(*codebooks_, options(cfg_))),
        seq_(cache_->add_sequence()) {}

  const KVCacheConfig& config() const { return cfg_; }
  std::size_t size(std::size_t layer = 0) const { return cache_->length(seq_, layer); }

  /// Installs the codebooks of (layer, head); their shapes must match the layer's configuration.
  void set_codebooks(std::size_t layer, std::size_t head, Codebook key, Codebook value) {
    codebooks_->set(layer, head, std::move(key), std::move(value));
  }
  const Codebook& key_codebook(std::size_t layer, std::size_t head) const { return codebooks_->key(layer, head); }
  const Codebook& value_codebook(std::size_t layer, std::size_t head) const { return codebooks_->value(layer, head); }
  bool has_codebooks(std::size_t layer) const { return codebooks_->complete(layer); }
  const KVCodebooks& codebooks() const { return *codebooks_; }

  /// Appends tokens to one layer: keys and values are (tokens, kv_heads * head_dim). On any error
  /// nothing is appended.
  void append(std::size_t layer, ConstMatrixView<T> keys, ConstMatrixView<T> values) {
    const std::size_t n = layer < cfg_.layers ? size(layer) : 0;
    CQ_CHECK(cfg_.capacity == 0 || keys.rows <= cfg_.capacity - std::min(n, cfg_.capacity), "append: the cache is full: layer ",
             layer, " holds ", n, " of ", cfg_.capacity, " tokens and cannot take ", keys.rows, " more");
    // Grow the pool first (geometrically): the append itself then takes pages without failing.
    if (layer < cfg_.layers) {
      const auto [code, full] = cache_->pages_for_append(layer, seq_, keys.rows);
      const MemoryUsage m = cache_->memory();
      const MemoryPlan& plan = cache_->plan();
      const std::size_t have_code = m.codes / plan.code_page_bytes(), have_full = m.full / plan.full_page_bytes();
      const std::size_t free_code = (m.codes - m.codes_in_use) / plan.code_page_bytes();
      const std::size_t free_full = (m.full - m.full_in_use) / plan.full_page_bytes();
      if (code > free_code || full > free_full)
        cache_->grow(code > free_code ? std::max(have_code + code - free_code, 2 * have_code) : have_code,
                     full > free_full ? std::max(have_full + full - free_full, 2 * have_full) : have_full);
    }
    cache_->append(layer, seq_, keys, values);
  }

  /// Attention for the last q.rows tokens of `layer` (causal: row i is at position
  /// size - q.rows + i). q and out are (rows, q_heads * head_dim); GQA.
  void attend(std::size_t layer, ConstMatrixView<float> q, MatrixView<float> out, const AttendOptions& opt = {}) const {
    cache_->attend(layer, seq_, q, out, opt);
  }

  /// Rolls every layer back to `tokens` tokens (see PagedKVCache::truncate).
  void truncate(std::size_t tokens) { cache_->truncate(seq_, tokens); }
  void clear() { truncate(0); }

  /// The key and value of one cached token as attention sees it now, as floats.
  void read_token(std::size_t layer, std::size_t head, std::size_t position, float* key, float* value) const {
    cache_->read_token(layer, seq_, head, position, key, value);
  }
  /// Bytes by part (the pool as allocated, the codebooks this cache owns).
  MemoryUsage memory() const { return cache_->memory(); }
  /// Views of one (layer, head) for attend_head (valid until the next non-const call).
  KVHeadView<T> head_view(std::size_t layer, std::size_t head) const { return cache_->head_view(layer, seq_, head); }

 private:
  static PagedCacheOptions options(const KVCacheConfig& c) {
    PagedCacheOptions o;
    o.page_tokens = c.page_tokens;
    o.full_page_rows = c.full_page_rows;
    o.window = c.window;
    o.sinks = c.sinks;
    o.max_rollback = c.max_rollback;
    o.max_sequences = 1;
    o.pre_rope_keys = c.pre_rope_keys;
    o.rope = c.rope;
    return o;
  }

  KVCacheConfig cfg_;
  std::unique_ptr<KVCodebooks> codebooks_;
  std::unique_ptr<PagedKVCache<T, Backend>> cache_;
  SeqId seq_;
};

}  // namespace cq
