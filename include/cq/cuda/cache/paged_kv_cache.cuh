#pragma once
/// cuda::PagedKVCache: cq's paged KV cache (cq/cache/paged_kv_cache.hpp) with its pages in device
/// memory — the cache an engine keeps on the GPU. The bookkeeping is the CPU cache's own
/// SequenceTable on the host (sequences, page tables, fork with copy-on-write, rollback, the rule
/// of which full-precision rows are kept); the pages have the CPU's layout (cache/layout.hpp), so
/// after the same calls the device pools hold, byte for byte, what the CPU cache's pools hold
/// (codes: ties between equidistant centroids aside), and a page copied between host and device
/// is valid on both sides.
///
///   append(layer, sequences, indptr, rows)  new K/V rows in device memory, [rows, kv_heads,
///                                            head_dim] with strides, in the cache's dtype: pages
///                                            planned on the host, then one upload (slot mapping,
///                                            page writes) and three launches (page writes,
///                                            encode_into_pages, write_full_rows)
///   attend(layer, sequences, queries)       decode: the last token of each sequence attends
///                                            (FusedAttention over the page tables); or the last
///                                            few tokens of each (speculative verification)
///   add_sequence / fork / free_sequence / truncate / reserve   as on the CPU
///
/// Everything runs on the stream given at construction, asynchronously: the host plans and
/// uploads, never waits for the device except when a pinned upload buffer is reused (four calls
/// later) or a buffer grows. Not capturable in a CUDA graph as a whole (each call uploads what the
/// host planned); engines that capture a step call encode_into_pages, write_full_rows and
/// FusedAttention::run themselves on the pools (code_pool, full_pool) with tables they keep in
/// device memory.
///
/// Not yet on the GPU: keys coded before RoPE (refused with cq::Error), and a prefill kernel (query
/// rows are served as decode rows, each reading its codes: right for a few draft tokens, slow for
/// a long chunk). Rows are not checked for NaN/Inf here (it would cost a synchronisation per
/// append); the CPU cache checks them.
///
/// Thread safety: one thread at a time (the host bookkeeping and the upload buffers are shared).

#include "cq/attention/problem.hpp"
#include "cq/cache/memory_plan.hpp"
#include "cq/cache/sequence_table.hpp"
#include "cq/cuda/attention.cuh"
#include "cq/cuda/cache/encode_pages.cuh"
#include "cq/cuda/cache/full_pages.cuh"
#include "cq/cuda/cache/page_ops.cuh"
#include "cq/cuda/cache/uploads.cuh"
#include "cq/cuda/codebook.cuh"
#include "cq/cuda/host_elements.cuh"
#include "cq/cuda/memory.cuh"
#include "cq/element.hpp"
#include "cq/error.hpp"
#include "cq/kv_codebooks.hpp"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

namespace cq::cuda {

/// One decode call's queries and outputs, device memory: q and out are [sequences, q_heads,
/// head_dim] in q_type / out_type (F32, F16 or BF16); lse (optional) [sequences, q_heads] floats,
/// the natural log of each row's sum of exp(score) (AttentionBatch::lse).
struct DecodeQueries {
  int q_heads = 0;
  const void* q = nullptr;
  DType q_type = DType::f32;
  void* out = nullptr;
  DType out_type = DType::f32;
  float* lse = nullptr;
  float scale = 0.0f;  // 0: 1 / sqrt(head_dim)
};

template <element_type T = half>
class PagedKVCache {
 public:
  using value_type = T;                       // the host type of the rows (the pools' bytes)
  using device_type = device_element_t<T>;    // the device type of the same bytes

