#pragma once
/// SequenceTable: the page bookkeeping of a paged cache, independent of what the pages hold —
/// sequences, their page tables, per-layer lengths, prefix sharing (fork) with copy-on-write,
/// rollback, and the rule of which full-precision rows are kept.
///
/// Each sequence has three page tables: code pages (positions [S, n), page_tokens each), sink
/// pages (positions [0, min(n, S))) and recent pages (full-precision rows of positions
/// [recent_first, n)). Layers append one after another, so each layer has its own length; pages
/// are numbered for all layers at once (layout.hpp).
///
/// Which full-precision rows are kept: a layer whose last append started at position b keeps rows
/// from max(S, b - W - R) on (the window before that append, R = max_rollback more, and all of
/// the append). So a chunk's queries see their own windows, and rolling back the last append plus
/// R tokens always succeeds. Pages below every layer's bound are released when a layer appends.
///
/// Every mutation is planned first (pages counted against the free lists, table capacity
/// reserved: anything that can throw), then committed (nothing can fail), so a failed call
/// leaves every sequence as it was.

#include "cq/cache/memory_plan.hpp"
#include "cq/cache/page_pool.hpp"
#include "cq/error.hpp"

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory_resource>
#include <span>
#include <vector>

namespace cq {

/// A sequence's handle in a paged cache.
using SeqId = std::uint32_t;

class SequenceTable {
 public:
  struct Sequence {
    explicit Sequence(std::pmr::memory_resource* m) : code(m), sink(m), recent(m), length(m), last_begin(m) {}
    bool live = false;
    std::size_t position_offset = 0;                // RoPE position of token 0
    std::pmr::vector<std::uint32_t> code, sink, recent;  // page tables
    std::size_t recent_first = 0;                   // position of row 0 of recent[0]
    std::pmr::vector<std::size_t> length;           // (layers)
    std::pmr::vector<std::size_t> last_begin;       // (layers): first position of the last append
    std::size_t max_length() const { return length.empty() ? 0 : *std::max_element(length.begin(), length.end()); }
  };

  /// `page_memory` (optional): how page bytes are written, when they are not host memory
  /// (page_pool.hpp); the pool is then opt.pool_memory.
  SequenceTable(const MemoryPlan& plan, const PagedCacheOptions& opt, std::size_t layers,
                PageMemory* page_memory = nullptr)
      : opt_(opt), layers_(layers), mem_(opt.memory ? opt.memory : std::pmr::get_default_resource()),
        code_(plan.code_layer_bytes(), opt.code_pages, mem_, code_memory(plan, opt), "code pages", page_memory),
        full_(plan.full_layer_bytes(), opt.full_pages, mem_, full_memory(plan, opt), "full-precision pages",
              page_memory),
        seqs_(mem_), free_ids_(mem_) {
    seqs_.reserve(opt.max_sequences);
    free_ids_.reserve(opt.max_sequences);
    for (std::size_t i = 0; i < opt.max_sequences; ++i) {
      seqs_.emplace_back(mem_);
      free_ids_.push_back(static_cast<SeqId>(opt.max_sequences - 1 - i));
    }
  }

  const PagedCacheOptions& options() const { return opt_; }
  PageSet& code_pages() { return code_; }
  PageSet& full_pages() { return full_; }
  const PageSet& code_pages() const { return code_; }
  const PageSet& full_pages() const { return full_; }
  std::size_t live_sequences() const { return seqs_.size() - free_ids_.size(); }

  const Sequence& at(SeqId s, const char* what) const {
    CQ_CHECK(s < seqs_.size() && seqs_[s].live, what, ": sequence ", s, " is not a live sequence");
    return seqs_[s];
  }
  bool live(SeqId s) const { return s < seqs_.size() && seqs_[s].live; }

  SeqId add(std::size_t first_position) {
    CQ_CHECK(!free_ids_.empty(), "add_sequence: all ", seqs_.size(), " sequence slots are in use (max_sequences)");
    CQ_CHECK(first_position <= (std::size_t{1} << 40), "add_sequence: first position ", first_position,
             " exceeds 2^40");
    const SeqId s = free_ids_.back();
    Sequence& q = seqs_[s];
    q.length.assign(layers_, 0);  // may throw; nothing is taken yet
    q.last_begin.assign(layers_, 0);
    free_ids_.pop_back();
    q.live = true;
    q.position_offset = first_position;
    q.recent_first = opt_.sinks;
    return s;
  }

