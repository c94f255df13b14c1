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
///   begin_decode_step(sequences, max_context), then per layer append_step / attend_step
///                                            a decode step for a CUDA graph: the host work once per
///                                            step, the per-layer calls only launch
///
/// Everything runs on the stream given at construction, asynchronously: the host plans and
/// uploads, never waits for the device except when a pinned upload buffer is reused (eight calls
/// later) or a buffer grows. append and attend upload what the host planned, so they are not
/// capturable; append_step and attend_step are (one live graph per cache: see begin_decode_step).
///
/// Keys are appended as the model has them: after RoPE (post-RoPE codebooks), or before it
/// (pre_rope_keys, pre-RoPE codebooks: the CQ paper's configuration): then attention rotates every
/// key, coded or full-precision, to token t's position t + the sequence's first position, inside
/// the grouped-rows kernel (which then serves every group size up to 16 query heads per KV head,
/// checked by attend; it needs 8-bit codes of 2, 4 or 8 channels alike for keys and values at
/// head_dim 128, and rotate_half over every channel or interleaved pairs: checked at construction).
///
///   attend_prefill(layer, sequences, indptr, chunk)   chunked prefill: a chunk of new tokens per
///                                            sequence over its cached tokens and, causally, the
///                                            chunk's own rows (before appending them)
///
/// Rows are not checked for NaN/Inf
/// here (it would cost a synchronisation per append); the CPU cache checks them.
///
/// Thread safety: one thread at a time (the host bookkeeping and the upload buffers are shared).

// cq's host headers bring Eigen's element types, whose defaulted __host__ __device__ members nvcc
// warns about (Eigen's code, not used on the device here).
#pragma nv_diag_suppress 20012
#include "cq/attention/problem.hpp"
#include "cq/cache/memory_plan.hpp"
#include "cq/cache/sequence_table.hpp"
#include "cq/cuda/attention.cuh"
#include "cq/cuda/attention/prefill.cuh"
#include "cq/cuda/cache/attention_records.cuh"
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
#pragma nv_diag_default 20012

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <cstdint>
#include <memory>
#include <optional>
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
  float scale = 0.0f;            // 0: 1 / sqrt(head_dim)
  float logits_soft_cap = 0.0f;  // > 0: logits soft-capped to cap x tanh(logit / cap) (Gemma 2); 0: none
};