  /// A cache over `codebooks` (kept by reference: it must outlive the cache; a layer's codebooks
  /// must be installed before it is appended to, and are copied to the device then) on `stream`.
  /// The pool is `device_pool` (engine-owned device memory, 64-byte aligned,
  /// MemoryPlan::pool_bytes(opt) bytes) or allocated here. opt.pool_memory must be empty (it names
  /// host memory). Throws cq::Error naming the option: pre-RoPE keys (not on the GPU yet), page
  /// sizes the kernels cannot address (page_tokens and full_page_rows must be powers of two), the
  /// checks of MemoryPlan and the CPU cache.
  PagedKVCache(const KVCodebooks& codebooks, const PagedCacheOptions& opt, cudaStream_t stream = nullptr,
               std::span<std::byte> device_pool = {})
      : cb_(&codebooks), stream_(stream), plan_(codebooks, opt, sizeof(T)),
        pool_(allocate_pool(plan_, opt, device_pool, stream)),
        table_(plan_, with_pool(opt, device_pool.empty() ? pool_span() : device_pool), codebooks.layers(), &ops_),
        layers_(codebooks.layers()) {
    CQ_CHECK(!opt.pre_rope_keys && codebooks.key_rope() == KeyRope::post,
             "cuda paged cache: keys coded before RoPE are not supported on the GPU yet (the cache needs post-RoPE "
             "keys and codebooks fitted on them; the codebooks' keys are ", key_rope_name(codebooks.key_rope()), ")");
    CQ_CHECK((opt.page_tokens & (opt.page_tokens - 1)) == 0, "cuda paged cache: page_tokens ", opt.page_tokens,
             " must be a power of two (the kernels address pages by shift and mask)");
    CQ_CHECK((opt.full_page_rows & (opt.full_page_rows - 1)) == 0, "cuda paged cache: full_page_rows ",
             opt.full_page_rows, " must be a power of two");
    for (std::size_t l = 0; l < layers_; ++l)  // what encode_into_pages serves, checked before any append
      for (const QuantSpec& q : {codebooks.spec(l).key, codebooks.spec(l).value})
        CQ_CHECK(q.channels == 1 || q.channels == 2 || q.channels == 4 || q.channels == 8 || q.channels == 16 ||
                     q.channels == 32,
                 "cuda paged cache: layer ", l, " has codebooks of ", q.channels,
                 " channels; the GPU encoder takes 1, 2, 4, 8, 16 or 32");
  }
  PagedKVCache(const PagedKVCache&) = delete;
  PagedKVCache& operator=(const PagedKVCache&) = delete;

  const KVCodebooks& codebooks() const { return *cb_; }
  const PagedCacheOptions& options() const { return table_.options(); }
  const MemoryPlan& plan() const { return plan_; }
  cudaStream_t stream() const { return stream_; }
  /// The host bookkeeping: each sequence's page tables and lengths (SequenceTable::at).
  const SequenceTable& table() const { return table_; }

  // ---- sequences (host bookkeeping; fork and truncate write no page) ----

  SeqId add_sequence(std::size_t first_position = 0) { return table_.add(first_position); }
  void free_sequence(SeqId s) { table_.free(s); }
  SeqId fork(SeqId s) { return table_.fork(s); }
  void truncate(SeqId s, std::size_t tokens) { table_.truncate(s, tokens); }
  bool live(SeqId s) const { return table_.live(s); }
  std::size_t live_sequences() const { return table_.live_sequences(); }
  std::size_t length(SeqId s, std::size_t layer = 0) const {
    check_layer(layer, "length");
    return table_.at(s, "length").length[layer];
  }
  /// Takes the pages `tokens` more tokens of sequence s need in every layer now (as the CPU
  /// cache's reserve). Throws if the pool cannot hold them (nothing taken).
  void reserve(SeqId s, std::size_t tokens) {
    const SequenceTable::Plan p = table_.plan_reserve(s, tokens, max_tokens);
    ops_.reserve(SequenceTable::pages_taken(p) * layers_);
    uploads_.reserve(SequenceTable::pages_taken(p) * layers_ * sizeof(detail::PageOp));
    table_.commit(s, p);
    if (!ops_.empty()) {
      const std::size_t bytes = ops_.ops().size() * sizeof(detail::PageOp);
      std::memcpy(uploads_.host(bytes), ops_.ops().data(), bytes);
      flush_page_ops();
    }
  }

