#pragma once
/// PagedKVCache: a model's KV cache for many sequences in fixed-size pages, the shape engines
/// keep KV memory in (vLLM's block tables, SGLang's token pool, llama.cpp's sequence ids), stored
/// as CQ codes and answering attention on them.
///
///   KVCodebooks (shared, counted once) -> PagedKVCache (one pool of pages, sized once)
///   add_sequence / fork (prefix sharing, copy-on-write) / free_sequence
///   append(layer, sequences, rows)   a chunk or one token per sequence; rows leaving nothing:
///                                    every row past the sinks is coded, the recent ones also
///                                    kept in full precision (sequence_table.hpp says how long)
///   attend(layer, sequences, queries) decode, several queries (speculative), or a chunk (prefill):
///                                    causal within the rows, each row's own window
///   truncate(sequence, n)            rollback (speculative decoding)
///
/// Keys are appended as the model has them: after RoPE (post-RoPE codebooks), or before it
/// (pre_rope_keys, pre-RoPE codebooks): then every key is rotated inside attention, token t to
/// position t + the sequence's first position. Memory: MemoryPlan sizes the pool; memory() reports
/// what is allocated and what sequences hold, by part.
///
/// Thread safety: const member functions may run concurrently; the others need exclusive access.

#include "cq/attention.hpp"
#include "cq/backend/native.hpp"
#include "cq/cache/memory_plan.hpp"
#include "cq/cache/sequence_table.hpp"
#include "cq/element.hpp"
#include "cq/error.hpp"
#include "cq/kv_codebooks.hpp"
#include "cq/quantizer.hpp"

#include <cmath>
#include <cstring>
#include <optional>
#include <span>
#include <vector>

namespace cq {

template <element_type T = float, class Backend = backend::Native>
class PagedKVCache {
 public:
  using value_type = T;

  /// A cache over `codebooks` (kept by reference: it must outlive the cache; every codebook must be
  /// installed before a layer is appended to). Throws cq::Error naming the option or the mismatch
  /// between the options' RoPE settings and those the key codebooks were fitted with.
  PagedKVCache(const KVCodebooks& codebooks, const PagedCacheOptions& opt)
      : cb_(&codebooks), plan_(codebooks, opt, sizeof(T)), table_(plan_, opt, codebooks.layers()) {
    rope_ = cache_key_rope(codebooks, opt, "paged cache");
  }
  PagedKVCache(const PagedKVCache&) = delete;
  PagedKVCache& operator=(const PagedKVCache&) = delete;

  const KVCodebooks& codebooks() const { return *cb_; }
  const PagedCacheOptions& options() const { return table_.options(); }
  const MemoryPlan& plan() const { return plan_; }

  // ---- sequences ----

  /// A new, empty sequence whose token 0 sits at RoPE position `first_position`.
  SeqId add_sequence(std::size_t first_position = 0) { return table_.add(first_position); }
  /// Releases a sequence's pages (those no fork shares go back to the pool).
  void free_sequence(SeqId s) { table_.free(s); }
  /// A new sequence with the same tokens, sharing their pages until either side writes (prefix
  /// caching, parallel sampling).
  SeqId fork(SeqId s) { return table_.fork(s); }
  bool live(SeqId s) const { return table_.live(s); }
  std::size_t live_sequences() const { return table_.live_sequences(); }
  /// Tokens of sequence s in `layer`.
  std::size_t length(SeqId s, std::size_t layer = 0) const {
    check_layer(layer, "length");
    return table_.at(s, "length").length[layer];
  }
  /// Takes the pages `tokens` more tokens of sequence s need in every layer now, so the appends
  /// of a step cannot fail for a full pool halfway through the layers. Throws if the pool cannot
  /// hold them (nothing taken).
  void reserve(SeqId s, std::size_t tokens) { table_.commit(s, table_.plan_reserve(s, tokens, max_tokens)); }