/// A prefill chunk for PagedKVCache::attend_prefill, device memory in the cache's dtype (F16 or
/// BF16): q and out [rows, q_heads, head_dim], the chunk's keys and values k and v [rows, kv_heads,
/// head_dim] (as the model has them: after RoPE), each with a row stride in elements (0: dense);
/// lse optional, [rows, q_heads] floats (natural log-sum-exp of the scaled scores).
struct PrefillChunk {
  int q_heads = 0;
  const void* q = nullptr;
  std::size_t q_stride = 0;
  const void* k = nullptr;
  const void* v = nullptr;
  std::size_t kv_stride = 0;
  void* out = nullptr;
  std::size_t out_stride = 0;
  float* lse = nullptr;
  float scale = 0.0f;            // 0: 1 / sqrt(head_dim)
  float logits_soft_cap = 0.0f;  // > 0: logits soft-capped to cap x tanh(logit / cap) (Gemma 2); 0: none
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
  /// host memory). Throws cq::Error naming the option: keys before or after RoPE other than the
  /// key codebooks were fitted on, a RoPE other than theirs, pre-RoPE keys with codebooks or a RoPE
  /// the rotating kernel does not serve (see the top), page sizes the kernels cannot address
  /// (page_tokens and full_page_rows must be powers of two), the checks of MemoryPlan and the CPU
  /// cache.
  PagedKVCache(const KVCodebooks& codebooks, const PagedCacheOptions& opt, cudaStream_t stream = nullptr,
               std::span<std::byte> device_pool = {})
      : cb_(&codebooks), stream_(stream), plan_(codebooks, opt, sizeof(T)),
        pool_(allocate_pool(plan_, opt, device_pool, stream)),
        table_(plan_, with_pool(opt, device_pool.empty() ? pool_span() : device_pool), codebooks.layers(), &ops_),
        layers_(codebooks.layers()) {
    if (const std::optional<Rope> rope = cache_key_rope(codebooks, opt, "cuda paged cache")) {
      const DeviceRope r = make_device_rope(*rope);
      for (std::size_t l = 0; l < layers_; ++l) {
        const LayerSpec& sp = codebooks.spec(l);
        CQ_CHECK(codebooks.head_dim() == 128 && sp.key.bits == 8 && sp.value.bits == 8 &&
                     sp.key.channels == sp.value.channels &&
                     (sp.key.channels == 2 || sp.key.channels == 4 || sp.key.channels == 8),
                 "cuda paged cache: keys before RoPE need head_dim 128 and 8-bit codes of 2, 4 or 8 channels alike ",
                 "for keys and values (the kernel that rotates keys); layer ", l, " has head_dim ", codebooks.head_dim(),
                 ", keys ", sp.key.channels, "c", sp.key.bits, "b, values ", sp.value.channels, "c", sp.value.bits, "b");
      }
      rope_ = DeviceBuffer<DeviceRope>(&r, 1, stream);
      CQ_CUDA_CHECK(cudaStreamSynchronize(stream));  // r leaves scope
      rope_dim_ = int(rope->rotary_dim());
      rope_style_ = opt.rope.style;
    }
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
  void free_sequence(SeqId s) {
    table_.free(s);
    step_.ready = false;
  }
  SeqId fork(SeqId s) {
    const SeqId d = table_.fork(s);
    step_.ready = false;
    return d;
  }
  void truncate(SeqId s, std::size_t tokens) {
    table_.truncate(s, tokens);
    step_.ready = false;
  }
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
    step_.ready = false;
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
    layer_codebooks(layer);  // before anything is committed: it may allocate
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
    for (std::size_t i = 0; i < seqs.size(); ++i) {
      const SequenceTable::Sequence& q = table_.at(seqs[i], "append");
      for (std::size_t r = indptr[i]; r < indptr[i + 1]; ++r)
        slots_of(q, n0[i] + (r - indptr[i]), code_slots[r], full_slots[r]);
    }
    for (std::size_t i = 0; i < seqs.size(); ++i) table_.finish_append(seqs[i], layer, plans[i]);
    step_.ready = false;
    unsigned char* dev = flush_page_ops();
    if (rows.rows == 0) return;
    launch_writes(layer, rows, reinterpret_cast<const std::int64_t*>(dev + code_at),
                  reinterpret_cast<const std::int64_t*>(dev + full_at));
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
    cq::detail::check_soft_cap(in.logits_soft_cap, "attend");
    CQ_CHECK(cb_->complete(layer), "attend: layer ", layer, " has no codebooks yet");
    const LayerOnDevice& cbs = layer_codebooks(layer);
    const detail::QueryRows rows(table_, layer, seqs, indptr, "attend");
    // Plans are kept per shape: the longest coded range rounded up to a page, so consecutive
    // decode steps share one (a plan for longer sequences serves shorter ones).
    const AttentionShape shape = shape_of(layer, R, in.q_heads, round_to_page(std::size_t(rows.max_coded)), rows.max_full);
    unsigned char* blob = uploads_.host(rows.segment_bytes(H));
    unsigned char* dev = uploads_.device_at(0);
    AttentionBatch batch = batch_of(layer, shape, cbs, in);
    rows.write_segment(table_, seqs, indptr, H, plan_.code_layout(layer),
                       reinterpret_cast<const std::uint8_t*>(code_pool(layer)), blob, dev, batch);
    const AttentionPlan& p = plan_for(shape);  // may grow the workspace: before the upload is queued
    uploads_.send(stream_);
    attention_.run(batch, p, stream_);
  }

  /// The most workspace attend_prefill may hold to decode the batch's coded rows once before the
  /// attention (PrefillAttention::set_workspace_limit; default 512 MiB, 512 bytes per coded token
  /// and KV head of the batch); past it the rows are decoded per tile in the kernel, slower.
  void set_prefill_workspace_limit(std::size_t bytes) {
    prefill_.set_workspace_limit(bytes);
    prefill_plans_.clear();
  }