  // ---- append ----

  /// Appends rows [indptr[i], indptr[i + 1]) of `rows` to seqs[i] in `layer` (distinct live
  /// sequences). All or nothing: every check (shapes, sequences, overflow, a full pool) and every
  /// page is planned on the host before anything is queued; a CUDA error after that leaves the
  /// bookkeeping committed and is thrown.
  void append(std::size_t layer, std::span<const SeqId> seqs, std::span<const std::size_t> indptr,
              const DeviceRows<device_type>& rows) {
    check_layer(layer, "append");
    const std::size_t H = cb_->kv_heads(), D = cb_->head_dim();
    SequenceTable::check_indptr(seqs, indptr, rows.rows, "append");
    CQ_CHECK(cb_->complete(layer), "append: layer ", layer, " has no codebooks yet (install them in the KVCodebooks)");
    if (rows.rows > 0) {
      CQ_CHECK(rows.keys && rows.values, "append: keys (", static_cast<const void*>(rows.keys), ") and values (",
               static_cast<const void*>(rows.values), ") must be device pointers");
      CQ_CHECK(rows.head_stride >= D || H == 1, "append: head_stride ", rows.head_stride, " is below head_dim ", D);
      CQ_CHECK(rows.row_stride >= D, "append: row_stride ", rows.row_stride, " is below head_dim ", D);
      CQ_CHECK(rows.rows <= 0x7fffffffu, "append: ", rows.rows, " rows exceed one launch (2^31 - 1)");
    }
    const LayerOnDevice& cbs = layer_codebooks(layer);  // before anything is committed: it may allocate
    const std::vector<SequenceTable::Plan> plans = table_.plan_append(layer, seqs, indptr, max_tokens, "append");
    std::size_t taken = 0;
    for (const SequenceTable::Plan& p : plans) taken += SequenceTable::pages_taken(p);
    ops_.reserve(taken * layers_);
    // Everything that could fail after the commits is allocated now.
    uploads_.reserve(taken * layers_ * sizeof(detail::PageOp) + 2 * rows.rows * sizeof(std::int64_t));
    std::vector<std::size_t> n0(seqs.size());
    for (std::size_t i = 0; i < seqs.size(); ++i) {
      n0[i] = table_.at(seqs[i], "append").length[layer];
      table_.commit(seqs[i], plans[i]);
    }
    // One upload: the page writes, then each row's code slot and full-precision row slot.
    const std::size_t n_ops = ops_.ops().size(), ops_bytes = n_ops * sizeof(detail::PageOp);
    const std::size_t code_at = ops_bytes, full_at = code_at + rows.rows * sizeof(std::int64_t);
    unsigned char* blob = uploads_.host(full_at + rows.rows * sizeof(std::int64_t));
    std::memcpy(blob, ops_.ops().data(), ops_bytes);
    auto* code_slots = reinterpret_cast<std::int64_t*>(blob + code_at);
    auto* full_slots = reinterpret_cast<std::int64_t*>(blob + full_at);
    const std::size_t S = options().sinks, P = options().page_tokens, F = options().full_page_rows;
    for (std::size_t i = 0; i < seqs.size(); ++i) {
      const SequenceTable::Sequence& q = table_.at(seqs[i], "append");
      for (std::size_t r = indptr[i]; r < indptr[i + 1]; ++r) {
        const std::size_t p = n0[i] + (r - indptr[i]);
        code_slots[r] = p < S ? -1 : std::int64_t(q.code[(p - S) / P]) * std::int64_t(P) + std::int64_t((p - S) % P);
        const std::size_t row = p < S ? p : p - q.recent_first;
        const std::uint32_t page = p < S ? q.sink[row / F] : q.recent[row / F];
        full_slots[r] = std::int64_t(page) * std::int64_t(F) + std::int64_t(row % F);
      }
    }
    for (std::size_t i = 0; i < seqs.size(); ++i) table_.finish_append(seqs[i], layer, plans[i]);
    unsigned char* dev = flush_page_ops();
    if (rows.rows == 0) return;
    const LayerSpec& spec = cb_->spec(layer);
    PagedEncode<device_type> pe;
    static_cast<SlotRows<device_type>&>(pe) = {rows, reinterpret_cast<const std::int64_t*>(dev + code_at)};
    pe.key_codebooks = cbs.key_views.data();
    pe.value_codebooks = cbs.value_views.data();
    pe.head_dim = int(D);
    pe.key_channels = int(spec.key.channels), pe.key_bits = spec.key.bits;
    pe.value_channels = int(spec.value.channels), pe.value_bits = spec.value.bits;
    pe.pool = reinterpret_cast<std::uint8_t*>(code_pool(layer));
    pe.layout = plan_.code_layout(layer);
    pe.pages = table_.code_pages().pages();
    encode_into_pages(pe, stream_);
    PagedRowWrite<device_type> pw;
    static_cast<SlotRows<device_type>&>(pw) = {rows, reinterpret_cast<const std::int64_t*>(dev + full_at)};
    pw.pool = reinterpret_cast<device_type*>(full_pool(layer));
    pw.layout = plan_.full_layout(layer);
    pw.pages = table_.full_pages().pages();
    write_full_rows(pw, stream_);
  }