  /// Pages (code, full-precision) an append of `tokens` rows to sequence s in `layer` would take
  /// from the pool's free lists now.
  std::pair<std::size_t, std::size_t> pages_for_append(std::size_t layer, SeqId s, std::size_t tokens) {
    check_layer(layer, "pages_for_append");
    const auto& q = table_.at(s, "pages_for_append");
    const std::size_t n0 = q.length[layer];
    CQ_CHECK(tokens <= max_tokens - n0, "pages_for_append: ", tokens, " tokens overflow sequence ", s);
    const SequenceTable::Plan p = table_.plan_write(s, n0, n0 + tokens, table_.keep_bound(q, layer, n0), "append");
    return {p.code_take, p.full_take};
  }

  // ---- append ----

  /// Appends rows to sequence s in `layer`: keys and values are (tokens, kv_heads * head_dim),
  /// head h in columns [h * head_dim, (h + 1) * head_dim). `positions` (optional, one per row)
  /// must continue the sequence: first_position + length, + 1, ... On any error nothing changes.
  void append(std::size_t layer, SeqId s, ConstMatrixView<T> keys, ConstMatrixView<T> values,
              const std::size_t* positions = nullptr) {
    const std::size_t indptr[2] = {0, keys.rows};
    append(layer, std::span<const SeqId>(&s, 1), std::span<const std::size_t>(indptr, 2), keys, values, positions);
  }
  /// Batched append: rows [indptr[i], indptr[i + 1]) of keys/values (and positions) go to seqs[i]
  /// (distinct sequences). All or nothing.
  void append(std::size_t layer, std::span<const SeqId> seqs, std::span<const std::size_t> indptr,
              ConstMatrixView<T> keys, ConstMatrixView<T> values, const std::size_t* positions = nullptr) {
    check_layer(layer, "append");
    const std::size_t width = cb_->kv_heads() * cb_->head_dim();
    check_view(keys, "append: keys");
    check_view(values, "append: values");
    CQ_CHECK(keys.cols == width && values.cols == width && values.rows == keys.rows, "append: keys are ", keys.rows,
             " x ", keys.cols, " and values ", values.rows, " x ", values.cols,
             "; both must be tokens x (kv_heads * head_dim) = tokens x ", width);
    SequenceTable::check_indptr(seqs, indptr, keys.rows, "append");
    CQ_CHECK(cb_->complete(layer), "append: layer ", layer, " has no codebooks yet (install them in the KVCodebooks)");
    detail::check_finite_rows(keys, "append: keys");
    detail::check_finite_rows(values, "append: values");
    table_.check_append(layer, seqs, indptr, max_tokens, "append");
    if (positions)
      for (std::size_t i = 0; i < seqs.size(); ++i) {
        const auto& q = table_.at(seqs[i], "append");
        const std::size_t n0 = q.length[layer];
        for (std::size_t r = 0; r < indptr[i + 1] - indptr[i]; ++r) {
          const std::size_t want = q.position_offset + n0 + r, got = positions[indptr[i] + r];
          CQ_CHECK(got == want, "append: row ", indptr[i] + r, " of sequence ", seqs[i], " has position ", got,
                   got < want ? " (positions go backwards; " : " (positions skip; ", "the next position is ", want, ")");
        }
      }
    // Every sequence's pages are planned before any is taken: the pool must hold them all.
    const std::vector<SequenceTable::Plan> plans = table_.plan_append(layer, seqs, indptr, max_tokens, "append");
    for (std::size_t i = 0; i < seqs.size(); ++i) {
      const std::size_t n0 = table_.at(seqs[i], "append").length[layer];
      table_.commit(seqs[i], plans[i]);
      write_rows(layer, seqs[i], n0, keys.middle_rows(indptr[i], indptr[i + 1] - indptr[i]),
                 values.middle_rows(indptr[i], indptr[i + 1] - indptr[i]));
      table_.finish_append(seqs[i], layer, plans[i]);
    }
  }