  /// Chunked prefill in `layer`: the rows of seqs[i]'s chunk (rows indptr[i] .. indptr[i + 1] - 1
  /// of `in`, the tokens that follow the sequence's cached ones, in order) attend over everything
  /// the sequence holds -- codes, sinks, window -- and over the chunk's own keys and values in full
  /// precision, causally (attention/prefill.cuh: tensor cores over fp16 tiles, the coded rows
  /// decoded first). Call it before appending the chunk (append(layer, seqs, indptr, ...) with the same
  /// rows), as FlashAttention's prefill reads the new keys from the engine's tensors. Throws
  /// cq::Error, launching nothing, on a bad argument: rows out of 1..2^31 - 1, q_heads not a
  /// multiple of kv_heads, unset pointers, a cache of F32 rows, codebooks the prefill kernel does
  /// not serve (PrefillAttention::plan), strides or alignment it cannot read, or keys before RoPE
  /// with a workspace limit too small to decode the prefix. With keys before RoPE the chunk's keys
  /// are given as append takes them, before RoPE (rotated in the kernel to their positions); the
  /// queries after it.
  void attend_prefill(std::size_t layer, std::span<const SeqId> seqs, std::span<const std::size_t> indptr,
                      const PrefillChunk& in) {
    check_layer(layer, "attend_prefill");
    const std::size_t H = cb_->kv_heads(), D = cb_->head_dim(), B = seqs.size();
    CQ_CHECK(dtype_of<T> == DType::f16 || dtype_of<T> == DType::bf16, "attend_prefill: the cache's rows are ",
             dtype_name(dtype_of<T>), "; prefill serves F16 and BF16 caches");
    CQ_CHECK(B >= 1 && B <= 65535, "attend_prefill: ", B, " sequences (needs 1 to 65535)");
    SequenceTable::check_indptr(seqs, indptr, indptr.empty() ? 0 : indptr.back(), "attend_prefill");
    const std::size_t R = indptr.back();
    CQ_CHECK(R >= 1 && R <= 0x7fffffffu, "attend_prefill: ", R, " chunk rows (needs 1 to 2^31 - 1)");
    CQ_CHECK(in.q_heads > 0 && std::size_t(in.q_heads) % H == 0, "attend_prefill: q_heads ", in.q_heads,
             " must be a positive multiple of kv_heads = ", H);
    CQ_CHECK(in.q && in.k && in.v && in.out, "attend_prefill: q, k, v and out must be device pointers");
    CQ_CHECK(std::isfinite(in.scale) && in.scale >= 0.0f, "attend_prefill: scale ", in.scale,
             " must be finite and >= 0 (0: 1 / sqrt(head_dim))");
    cq::detail::check_soft_cap(in.logits_soft_cap, "attend_prefill");
    CQ_CHECK(cb_->complete(layer), "attend_prefill: layer ", layer, " has no codebooks yet");
    std::size_t max_rows = 0;
    for (std::size_t i = 0; i < B; ++i) max_rows = std::max(max_rows, indptr[i + 1] - indptr[i]);
    const LayerOnDevice& cbs = layer_codebooks(layer);
    std::vector<std::size_t> one(B + 1);
    for (std::size_t i = 0; i <= B; ++i) one[i] = i;
    const detail::QueryRows prefix(table_, layer, seqs, one, "attend_prefill", true);
    // The longest prefix bounds the rows decoded into the workspace (rounded as decode's plans are).
    const AttentionShape shape = shape_of(layer, B, in.q_heads, round_to_page(std::size_t(prefix.max_coded)), 0);
    const PrefillPlan* p = &cached_plan(prefill_plans_, shape, [&] { return prefill_.plan(shape, dtype_of<T>); });
    PrefillRows rows;
    rows.q = in.q, rows.k = in.k, rows.v = in.v, rows.out = in.out, rows.lse = in.lse;
    rows.q_stride = in.q_stride ? in.q_stride : std::size_t(in.q_heads) * D;
    rows.kv_stride = in.kv_stride ? in.kv_stride : H * D;
    rows.out_stride = in.out_stride ? in.out_stride : std::size_t(in.q_heads) * D;
    rows.q_heads = in.q_heads;
    const std::size_t segment = prefix.segment_bytes(H);
    unsigned char* blob = uploads_.host(segment + (B + 1) * sizeof(std::uint32_t));
    unsigned char* dev = uploads_.device_at(0);
    DecodeQueries scoring;
    scoring.q_heads = in.q_heads;
    scoring.scale = in.scale;
    scoring.logits_soft_cap = in.logits_soft_cap;
    AttentionBatch batch = batch_of(layer, shape, cbs, scoring);
    prefix.write_segment(table_, seqs, one, H, plan_.code_layout(layer),
                         reinterpret_cast<const std::uint8_t*>(code_pool(layer)), blob, dev, batch);
    auto* host_indptr = reinterpret_cast<std::uint32_t*>(blob + segment);
    for (std::size_t i = 0; i <= B; ++i) host_indptr[i] = std::uint32_t(indptr[i]);
    rows.indptr = reinterpret_cast<const std::uint32_t*>(dev + segment);
    // Checked before the upload is queued: run throws on strides and alignment, launching nothing.
    prefill_.check(batch, rows, int(max_rows), *p);
    uploads_.send(stream_);
    prefill_.run(batch, rows, int(max_rows), *p, stream_);
  }