  void free(SeqId s) {
    Sequence& q = mut(s, "free_sequence");
    for (auto* t : {&q.code, &q.sink, &q.recent}) release_all(*t, t == &q.code ? code_ : full_);
    q.live = false;
    free_ids_.push_back(s);
  }

  /// A new sequence sharing every page of `s` (copy-on-write).
  SeqId fork(SeqId s) {
    const Sequence& src = at(s, "fork");
    CQ_CHECK(!free_ids_.empty(), "fork: all ", seqs_.size(), " sequence slots are in use (max_sequences)");
    const SeqId d = free_ids_.back();
    Sequence& dst = seqs_[d];
    dst.code.assign(src.code.begin(), src.code.end());  // may throw: nothing is shared yet
    dst.sink.assign(src.sink.begin(), src.sink.end());
    dst.recent.assign(src.recent.begin(), src.recent.end());
    dst.length.assign(src.length.begin(), src.length.end());
    dst.last_begin.assign(src.last_begin.begin(), src.last_begin.end());
    free_ids_.pop_back();
    dst.live = true;
    dst.position_offset = src.position_offset;
    dst.recent_first = src.recent_first;
    for (std::uint32_t p : dst.code) code_.retain(p);
    for (std::uint32_t p : dst.sink) full_.retain(p);
    for (std::uint32_t p : dst.recent) full_.retain(p);
    return d;
  }

  /// What writing positions [n0, n1) of a sequence takes: pages to take, share-broken or drop.
  struct Plan {
    std::size_t n1 = 0;                       // positions end up [0, n1) (for reserve: at least)
    std::size_t code_pages = 0, sink_pages = 0, recent_pages = 0;  // table sizes afterwards
    std::size_t drop_recent = 0;              // recent pages released from the front
    std::size_t code_from = 0, sink_from = 0, recent_from = 0;  // first table index written
    bool code_writes = false, sink_writes = false, recent_writes = false;
    std::size_t code_take = 0, full_take = 0;  // pages taken from the free lists (net of those dropped)
  };

  /// Plans writing positions [n0, n1) of sequence s, where `keep` is the first full-precision row
  /// every layer still needs afterwards: the pages it takes (check_pages says whether the pool
  /// holds them). Reserves table capacity (may throw); changes nothing visible.
  Plan plan_write(SeqId s, std::size_t n0, std::size_t n1, std::size_t keep, const char* what) {
    Sequence& q = mut(s, what);
    const std::size_t S = opt_.sinks, P = opt_.page_tokens, F = opt_.full_page_rows;
    Plan p;
    p.n1 = n1;
    p.code_pages = std::max(q.code.size(), n1 > S ? (n1 - S + P - 1) / P : 0);
    p.sink_pages = std::max(q.sink.size(), (std::min(n1, S) + F - 1) / F);
    if (keep > q.recent_first) p.drop_recent = std::min(q.recent.size(), (keep - q.recent_first) / F);
    const std::size_t recent_first = q.recent_first + p.drop_recent * F;
    p.recent_pages = std::max(q.recent.size() - p.drop_recent, n1 > recent_first ? (n1 - recent_first + F - 1) / F : 0);
    p.code_from = n0 > S ? (n0 - S) / P : 0;
    p.sink_from = std::min(n0, S) / F;
    p.recent_from = n0 > recent_first ? (n0 - recent_first) / F : 0;
    p.code_writes = p.recent_writes = n1 > std::max(n0, S);
    p.sink_writes = n0 < std::min(n1, S);
    // Pages to take: new ones, and a copy of every shared page the write touches.
    p.code_take = p.code_pages - q.code.size() + shared(q.code, p.code_from, code_, p.code_writes);
    const std::size_t full_take = p.sink_pages - q.sink.size() + shared(q.sink, p.sink_from, full_, p.sink_writes) +
                                  (p.recent_pages + p.drop_recent - q.recent.size()) +
                                  shared(q.recent, p.drop_recent + p.recent_from, full_, p.recent_writes);
    std::size_t freed = 0;  // dropped pages no other sequence holds come back first
    for (std::size_t i = 0; i < p.drop_recent; ++i) freed += full_.refs(q.recent[i]) == 1;
    p.full_take = full_take > freed ? full_take - freed : 0;
    q.code.reserve(p.code_pages);
    q.sink.reserve(p.sink_pages);
    q.recent.reserve(p.recent_pages + p.drop_recent);
    return p;
  }