  // ---- attention ----

  /// Decode attention in `layer`: the last token of each of seqs (non-empty, in this layer) attends
  /// to its sequence (sinks and window in full precision, the rest as codes), query head j reading
  /// KV head j / (q_heads / kv_heads). Queries and outputs [sequences, q_heads, head_dim] (in).
  /// Throws cq::Error, launching nothing, on a bad argument.
  void attend(std::size_t layer, std::span<const SeqId> seqs, const DecodeQueries& in) {
    std::vector<std::size_t> indptr(seqs.size() + 1);
    for (std::size_t i = 0; i < indptr.size(); ++i) indptr[i] = i;
    attend(layer, seqs, indptr, in);
  }
  /// Attention for the last indptr[i + 1] - indptr[i] tokens of seqs[i] (speculative verification:
  /// a few draft tokens per sequence), causal: row r of sequence i sits at position
  /// length - rows + (r - indptr[i]) and sees its own window, as on the CPU. Queries and outputs
  /// [rows, q_heads, head_dim] (in; lse [rows, q_heads]). Each row reads its sequence's codes
  /// itself, so the cost grows with the rows: meant for up to ~16 per sequence, not for prefill.
  /// Throws cq::Error, launching nothing, on a bad argument, or when a row's window rows are no
  /// longer kept (PagedCacheOptions::max_rollback).
  void attend(std::size_t layer, std::span<const SeqId> seqs, std::span<const std::size_t> indptr,
              const DecodeQueries& in) {
    check_layer(layer, "attend");
    const std::size_t H = cb_->kv_heads(), D = cb_->head_dim();
    CQ_CHECK(!seqs.empty(), "attend: no sequences");
    SequenceTable::check_indptr(seqs, indptr, indptr.empty() ? 0 : indptr.back(), "attend");
    const std::size_t R = indptr.back();
    CQ_CHECK(in.q_heads > 0 && std::size_t(in.q_heads) % H == 0, "attend: q_heads ", in.q_heads,
             " must be a positive multiple of kv_heads = ", H);
    CQ_CHECK(in.q && in.out, "attend: q (", in.q, ") and out (", in.out, ") must be device pointers");
    CQ_CHECK(R >= 1 && R <= 0x7fffffffu, "attend: ", R, " query rows (needs 1 to 2^31 - 1)");
    CQ_CHECK(std::isfinite(in.scale), "attend: scale ", in.scale, " is not finite");
    CQ_CHECK(cb_->complete(layer), "attend: layer ", layer, " has no codebooks yet");
    const std::size_t S = options().sinks, W = options().window;
    AttentionShape shape;
    shape.batch = int(R);
    shape.q_heads = in.q_heads;
    shape.kv_heads = int(H);
    shape.head_dim = int(D);
    const LayerSpec& spec = cb_->spec(layer);
    shape.key_channels = int(spec.key.channels), shape.key_bits = spec.key.bits;
    shape.value_channels = int(spec.value.channels), shape.value_bits = spec.value.bits;
    const LayerOnDevice& cbs = layer_codebooks(layer);
    std::vector<VisibleTokens> vis(R);  // per query row
    std::size_t table_entries = 1;      // one spare entry: tables of empty sequences point at it
    for (std::size_t i = 0; i < seqs.size(); ++i) {
      const SequenceTable::Sequence& q = table_.at(seqs[i], "attend");
      const std::size_t n = q.length[layer], rows = indptr[i + 1] - indptr[i];
      CQ_CHECK(rows <= n, "attend: ", rows, " query rows but sequence ", seqs[i], " holds ", n, " tokens in layer ",
               layer);
      for (std::size_t r = indptr[i]; r < indptr[i + 1]; ++r) {
        const std::size_t pos = n - rows + (r - indptr[i]);
        vis[r] = visible_tokens(pos, S, W);
        CQ_CHECK(vis[r].window() == 0 || vis[r].window_begin >= q.recent_first, "attend: the window of position ", pos,
                 " of sequence ", seqs[i], " starts at ", vis[r].window_begin, " but full precision is kept from ",
                 q.recent_first, " (raise max_rollback to attend this far back)");
        CQ_CHECK(vis[r].coded() <= 0x7fffffffu && vis[r].full() <= 0x7fffffffu, "attend: sequence ", seqs[i],
                 " is too long for the kernels (", n, " tokens)");
        shape.max_coded = std::max(shape.max_coded, int(vis[r].coded()));
        shape.max_full = std::max(shape.max_full, int(vis[r].full()));
      }
      table_entries += q.code.size() + q.sink.size() + q.recent.size();
    }
    // Plans are kept per shape: the longest coded range rounded up to a page, so consecutive
    // decode steps share one (a plan for longer sequences serves shorter ones).
    const std::size_t P = options().page_tokens;
    shape.max_coded = int(std::min<std::size_t>((std::size_t(shape.max_coded) + P - 1) / P * P, 0x7fffffffu));
    // One upload: per (row, KV head) the code runs, per row its record (rows of one sequence share
    // its page tables), then the tables.
    const std::size_t codes_at = 0, seqs_at = R * H * sizeof(DeviceKVCodes);
    const std::size_t tables_at = seqs_at + R * sizeof(DeviceSequence);
    unsigned char* blob = uploads_.host(tables_at + table_entries * sizeof(std::uint32_t));
    unsigned char* dev = uploads_.device_at(0);
    auto* codes = reinterpret_cast<DeviceKVCodes*>(blob + codes_at);
    auto* sequences = reinterpret_cast<DeviceSequence*>(blob + seqs_at);
    auto* tables = reinterpret_cast<std::uint32_t*>(blob + tables_at);
    std::size_t used = 1;  // tables[0]: the spare entry
    auto put_table = [&](const std::pmr::vector<std::uint32_t>& t) {
      if (t.empty()) return reinterpret_cast<const std::uint32_t*>(dev + tables_at);
      std::copy(t.begin(), t.end(), tables + used);
      const auto* at = reinterpret_cast<const std::uint32_t*>(dev + tables_at) + used;
      used += t.size();
      return at;
    };
    const CodePageLayout& cl = plan_.code_layout(layer);
    const auto* code_base = reinterpret_cast<const std::uint8_t*>(code_pool(layer));
    for (std::size_t i = 0; i < seqs.size(); ++i) {
      const SequenceTable::Sequence& q = table_.at(seqs[i], "attend");
      const std::uint32_t* code_table = put_table(q.code);
      const std::uint32_t* sink_table = put_table(q.sink);
      const std::uint32_t* recent_table = put_table(q.recent);
      for (std::size_t r = indptr[i]; r < indptr[i + 1]; ++r) {
        for (std::size_t h = 0; h < H; ++h) {
          DeviceKVCodes& c = codes[r * H + h];
          c.key_codes = code_base + cl.key_offset(h);
          c.value_codes = code_base + cl.value_offset(h);
          c.pages = code_table;
          c.page_bytes = cl.page_bytes();
        }
        DeviceSequence& s = sequences[r];
        s.coded = std::uint32_t(vis[r].coded());
        s.full = std::uint32_t(vis[r].full());
        s.sink_pages = sink_table;
        s.recent_pages = recent_table;
        s.sinks = std::uint32_t(vis[r].sink_end);
        s.recent_row = vis[r].window() > 0 ? std::uint32_t(vis[r].window_begin - q.recent_first) : 0;
      }
    }
    AttentionBatch batch;
    batch.batch = shape.batch, batch.q_heads = shape.q_heads, batch.kv_heads = shape.kv_heads;
    batch.head_dim = shape.head_dim;
    batch.codes = reinterpret_cast<const DeviceKVCodes*>(dev + codes_at);
    batch.sequences = reinterpret_cast<const DeviceSequence*>(dev + seqs_at);
    batch.key_codebooks = cbs.key_views.data();
    batch.value_codebooks = cbs.value_views.data();
    batch.q = in.q, batch.q_type = in.q_type;
    batch.out = in.out, batch.out_type = in.out_type;
    batch.lse = in.lse;
    batch.scale = in.scale;
    batch.full_pages = {full_pool(layer), dtype_of<T>, std::uint32_t(options().full_page_rows),
                        plan_.full_layout(layer).page_bytes()};
    batch.page_tokens = int(P);
    const AttentionPlan& p = plan_for(shape);  // may grow the workspace: before the upload is queued
    uploads_.send(stream_);
    attention_.run(batch, p, stream_);
  }