  // ---- a decode step for a CUDA graph ----

  /// Prepares a decode step whose launches a CUDA graph can capture: one new token for each of
  /// seqs (distinct, live, equally long in every layer) in every layer. Commits the pages on the
  /// host now (all or nothing: the pool is checked for all sequences first), runs the page writes,
  /// and uploads the step's slot mapping and every layer's attention records into a buffer kept
  /// for the steps, whose address stays put while the batch size and the tables fit (it returns
  /// true when it moved, or the batch size or max_context changed: recapture then). The attention
  /// plan is made for contexts up to `max_context` tokens, with the step's own workspace. One live
  /// graph per cache: the step buffer is the cache's, so a step of another batch size or
  /// max_context moves it (and frees what older graphs read). Between begin_decode_step and the
  /// step's launches, no other call may change the cache's sequences (append, reserve, fork,
  /// truncate, free_sequence make the eager step calls refuse; a graph cannot be stopped). Then,
  /// on the cache's stream and in a graph if wanted, per layer:
  /// append_step(layer, rows) and attend_step(layer, queries) launch only (no allocation, no host
  /// synchronisation). Throws cq::Error, nothing changed, on a bad argument, a sequence longer than
  /// max_context, or a full pool.
  bool begin_decode_step(std::span<const SeqId> seqs, std::size_t max_context) {
    const std::size_t B = seqs.size(), H = cb_->kv_heads(), L = layers_;
    CQ_CHECK(B >= 1 && B <= 0x7fffffffu, "begin_decode_step: ", B, " sequences (needs 1 to 2^31 - 1)");
    for (std::size_t l = 0; l < L; ++l)
      CQ_CHECK(cb_->complete(l), "begin_decode_step: layer ", l, " has no codebooks yet");
    std::vector<std::size_t> one(B + 1);
    for (std::size_t i = 0; i <= B; ++i) one[i] = i;
    std::vector<std::size_t> n(B);
    for (std::size_t i = 0; i < B; ++i) {
      const SequenceTable::Sequence& q = table_.at(seqs[i], "begin_decode_step");
      n[i] = q.length[0];
      for (std::size_t l = 1; l < L; ++l)
        CQ_CHECK(q.length[l] == n[i], "begin_decode_step: sequence ", seqs[i], " holds ", q.length[l],
                 " tokens in layer ", l, " and ", n[i], " in layer 0 (a step appends to every layer)");
      CQ_CHECK(n[i] + 1 <= max_context, "begin_decode_step: sequence ", seqs[i], " reaches ", n[i] + 1,
               " tokens, past max_context ", max_context);
    }
    table_.check_append(0, seqs, one, max_tokens, "begin_decode_step");
    for (std::size_t l = 0; l < L; ++l) layer_codebooks(l);
    // The pages of the new token in every layer, planned for all sequences before any is taken.
    std::vector<SequenceTable::Plan> reserve(B);
    std::size_t code_take = 0, full_take = 0, taken = 0;
    for (std::size_t i = 0; i < B; ++i) {
      reserve[i] = table_.plan_reserve(seqs[i], 1, max_tokens);
      code_take += reserve[i].code_take, full_take += reserve[i].full_take;
      taken += SequenceTable::pages_taken(reserve[i]);
    }
    table_.check_pages(code_take, full_take, "begin_decode_step", "the step's tokens");
    // Every layer's records, sized from the tables as they will be (the pages just planned).
    std::size_t entries = 1;
    for (const SequenceTable::Plan& p : reserve) entries += p.code_pages + p.sink_pages + p.recent_pages + p.drop_recent;
    // The step buffer: the slot mapping, then each layer's records at a fixed stride (a graph holds
    // their addresses; the stride has room for tables that grow), then the page writes (launched
    // here, never captured).
    const std::size_t segment = detail::QueryRows::segment_bytes(B, H, entries);
    const bool same_shape = step_.batch == B && step_.max_context == max_context;
    const std::size_t stride = same_shape && segment <= step_.stride ? step_.stride : segment * 2;
    const std::size_t slots_at = 0, layers_at = 2 * B * sizeof(std::int64_t), ops_at = layers_at + L * stride;
    const std::size_t bytes = ops_at + taken * L * sizeof(detail::PageOp);
    const bool moved = !same_shape || stride != step_.stride || step_buffer_.size() < bytes;
    if (step_buffer_.size() < bytes) {
      step_.batch = 0;  // the old buffer's graphs are invalid from here on, whatever happens next
      step_buffer_ = DeviceBuffer<unsigned char>(bytes * 2);
    }
    ops_.reserve(taken * L);
    uploads_.reserve(bytes);
    step_.layers.reserve(L);
    step_.ready = false;
    // Commit: the pages, then each layer's bookkeeping of a one-token append (takes no page now).
    // What follows allocates little (plans, visible tokens per row) but may throw on a device
    // error: then the step is invalid (batch 0: the next begin reports a move) and the queued
    // page writes are dropped rather than replayed into a later call.
    try {
    for (std::size_t i = 0; i < B; ++i) table_.commit(seqs[i], reserve[i]);
    for (std::size_t l = 0; l < L; ++l) {
      const std::vector<SequenceTable::Plan> plans = table_.plan_append(l, seqs, one, max_tokens, "begin_decode_step");
      for (std::size_t i = 0; i < B; ++i) {
        CQ_ASSERT(plans[i].code_take == 0 && plans[i].full_take == 0);  // the reserve took them
        table_.commit(seqs[i], plans[i]);
        table_.finish_append(seqs[i], l, plans[i]);
      }
    }
    unsigned char* blob = uploads_.host(bytes);
    unsigned char* dev = step_buffer_.data();
    std::memcpy(blob + ops_at, ops_.ops().data(), ops_.ops().size() * sizeof(detail::PageOp));
    auto* code_slots = reinterpret_cast<std::int64_t*>(blob + slots_at);
    auto* full_slots = code_slots + B;
    for (std::size_t i = 0; i < B; ++i)
      slots_of(table_.at(seqs[i], "begin_decode_step"), n[i], code_slots[i], full_slots[i]);
    step_.layers.assign(L, AttentionBatch{});
    for (std::size_t l = 0; l < L; ++l) {
      const detail::QueryRows rows(table_, l, seqs, one, "begin_decode_step");
      CQ_ASSERT(rows.segment_bytes(H) <= stride);
      AttentionBatch& b = step_.layers[l];
      b = batch_of(l, shape_of(l, B, 0, 0, 0), layer_codebooks(l), DecodeQueries{});
      rows.write_segment(table_, seqs, one, H, plan_.code_layout(l),
                         reinterpret_cast<const std::uint8_t*>(code_pool(l)), blob + layers_at + l * stride,
                         dev + layers_at + l * stride, b);
    }
    step_.code_slots = reinterpret_cast<const std::int64_t*>(dev + slots_at);
    step_.full_slots = step_.code_slots + B;
    step_.max_context = max_context;
    step_.batch = B;
    step_.stride = stride;
    uploads_.send_to(dev, stream_);
    ops_.launch(reinterpret_cast<const detail::PageOp*>(dev + ops_at), stream_);
    } catch (...) {
      ops_.clear();
      step_.batch = 0;
      throw;
    }
    step_.ready = true;
    return moved;
  }