  /// Throws cq::Error (naming `what` and the sequences) unless the free lists hold `code` code
  /// pages and `full` full-precision pages.
  void check_pages(std::size_t code, std::size_t full, const char* what, const char* whom) const {
    CQ_CHECK(code <= code_.free_pages() && full <= full_.free_pages(), what, ": the pool is full: ", whom, " need ",
             code, " code and ", full, " full-precision pages; ", code_.free_pages(), " of ", code_.pages(), " and ",
             full_.free_pages(), " of ", full_.pages(), " are free");
  }

  /// Checks a batch's rows per sequence: rows [indptr[i], indptr[i + 1]) of `rows` belong to seqs[i].
  static void check_indptr(std::span<const SeqId> seqs, std::span<const std::size_t> indptr, std::size_t rows,
                           const char* what) {
    CQ_CHECK(indptr.size() == seqs.size() + 1, what, ": indptr has ", indptr.size(), " entries for ", seqs.size(),
             " sequences (needs sequences + 1)");
    CQ_CHECK(indptr[0] == 0 && indptr.back() == rows, what, ": indptr must run from 0 to the ", rows,
             " rows, got ", indptr[0], " .. ", indptr.back());
    for (std::size_t i = 0; i < seqs.size(); ++i)
      CQ_CHECK(indptr[i] <= indptr[i + 1], what, ": indptr decreases at entry ", i + 1);
  }

  /// Checks that seqs are live and distinct and that appending rows [indptr[i], indptr[i + 1]) keeps
  /// each within `max_tokens` tokens in `layer` (indptr checked); throws cq::Error naming `what`.
  void check_append(std::size_t layer, std::span<const SeqId> seqs, std::span<const std::size_t> indptr,
                    std::size_t max_tokens, const char* what) const {
    for (std::size_t i = 0; i < seqs.size(); ++i) {
      const Sequence& q = at(seqs[i], what);
      for (std::size_t j = 0; j < i; ++j)
        CQ_CHECK(seqs[j] != seqs[i], what, ": sequence ", seqs[i], " appears twice in one batch");
      const std::size_t n0 = q.length[layer], m = indptr[i + 1] - indptr[i];
      CQ_CHECK(m <= max_tokens - n0, what, ": ", m, " tokens overflow sequence ", seqs[i], " (", n0, " held)");
    }
  }

  /// Plans appending rows [indptr[i], indptr[i + 1]) to seqs[i] in `layer` (live, distinct
  /// sequences of at most `max_tokens` tokens afterwards; indptr checked): one plan per sequence,
  /// every page of all of them counted against the pool. Throws cq::Error naming `what` (nothing
  /// visible changed) when a check fails or the pool is full.
  std::vector<Plan> plan_append(std::size_t layer, std::span<const SeqId> seqs, std::span<const std::size_t> indptr,
                                std::size_t max_tokens, const char* what) {
    check_append(layer, seqs, indptr, max_tokens, what);
    std::vector<Plan> plans(seqs.size());
    std::size_t code_take = 0, full_take = 0;
    for (std::size_t i = 0; i < seqs.size(); ++i) {
      const Sequence& q = at(seqs[i], what);
      const std::size_t n0 = q.length[layer], n1 = n0 + (indptr[i + 1] - indptr[i]);
      plans[i] = plan_write(seqs[i], n0, n1, keep_bound(q, layer, n0), what);
      code_take += plans[i].code_take;
      full_take += plans[i].full_take;
    }
    check_pages(code_take, full_take, what, seqs.size() == 1 ? "the rows" : "the batch's rows");
    return plans;
  }
  /// Plans taking the pages `tokens` more tokens of sequence s need in every layer (reserve), with
  /// at most `max_tokens` tokens afterwards; throws cq::Error (nothing visible changed) on overflow
  /// or when the pool cannot hold them.
  Plan plan_reserve(SeqId s, std::size_t tokens, std::size_t max_tokens) {
    const Sequence& q = at(s, "reserve");
    const std::size_t n = q.max_length();
    CQ_CHECK(tokens <= max_tokens - n, "reserve: ", tokens, " more tokens overflow sequence ", s);
    const Plan p = plan_write(s, n, n + tokens, keep_bound(q, SIZE_MAX, 0), "reserve");
    check_pages(p.code_take, p.full_take, "reserve", "the tokens");
    return p;
  }