  // ---- pools and memory ----

  /// Layer `layer`'s code pages (device memory): page p at code_pool(layer) + p x
  /// plan().code_layout(layer).page_bytes().
  std::byte* code_pool(std::size_t layer) const { return table_.code_pages().layer_base(layer); }
  /// Layer `layer`'s full-precision pages (device memory), plan().full_layout(layer).page_bytes() apart.
  std::byte* full_pool(std::size_t layer) const { return table_.full_pages().layer_base(layer); }
  /// The whole pool (device memory): code pages of every layer, then full-precision pages (the
  /// layout of PagedCacheOptions::pool_memory).
  std::span<std::byte> pool() const {
    return {table_.code_pages().layer_base(0), plan_.pool_bytes(options())};
  }

  /// Bytes by part, as the CPU cache's memory(): codes and full are device memory (the pool),
  /// codebooks the host KVCodebooks (their device copies: device_codebook_bytes()), tables host.
  MemoryUsage memory() const {
    return table_.memory(cb_->memory());
  }
  /// Device bytes of the codebooks copied so far (layers appended to or attended).
  std::size_t device_codebook_bytes() const {
    std::size_t b = 0;
    for (const auto& l : device_codebooks_)
      if (l)
        for (std::size_t h = 0; h < l->keys.size(); ++h) b += l->keys[h].bytes() + l->values[h].bytes();
    return b;
  }