  /// Writes the step's new rows (one per sequence of begin_decode_step, in its order; device
  /// memory, [sequences, kv_heads, head_dim] with strides) into `layer`: codes and full-precision
  /// rows. Launches only.
  void append_step(std::size_t layer, const DeviceRows<device_type>& rows) {
    check_step(layer, "append_step");
    CQ_CHECK(rows.rows == step_.batch && rows.keys && rows.values, "append_step: ", rows.rows, " rows for a step of ",
             step_.batch, " sequences (keys and values must be set)");
    launch_writes(layer, rows, step_.code_slots, step_.full_slots);
  }

  /// Decode attention of the step's sequences in `layer` (after append_step): queries and outputs
  /// [sequences, q_heads, head_dim] (in). Launches only, once the step's plan for this layer's
  /// codebooks and q_heads exists: plan_step_attention makes it (before a capture; attend_step
  /// outside a capture makes it itself).
  void attend_step(std::size_t layer, const DecodeQueries& in) {
    check_step(layer, "attend_step");
    CQ_CHECK(in.q && in.out && std::isfinite(in.scale), "attend_step: q and out must be set, scale finite");
    cq::detail::check_soft_cap(in.logits_soft_cap, "attend_step");
    const AttentionPlan& p = plan_step_attention(layer, in.q_heads);
    AttentionBatch b = step_.layers[layer];
    b.q_heads = in.q_heads;
    b.q = in.q, b.q_type = in.q_type;
    b.out = in.out, b.out_type = in.out_type;
    b.lse = in.lse;
    b.scale = in.scale;
    b.logits_soft_cap = in.logits_soft_cap;
    step_attention_.run(b, p, stream_);
  }