  /// Records that `layer` of sequence s now holds plan p's positions, written by an append that
  /// started at its previous length.
  void finish_append(SeqId s, std::size_t layer, const Plan& p) noexcept {
    Sequence& q = seqs_[s];
    q.last_begin[layer] = q.length[layer];
    q.length[layer] = p.n1;
  }
  /// Pages a commit of plan p takes from the free lists at most (each written once per layer
  /// through the PageMemory: zeroed, or copied from a shared page).
  static std::size_t pages_taken(const Plan& p) { return p.code_take + p.full_take + p.drop_recent; }

  /// Carries out a plan (cannot fail): releases dropped rows, copies shared pages about to be
  /// written, takes new pages. The caller then writes the rows and sets the lengths.
  void commit(SeqId s, const Plan& p) noexcept {
    Sequence& q = seqs_[s];
    for (std::size_t i = 0; i < p.drop_recent; ++i) full_.release(q.recent[i]);
    q.recent.erase(q.recent.begin(), q.recent.begin() + static_cast<std::ptrdiff_t>(p.drop_recent));
    q.recent_first += p.drop_recent * opt_.full_page_rows;
    if (p.code_writes) unshare(q.code, p.code_from, code_);
    if (p.sink_writes) unshare(q.sink, p.sink_from, full_);
    if (p.recent_writes) unshare(q.recent, p.recent_from, full_);
    while (q.code.size() < p.code_pages) q.code.push_back(code_.take());
    while (q.sink.size() < p.sink_pages) q.sink.push_back(full_.take());
    while (q.recent.size() < p.recent_pages) q.recent.push_back(full_.take());
  }

  /// The first full-precision row sequence s needs when `layer` is about to start an append at
  /// position n0 (every other layer as it is): see the top of this file.
  std::size_t keep_bound(const Sequence& q, std::size_t layer, std::size_t n0) const {
    std::size_t keep = SIZE_MAX;
    for (std::size_t l = 0; l < layers_; ++l) {
      const std::size_t b = l == layer ? n0 : q.last_begin[l];
      keep = std::min(keep, std::max(opt_.sinks, b > opt_.window + opt_.max_rollback ? b - opt_.window - opt_.max_rollback : 0));
    }
    return keep;
  }

  /// Rolls sequence s back to `tokens` tokens in every layer; throws (nothing changed) when a
  /// layer holds fewer or the new window's rows are no longer kept.
  void truncate(SeqId s, std::size_t tokens) {
    Sequence& q = mut(s, "truncate");
    const std::size_t S = opt_.sinks, P = opt_.page_tokens, F = opt_.full_page_rows;
    for (std::size_t l = 0; l < layers_; ++l)
      CQ_CHECK(tokens <= q.length[l], "truncate: ", tokens, " tokens exceed layer ", l, "'s ", q.length[l],
               " (sequence ", s, ")");
    const std::size_t lo = std::max(S, tokens > opt_.window ? tokens - opt_.window : 0);  // the new window's start
    CQ_CHECK(lo >= tokens || lo >= q.recent_first, "truncate: cannot roll sequence ", s, " back to ", tokens,
             " tokens: full precision is kept only from position ", q.recent_first, " (window ", opt_.window,
             ", max_rollback ", opt_.max_rollback, ")");
    shrink(q.code, tokens > S ? (tokens - S + P - 1) / P : 0, code_);
    shrink(q.sink, (std::min(tokens, S) + F - 1) / F, full_);
    if (tokens <= q.recent_first) {  // no full-precision row past the sinks is needed
      shrink(q.recent, 0, full_);
      q.recent_first = std::max(S, tokens);
    } else {
      shrink(q.recent, (tokens - q.recent_first + F - 1) / F, full_);
    }
    for (std::size_t l = 0; l < layers_; ++l) {
      q.length[l] = tokens;
      q.last_begin[l] = std::min(q.last_begin[l], tokens);
    }
  }