 private:
  static constexpr std::size_t max_tokens = std::size_t{1} << 40;

  /// A layer's codebooks on the device, and the views kernels take ([kv_heads] each).
  struct LayerOnDevice {
    std::vector<DeviceCodebook> keys, values;
    DeviceBuffer<DeviceCodebookView> key_views, value_views;
  };

  static DeviceBuffer<std::byte> allocate_pool(const MemoryPlan& plan, const PagedCacheOptions& opt,
                                               std::span<std::byte> device_pool, cudaStream_t stream) {
    CQ_CHECK(opt.pool_memory.empty(), "cuda paged cache: pool_memory names host memory; pass device memory as ",
             "the device_pool argument");
    const std::size_t bytes = plan.pool_bytes(opt);
    if (!device_pool.empty()) {
      CQ_CHECK(device_pool.size() >= bytes, "cuda paged cache: the engine's device pool holds ", device_pool.size(),
               " bytes, the pool needs ", bytes);
      return {};
    }
    DeviceBuffer<std::byte> pool(bytes);
    pool.fill_zero(stream);  // pages are zeroed when taken; this keeps the never-taken ones defined too
    return pool;
  }
  std::span<std::byte> pool_span() { return {pool_.data(), pool_.size()}; }
  static PagedCacheOptions with_pool(PagedCacheOptions o, std::span<std::byte> pool) {
    o.pool_memory = pool;
    return o;
  }