  /// The step's attention plan in `layer` for `q_heads` query heads (made once per step shape and
  /// codebook configuration; may allocate the workspace: call it for every layer before capturing
  /// a graph).
  const AttentionPlan& plan_step_attention(std::size_t layer, int q_heads) {
    check_step(layer, "plan_step_attention");
    CQ_CHECK(q_heads > 0 && std::size_t(q_heads) % cb_->kv_heads() == 0, "attend_step: q_heads ", q_heads,
             " must be a positive multiple of kv_heads = ", cb_->kv_heads());
    const std::size_t SW = options().sinks + options().window;
    return plan_for(step_attention_, step_plans_,
                    shape_of(layer, step_.batch, q_heads, round_to_page(step_.max_context),
                             int(std::min(SW, step_.max_context))));
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

  /// Where the row at position p of sequence q goes: its code slot (token slot of the code pool,
  /// -1 for a sink) and its row slot in the full-precision pool (sink or recent pages), as the CPU
  /// cache's write_rows places it.
  void slots_of(const SequenceTable::Sequence& q, std::size_t p, std::int64_t& code_slot,
                std::int64_t& full_slot) const {
    const std::size_t S = options().sinks, P = options().page_tokens, F = options().full_page_rows;
    code_slot = p < S ? -1 : std::int64_t(q.code[(p - S) / P]) * std::int64_t(P) + std::int64_t((p - S) % P);
    const std::size_t row = p < S ? p : p - q.recent_first;
    full_slot = std::int64_t(p < S ? q.sink[row / F] : q.recent[row / F]) * std::int64_t(F) + std::int64_t(row % F);
  }

  /// The longest coded range of a plan, rounded up to a page.
  int round_to_page(std::size_t coded) const {
    const std::size_t P = options().page_tokens;
    return int(std::min<std::size_t>((coded + P - 1) / P * P, 0x7fffffffu));
  }
  AttentionShape shape_of(std::size_t layer, std::size_t rows, int q_heads, int max_coded, int max_full) const {
    AttentionShape shape;
    shape.batch = int(rows);
    shape.q_heads = q_heads;
    shape.kv_heads = int(cb_->kv_heads());
    shape.head_dim = int(cb_->head_dim());
    const LayerSpec& spec = cb_->spec(layer);
    shape.key_channels = int(spec.key.channels), shape.key_bits = spec.key.bits;
    shape.value_channels = int(spec.value.channels), shape.value_bits = spec.value.bits;
    shape.max_coded = max_coded;
    shape.max_full = max_full;
    shape.rope_dim = rope_dim_;
    shape.rope_style = rope_style_;
    return shape;
  }
  /// An attention batch of `layer` for `shape`'s rows (codes and sequences set by write_segment).
  AttentionBatch batch_of(std::size_t layer, const AttentionShape& shape, const LayerOnDevice& cbs,
                          const DecodeQueries& in) const {
    AttentionBatch batch;
    batch.batch = shape.batch, batch.q_heads = shape.q_heads, batch.kv_heads = shape.kv_heads;
    batch.head_dim = shape.head_dim;
    batch.key_codebooks = cbs.key_views.data();
    batch.value_codebooks = cbs.value_views.data();
    batch.q = in.q, batch.q_type = in.q_type;
    batch.out = in.out, batch.out_type = in.out_type;
    batch.lse = in.lse;
    batch.scale = in.scale;
    batch.logits_soft_cap = in.logits_soft_cap;
    batch.full_pages = {full_pool(layer), dtype_of<T>, std::uint32_t(options().full_page_rows),
                        plan_.full_layout(layer).page_bytes()};
    batch.page_tokens = int(options().page_tokens);
    batch.rope = rope_dim_ > 0 ? rope_.data() : nullptr;
    return batch;
  }
  void check_step(std::size_t layer, const char* what) const {
    check_layer(layer, what);
    CQ_CHECK(step_.ready, what, ": no decode step begun (begin_decode_step), or the cache changed since");
  }
  /// Launches the codes and full-precision rows of `rows` into `layer`'s pools by slot mappings
  /// in device memory.
  void launch_writes(std::size_t layer, const DeviceRows<device_type>& rows, const std::int64_t* code_slots,
                     const std::int64_t* full_slots) {
    const LayerOnDevice& cbs = *device_codebooks_[layer];
    const LayerSpec& spec = cb_->spec(layer);
    PagedEncode<device_type> pe;
    static_cast<SlotRows<device_type>&>(pe) = {rows, code_slots};
    pe.key_codebooks = cbs.key_views.data();
    pe.value_codebooks = cbs.value_views.data();
    pe.head_dim = int(cb_->head_dim());
    pe.key_channels = int(spec.key.channels), pe.key_bits = spec.key.bits;
    pe.value_channels = int(spec.value.channels), pe.value_bits = spec.value.bits;
    pe.pool = reinterpret_cast<std::uint8_t*>(code_pool(layer));
    pe.layout = plan_.code_layout(layer);
    pe.pages = table_.code_pages().pages();
    encode_into_pages(pe, stream_);
    PagedRowWrite<device_type> pw;
    static_cast<SlotRows<device_type>&>(pw) = {rows, full_slots};
    pw.pool = reinterpret_cast<device_type*>(full_pool(layer));
    pw.layout = plan_.full_layout(layer);
    pw.pages = table_.full_pages().pages();
    write_full_rows(pw, stream_);
  }

  /// The plan for shape s kept in `plans` (the last 16), made by make() if there is none.
  template <class Plan, class Make>
  static const Plan& cached_plan(std::vector<std::pair<AttentionShape, Plan>>& plans, const AttentionShape& s,
                                 Make&& make) {
    for (const auto& [shape, plan] : plans)
      if (shape == s) return plan;
    if (plans.size() == 16) plans.erase(plans.begin());
    plans.emplace_back(s, make());
    return plans.back().second;
  }
  /// A plan of `attention` for shape s, kept in `plans`.
  static const AttentionPlan& plan_for(FusedAttention& attention,
                                       std::vector<std::pair<AttentionShape, AttentionPlan>>& plans,
                                       const AttentionShape& s) {
    return cached_plan(plans, s, [&] { return attention.plan(s); });
  }
  const AttentionPlan& plan_for(const AttentionShape& s) { return plan_for(attention_, plans_, s); }

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
  // The decode step's own attention and plans: its workspace, which captured graphs hold, grows
  // only in plan_step_attention, never because attend() met a larger shape.
  FusedAttention step_attention_;
  std::vector<std::pair<AttentionShape, AttentionPlan>> step_plans_;
  PrefillAttention prefill_;
  std::vector<std::pair<AttentionShape, PrefillPlan>> prefill_plans_;
  std::vector<std::unique_ptr<LayerOnDevice>> device_codebooks_;
  /// The decode step of begin_decode_step: its slot mapping and every layer's records live in
  /// step_buffer_, whose address graphs capture.
  struct Step {
    std::size_t batch = 0, max_context = 0, stride = 0;  // stride: bytes from one layer's records to the next
    bool ready = false;  // begun, and no sequence changed since (append_step/attend_step may run)
    const std::int64_t *code_slots = nullptr, *full_slots = nullptr;
    std::vector<AttentionBatch> layers;
  } step_;
  DeviceBuffer<unsigned char> step_buffer_;
  // Pre-RoPE keys: the model's RoPE for the kernels (one DeviceRope), its rotary channels and style.
  DeviceBuffer<DeviceRope> rope_;
  int rope_dim_ = 0;
  RopeStyle rope_style_ = RopeStyle::rotate_half;
};

}  // namespace cq::cuda