  // ---- attention ----

  /// Attention for the last q.rows tokens of sequence s in `layer` (row i at position
  /// length - q.rows + i, causal). q and out are (rows, q_heads * head_dim); q_heads must be a
  /// multiple of kv_heads, query head j reading KV head j / (q_heads / kv_heads) (GQA).
  void attend(std::size_t layer, SeqId s, ConstMatrixView<float> q, MatrixView<float> out,
              const AttendOptions& opt = {}) const {
    const std::size_t indptr[2] = {0, q.rows};
    attend(layer, std::span<const SeqId>(&s, 1), std::span<const std::size_t>(indptr, 2), q, out, opt);
  }
  /// Batched attention: rows [indptr[i], indptr[i + 1]) of q (and out) are the last queries of
  /// seqs[i]. Work is spread over the executor across sequences, heads and long ranges.
  void attend(std::size_t layer, std::span<const SeqId> seqs, std::span<const std::size_t> indptr,
              ConstMatrixView<float> q, MatrixView<float> out, const AttendOptions& opt = {}) const {
    check_layer(layer, "attend");
    const std::size_t D = cb_->head_dim(), H = cb_->kv_heads();
    check_view(q, "attend: q");
    check_view(out, "attend: out");
    CQ_CHECK(q.cols > 0 && q.cols % D == 0 && (q.cols / D) % H == 0, "attend: q has ", q.cols,
             " columns; it needs q_heads * head_dim with q_heads a multiple of kv_heads = ", H);
    CQ_CHECK(out.rows == q.rows && out.cols == q.cols, "attend: out is ", out.rows, " x ", out.cols, ", q is ", q.rows,
             " x ", q.cols);
    SequenceTable::check_indptr(seqs, indptr, q.rows, "attend");
    CQ_CHECK(cb_->complete(layer), "attend: layer ", layer, " has no codebooks yet");
    const float scale = detail::resolve_scale(opt.scale, D, "attend");
    const std::size_t group = q.cols / D / H;
    std::vector<KVHeadView<T>> views;
    views.reserve(seqs.size() * H);
    std::vector<AttentionItem<T>> items;
    items.reserve(q.rows * H);
    for (std::size_t i = 0; i < seqs.size(); ++i) {
      const std::size_t n = length(seqs[i], layer), rows = indptr[i + 1] - indptr[i];
      CQ_CHECK(rows <= n, "attend: ", rows, " query rows but sequence ", seqs[i], " holds ", n, " tokens in layer ",
               layer);
      for (std::size_t h = 0; h < H; ++h) views.push_back(head_view(layer, seqs[i], h));
      for (std::size_t r = 0; r < rows; ++r)
        for (std::size_t h = 0; h < H; ++h) {
          const std::size_t row = indptr[i] + r;
          items.push_back({&views[i * H + h], q.row(row) + h * group * D, group, query_position(n, rows, r),
                           out.row(row) + h * group * D});
        }
    }
    attend_items<Backend, T>(items, Scoring(scale, opt.logits_soft_cap), opt.method, opt.executor);
  }

  // ---- rollback ----

  /// Rolls sequence s back to `tokens` tokens in every layer (speculative decoding). Always
  /// possible for at most the last append plus max_rollback tokens; deeper while the new window's
  /// rows are still kept, and always when only sinks remain. Otherwise throws, nothing changed.
  void truncate(SeqId s, std::size_t tokens) { table_.truncate(s, tokens); }

  // ---- inspection ----