  /// Bytes by part (PagedKVCache::memory): the pools, the pages in use, `codebook_bytes`, tables.
  MemoryUsage memory(std::size_t codebook_bytes) const {
    MemoryUsage m;
    m.codes = code_.pages() * code_.page_bytes();
    m.full = full_.pages() * full_.page_bytes();
    m.codes_in_use = code_.used_pages() * code_.page_bytes();
    m.full_in_use = full_.used_pages() * full_.page_bytes();
    m.codebooks = codebook_bytes;
    m.tables = table_bytes();
    return m;
  }

  /// Bytes of tables (sequence records and page tables) taken from the memory resource.
  std::size_t table_bytes() const {
    std::size_t b = seqs_.capacity() * sizeof(Sequence) + free_ids_.capacity() * sizeof(SeqId);
    for (const Sequence& q : seqs_)
      b += (q.code.capacity() + q.sink.capacity() + q.recent.capacity()) * sizeof(std::uint32_t) +
           (q.length.capacity() + q.last_begin.capacity()) * sizeof(std::size_t);
    return b + code_.allocated_bytes() - code_.owned_page_bytes() + full_.allocated_bytes() - full_.owned_page_bytes();
  }

  Sequence& mut(SeqId s, const char* what) {
    CQ_CHECK(s < seqs_.size() && seqs_[s].live, what, ": sequence ", s, " is not a live sequence");
    return seqs_[s];
  }

 private:
  static std::span<std::byte> code_memory(const MemoryPlan& plan, const PagedCacheOptions& o) {
    if (o.pool_memory.empty()) return {};
    CQ_CHECK(o.pool_memory.size() >= plan.pool_bytes(o), "paged cache: the engine's pool memory holds ",
             o.pool_memory.size(), " bytes, the pool needs ", plan.pool_bytes(o));
    return o.pool_memory.first(plan.code_page_bytes() * o.code_pages);
  }
  static std::span<std::byte> full_memory(const MemoryPlan& plan, const PagedCacheOptions& o) {
    if (o.pool_memory.empty()) return {};
    return o.pool_memory.subspan(plan.code_page_bytes() * o.code_pages, plan.full_page_bytes() * o.full_pages);
  }
  /// Shared pages among table[from..] (if `writes`).
  static std::size_t shared(const std::pmr::vector<std::uint32_t>& t, std::size_t from, const PageSet& set, bool writes) {
    std::size_t n = 0;
    if (writes)
      for (std::size_t i = from; i < t.size(); ++i) n += set.refs(t[i]) > 1;
    return n;
  }
  static void unshare(std::pmr::vector<std::uint32_t>& t, std::size_t from, PageSet& set) noexcept {
    for (std::size_t i = from; i < t.size(); ++i)
      if (set.refs(t[i]) > 1) {
        const std::uint32_t fresh = set.take_copy(t[i]);
        set.release(t[i]);
        t[i] = fresh;
      }
  }
  static void shrink(std::pmr::vector<std::uint32_t>& t, std::size_t keep, PageSet& set) noexcept {
    while (t.size() > keep) {
      set.release(t.back());
      t.pop_back();
    }
  }
  static void release_all(std::pmr::vector<std::uint32_t>& t, PageSet& set) noexcept { shrink(t, 0, set); }

  PagedCacheOptions opt_;
  std::size_t layers_;
  std::pmr::memory_resource* mem_;
  PageSet code_, full_;
  std::pmr::vector<Sequence> seqs_;
  std::pmr::vector<SeqId> free_ids_;
};

}  // namespace cq