  void check_layer(std::size_t layer, const char* what) const {
    CQ_CHECK(layer < layers_, what, ": layer ", layer, " out of range (layers = ", layers_, ")");
  }

  const LayerOnDevice& layer_codebooks(std::size_t layer) {
    if (device_codebooks_.empty()) device_codebooks_.resize(layers_);
    std::unique_ptr<LayerOnDevice>& l = device_codebooks_[layer];
    if (!l) {
      auto fresh = std::make_unique<LayerOnDevice>();
      std::vector<DeviceCodebookView> kv, vv;
      for (std::size_t h = 0; h < cb_->kv_heads(); ++h) {
        fresh->keys.emplace_back(cb_->key(layer, h), stream_);
        fresh->values.emplace_back(cb_->value(layer, h), stream_);
        kv.push_back(fresh->keys.back().view());
        vv.push_back(fresh->values.back().view());
      }
      fresh->key_views = DeviceBuffer<DeviceCodebookView>(kv, stream_);
      fresh->value_views = DeviceBuffer<DeviceCodebookView>(vv, stream_);
      CQ_CUDA_CHECK(cudaStreamSynchronize(stream_));  // the host vectors above leave scope
      l = std::move(fresh);
    }
    return *l;
  }

  /// Sends the upload whose host buffer the caller filled (the queued page writes first) and
  /// launches the page writes; returns the upload's device address. The queue is emptied even when
  /// this throws, so a failed call never replays its writes into a later one.
  unsigned char* flush_page_ops() {
    try {
      unsigned char* dev = uploads_.device_at(0);
      uploads_.send(stream_);
      ops_.launch(reinterpret_cast<const detail::PageOp*>(dev), stream_);
      return dev;
    } catch (...) {
      ops_.clear();
      throw;
    }
  }

  const AttentionPlan& plan_for(const AttentionShape& s) {
    for (const auto& [shape, plan] : plans_)
      if (shape == s) return plan;
    if (plans_.size() == 16) plans_.erase(plans_.begin());
    plans_.emplace_back(s, attention_.plan(s));
    return plans_.back().second;
  }

  const KVCodebooks* cb_;
  cudaStream_t stream_;
  MemoryPlan plan_;
  DevicePageOps ops_;               // before table_: the table's page sets write through it
  DeviceBuffer<std::byte> pool_;    // empty when the engine supplied the pool
  SequenceTable table_;
  std::size_t layers_;
  Uploads uploads_;
  FusedAttention attention_;
  std::vector<std::pair<AttentionShape, AttentionPlan>> plans_;
  std::vector<std::unique_ptr<LayerOnDevice>> device_codebooks_;
};

}  // namespace cq::cuda