  /// The key and value of one token as attention sees it now (full precision inside the sinks and
  /// the current window, decoded from codes elsewhere), as floats; keys as appended.
  void read_token(std::size_t layer, SeqId s, std::size_t head, std::size_t position, float* key, float* value) const {
    check_layer(layer, "read_token");
    const std::size_t n = length(s, layer), D = cb_->head_dim();
    CQ_CHECK(head < cb_->kv_heads() && position < n, "read_token: (head ", head, ", position ", position, ") outside ",
             cb_->kv_heads(), " heads x ", n, " tokens");
    const KVHeadView<T> v = head_view(layer, s, head);
    const VisibleTokens vis = visible_tokens(n - 1, v.sinks, v.window);
    if (position < vis.sink_end || position >= vis.window_begin) {
      const bool sink = position < vis.sink_end;
      detail::row_to_float(sink ? v.sink_keys.at(position) : v.recent_keys.at(position), D, key);
      detail::row_to_float(sink ? v.sink_values.at(position) : v.recent_values.at(position), D, value);
      return;
    }
    const std::size_t c = position - v.sinks;
    auto decode = [&](const CodebookView& cb, const PagedCodesView& codes, float* out) {
      decode_rows<Backend>(cb, codes.page(c / codes.page_tokens), c % codes.page_tokens, MatrixView<float>(out, 1, D));
    };
    decode(v.key_codebook, v.key_codes, key);
    decode(v.value_codebook, v.value_codes, value);
  }

  /// What attention reads of (layer, sequence s, KV head): views into the pool, valid until the
  /// next non-const call.
  KVHeadView<T> head_view(std::size_t layer, SeqId s, std::size_t head) const {
    check_layer(layer, "head_view");
    const auto& q = table_.at(s, "head_view");
    CQ_CHECK(head < cb_->kv_heads(), "head_view: KV head ", head, " out of range (kv_heads = ", cb_->kv_heads(), ")");
    const std::size_t n = q.length[layer], S = options().sinks, D = cb_->head_dim();
    const CodePageLayout& cl = plan_.code_layout(layer);
    const FullPageLayout& fl = plan_.full_layout(layer);
    KVHeadView<T> v;
    v.head_dim = D;
    v.key_codebook = cb_->key(layer, head).view();
    v.value_codebook = cb_->value(layer, head).view();
    auto codes = [&](const CodebookView& cb, std::size_t offset) {
      PagedCodesView c;
      c.pool = reinterpret_cast<const std::uint8_t*>(table_.code_pages().layer_base(layer));
      c.page_bytes = cl.page_bytes();
      c.offset = offset;
      c.pages = q.code.data();
      c.page_tokens = cl.page_tokens;
      c.tokens = n > S ? n - S : 0;
      c.groups = cb.groups;
      c.bits = cb.bits;
      return c;
    };
    v.key_codes = codes(v.key_codebook, cl.key_offset(head));
    v.value_codes = codes(v.value_codebook, cl.value_offset(head));
    const T* full = reinterpret_cast<const T*>(table_.full_pages().layer_base(layer));
    auto rows = [&](const std::pmr::vector<std::uint32_t>& pages, std::size_t offset, std::size_t first,
                    std::size_t count) {
      PagedRowsView<T> r;
      r.pool = full;
      r.page_stride = fl.page_elements();
      r.offset = offset;
      r.pages = pages.data();
      r.page_rows = fl.page_rows;
      r.row_stride = D;
      r.dim = D;
      r.first = first;
      r.rows = count;
      return r;
    };
    const std::size_t sinks = std::min(n, S), recent = n > q.recent_first ? n - q.recent_first : 0;
    v.sink_keys = rows(q.sink, fl.key_offset(head), 0, sinks);
    v.sink_values = rows(q.sink, fl.value_offset(head), 0, sinks);
    v.recent_keys = rows(q.recent, fl.key_offset(head), q.recent_first, recent);
    v.recent_values = rows(q.recent, fl.value_offset(head), q.recent_first, recent);
    v.sinks = S;
    v.window = options().window;
    v.rope = rope_ ? &*rope_ : nullptr;
    v.position_offset = q.position_offset;
    return v;
  }

  /// Bytes by part: codes and full-precision rows (the pools, allocated; and what sequences hold),
  /// codebooks (the shared KVCodebooks, once), tables (page tables, sequence records, page
  /// bookkeeping). codes + full + tables is what the cache took from its memory resource (pools
  /// supplied by the engine aside), a few bytes per layer of fixed descriptors aside.
  MemoryUsage memory() const {
    return table_.memory(cb_->memory());
  }

  /// More pages for the pool (page contents and ids kept; pools the cache allocated only). For
  /// caches that grow on demand; engines size the pool once.
  void grow(std::size_t code_pages, std::size_t full_pages) {
    table_.code_pages().grow(code_pages);
    table_.full_pages().grow(full_pages);
  }

 private:
  static constexpr std::size_t max_tokens = std::size_t{1} << 40;

  void check_layer(std::size_t layer, const char* what) const {
    CQ_CHECK(layer < cb_->layers(), what, ": layer ", layer, " out of range (layers = ", cb_->layers(), ")");
  }
  /// Writes rows [n0, n0 + m) of sequence s in `layer`: sinks to sink pages; every later row coded
  /// into the code pages and copied into the recent pages. The pages exist and are the sequence's
  /// own (committed plan); cannot fail.
  void write_rows(std::size_t layer, SeqId s, std::size_t n0, ConstMatrixView<T> keys, ConstMatrixView<T> values) {
    const auto& q = table_.at(s, "append");
    const std::size_t D = cb_->head_dim(), S = options().sinks, n1 = n0 + keys.rows;
    const CodePageLayout& cl = plan_.code_layout(layer);
    const FullPageLayout& fl = plan_.full_layout(layer);
    const std::size_t P = cl.page_tokens, F = fl.page_rows;
    T* full = reinterpret_cast<T*>(table_.full_pages().layer_base(layer));
    std::uint8_t* code = reinterpret_cast<std::uint8_t*>(table_.code_pages().layer_base(layer));
    auto put_row = [&](const std::pmr::vector<std::uint32_t>& pages, std::size_t index, std::size_t head,
                       std::size_t r) {
      T* page = full + std::size_t(pages[index / F]) * fl.page_elements();
      std::memcpy(page + fl.key_offset(head) + (index % F) * D, keys.row(r) + head * D, D * sizeof(T));
      std::memcpy(page + fl.value_offset(head) + (index % F) * D, values.row(r) + head * D, D * sizeof(T));
    };
    for (std::size_t p = n0; p < std::min(n1, S); ++p)
      for (std::size_t h = 0; h < cb_->kv_heads(); ++h) put_row(q.sink, p, h, p - n0);
    for (std::size_t p = std::max(n0, S); p < n1; ++p)
      for (std::size_t h = 0; h < cb_->kv_heads(); ++h) put_row(q.recent, p - q.recent_first, h, p - n0);
    // Codes, in runs that stay inside one page.
    for (std::size_t p = std::max(n0, S); p < n1;) {
      const std::size_t c = p - S, in_page = c % P, take = std::min(n1 - p, P - in_page);
      std::uint8_t* page = code + std::size_t(q.code[c / P]) * cl.page_bytes();
      for (std::size_t h = 0; h < cb_->kv_heads(); ++h) {
        const Codebook &kc = cb_->key(layer, h), &vc = cb_->value(layer, h);
        encode_rows<Backend>(kc.view(), keys.middle_rows(p - n0, take).middle_cols(h * D, D),
                             PackedCodesView(page + cl.key_offset(h), P, kc.groups(), kc.bits()), in_page);
        encode_rows<Backend>(vc.view(), values.middle_rows(p - n0, take).middle_cols(h * D, D),
                             PackedCodesView(page + cl.value_offset(h), P, vc.groups(), vc.bits()), in_page);
      }
      p += take;
    }
  }

  const KVCodebooks* cb_;
  MemoryPlan plan_;
  SequenceTable table_;
  std::optional<Rope> rope_;
};

}  // namespace cq
