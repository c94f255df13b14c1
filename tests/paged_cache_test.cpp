// The engine-shaped cache: many sequences over one pool of pages, one set of shared codebooks.
#include "attention_oracle.hpp"

#include <map>
#include <memory_resource>

using namespace cq;

namespace {

// Codebooks for 2 layers x 2 KV heads of dim 32, K and V differing, layers differing.
KVCodebooks small_codebooks(std::uint64_t seed, KeyRope key_rope = KeyRope::post, RopeConfig rope = {}) {
  KVCodebooks cb(2, 2, 32, {{{4, 6}, {8, 5}}, {{2, 4}, {4, 8}}}, key_rope, rope);
  for (std::size_t l = 0; l < 2; ++l)
    for (std::size_t h = 0; h < 2; ++h) {
      const LayerSpec& s = cb.spec(l);
      cb.set(l, h, test::random_codebook(32, s.key.channels, s.key.bits, seed + 10 * l + h),
             test::random_codebook(32, s.value.channels, s.value.bits, seed + 10 * l + h + 5));
    }
  return cb;
}

PagedCacheOptions small_options(std::size_t page_tokens = 64, std::size_t full_rows = 8) {
  PagedCacheOptions o;
  o.page_tokens = page_tokens;
  o.full_page_rows = full_rows;
  o.window = 8;
  o.sinks = 2;
  o.max_rollback = 4;
  o.max_sequences = 40;
  o.code_pages = 400;
  o.full_pages = 400;
  return o;
}

constexpr std::size_t width = 2 * 32;    // kv_heads x head_dim
constexpr std::size_t qwidth = 2 * width;  // GQA group 2

// Rows for a token range of one "stream" (the same stream gives the same rows).
std::vector<float> stream_rows(std::uint64_t stream, std::size_t layer, bool values, std::size_t first, std::size_t n) {
  std::vector<float> all = test::random_normal((first + n) * width, stream * 1000 + layer * 10 + values);
  return std::vector<float>(all.begin() + std::ptrdiff_t(first * width), all.end());
}

template <class Cache>
void append_stream(Cache& c, SeqId s, std::uint64_t stream, std::size_t first, std::size_t n) {
  for (std::size_t l = 0; l < 2; ++l) {
    const auto k = stream_rows(stream, l, false, first, n), v = stream_rows(stream, l, true, first, n);
    c.append(l, s, ConstMatrixView<float>(k.data(), n, width), ConstMatrixView<float>(v.data(), n, width));
  }
}

// Attention of the last `rows` positions of sequence s, every layer, queries from `seed`.
template <class Cache>
std::vector<float> attend_seq(const Cache& c, SeqId s, std::size_t rows, std::uint64_t seed) {
  std::vector<float> all;
  for (std::size_t l = 0; l < 2; ++l) {
    const auto q = test::random_normal(rows * qwidth, seed + l);
    std::vector<float> out(rows * qwidth);
    c.attend(l, s, ConstMatrixView<float>(q.data(), rows, qwidth), MatrixView<float>(out.data(), rows, qwidth));
    all.insert(all.end(), out.begin(), out.end());
  }
  return all;
}

// Counts what goes through a memory resource.
class CountingResource : public std::pmr::memory_resource {
 public:
  std::size_t outstanding = 0, allocations = 0;

 private:
  void* do_allocate(std::size_t bytes, std::size_t align) override {
    outstanding += bytes;
    ++allocations;
    return std::pmr::new_delete_resource()->allocate(bytes, align);
  }
  void do_deallocate(void* p, std::size_t bytes, std::size_t align) override {
    outstanding -= bytes;
    std::pmr::new_delete_resource()->deallocate(p, bytes, align);
  }
  bool do_is_equal(const memory_resource& o) const noexcept override { return this == &o; }
};

}  // namespace

TEST_CASE("paged cache: a batch of 16 sequences of different lengths equals 16 one-sequence runs bit for bit") {
  const KVCodebooks cb = small_codebooks(1);
  PagedKVCache<float> batched(cb, small_options());
  std::vector<SeqId> ids;
  std::vector<std::size_t> lengths;
  for (std::size_t i = 0; i < 16; ++i) {
    ids.push_back(batched.add_sequence());
    lengths.push_back(i == 0 ? 0 : 1 + (i * 37) % 300);  // one empty sequence, the rest 2..300
  }
  // Prefill: one batched append per layer (ragged rows via indptr), then decode steps batched.
  for (std::size_t l = 0; l < 2; ++l) {
    std::vector<std::size_t> indptr{0};
    std::vector<float> k, v;
    for (std::size_t i = 0; i < 16; ++i) {
      const auto ki = stream_rows(i, l, false, 0, lengths[i]), vi = stream_rows(i, l, true, 0, lengths[i]);
      k.insert(k.end(), ki.begin(), ki.end());
      v.insert(v.end(), vi.begin(), vi.end());
      indptr.push_back(indptr.back() + lengths[i]);
    }
    batched.append(l, ids, indptr, ConstMatrixView<float>(k.data(), indptr.back(), width),
                   ConstMatrixView<float>(v.data(), indptr.back(), width));
  }
  for (std::size_t step = 0; step < 3; ++step)
    for (std::size_t l = 0; l < 2; ++l) {
      std::vector<float> k, v;
      std::vector<std::size_t> indptr{0};
      for (std::size_t i = 0; i < 16; ++i) {
        const auto ki = stream_rows(i, l, false, lengths[i] + step, 1), vi = stream_rows(i, l, true, lengths[i] + step, 1);
        k.insert(k.end(), ki.begin(), ki.end());
        v.insert(v.end(), vi.begin(), vi.end());
        indptr.push_back(i + 1);
      }
      batched.append(l, ids, indptr, ConstMatrixView<float>(k.data(), 16, width), ConstMatrixView<float>(v.data(), 16, width));
    }
  // Batched attention: a decode query for most, 3 queries (speculative) for every fourth.
  std::vector<std::size_t> qptr{0};
  for (std::size_t i = 0; i < 16; ++i) qptr.push_back(qptr.back() + (i % 4 == 3 ? 3 : 1));
  ThreadPool pool(3);
  for (std::size_t l = 0; l < 2; ++l) {
    const auto q = test::random_normal(qptr.back() * qwidth, 77 + l);
    std::vector<float> out(q.size());
    batched.attend(l, ids, qptr, ConstMatrixView<float>(q.data(), qptr.back(), qwidth),
                   MatrixView<float>(out.data(), qptr.back(), qwidth), {.executor = &pool});
    for (std::size_t i = 0; i < 16; ++i) {
      PagedKVCache<float> single(cb, small_options());
      const SeqId s = single.add_sequence();
      append_stream(single, s, i, 0, lengths[i]);
      for (std::size_t step = 0; step < 3; ++step) append_stream(single, s, i, lengths[i] + step, 1);
      const std::size_t rows = qptr[i + 1] - qptr[i];
      std::vector<float> one(rows * qwidth);
      single.attend(l, s, ConstMatrixView<float>(q.data() + qptr[i] * qwidth, rows, qwidth),
                    MatrixView<float>(one.data(), rows, qwidth));
      CAPTURE(i);
      REQUIRE(std::equal(one.begin(), one.end(), out.begin() + std::ptrdiff_t(qptr[i] * qwidth)));
      // And the oracle, for every query row and KV head.
      for (std::size_t r = 0; r < rows; ++r)
        for (std::size_t h = 0; h < 2; ++h) {
          const auto ref = test::oracle_attend(single.head_view(l, s, h), q.data() + (qptr[i] + r) * qwidth + h * width, 2,
                                               lengths[i] + 3 - rows + r, 1.0f / std::sqrt(32.0f));
          CHECK(test::relative_error(out.data() + (qptr[i] + r) * qwidth + h * width, ref) < 1e-5);
        }
    }
  }
}

TEST_CASE("paged cache: fork + divergent appends equal two independent sequences; shared pages are copied on write") {
  for (std::size_t prefix : {std::size_t{1}, std::size_t{100}, std::size_t{128}, std::size_t{130}}) {
    CAPTURE(prefix);
    const KVCodebooks cb = small_codebooks(2);
    PagedKVCache<float> c(cb, small_options());
    const SeqId a = c.add_sequence();
    append_stream(c, a, 5, 0, prefix);
    const MemoryUsage before = c.memory();
    const SeqId b = c.fork(a);
    CHECK(c.memory().codes_in_use == before.codes_in_use);  // nothing copied yet
    CHECK(c.memory().full_in_use == before.full_in_use);
    // Divergent continuations: a continues stream 5; b takes stream 6's rows after the prefix.
    append_stream(c, a, 5, prefix, 20);
    append_stream(c, b, 6, prefix, 33);
    // References: independent sequences built from scratch.
    PagedKVCache<float> r(cb, small_options());
    const SeqId ra = r.add_sequence(), rb = r.add_sequence();
    append_stream(r, ra, 5, 0, prefix + 20);
    append_stream(r, rb, 5, 0, prefix);
    append_stream(r, rb, 6, prefix, 33);
    CHECK(attend_seq(c, a, 4, 9) == attend_seq(r, ra, 4, 9));
    CHECK(attend_seq(c, b, 4, 9) == attend_seq(r, rb, 4, 9));
    // Freeing one side leaves the other intact; freeing both returns every page.
    c.free_sequence(a);
    CHECK(attend_seq(c, b, 2, 10) == attend_seq(r, rb, 2, 10));
    c.free_sequence(b);
    CHECK(c.memory().codes_in_use == 0);
    CHECK(c.memory().full_in_use == 0);
  }
}

TEST_CASE("paged cache: truncate / append / fork stress against an fp32 shadow") {
  // Several sequences, random appends (tokens and chunks), rollbacks within the contract, forks
  // and frees; after every step each live sequence's tokens read back exactly (full precision
  // inside sinks and window, else the scalar quantizer's reconstruction of what was appended).
  const KVCodebooks cb = small_codebooks(3);
  PagedKVCache<float> c(cb, small_options(32, 4));
  struct Shadow {
    std::vector<float> k[2], v[2];  // (tokens, width) per layer
    std::size_t last_append = 0;
    bool rolled = false;  // rolled back since the last append (a further rollback may be refused)
  };
  std::map<SeqId, Shadow> live;
  cq::detail::Rng rng(99);
  auto reference = [&](const std::vector<float>& rows, std::size_t p, std::size_t h, const Codebook& book) {
    std::vector<float> out(32);
    PackedCodes code(book.groups(), book.bits(), 1);
    encode_rows<backend::Scalar>(book.view(), ConstMatrixView<float>(rows.data() + p * width + h * 32, 1, 32), code.view(), 0);
    backend::Scalar::decode(book.view(), code.view(), 0, MatrixView<float>(out.data(), 1, 32));
    return out;
  };
  std::size_t checks = 0;
  for (int step = 0; step < 400; ++step) {
    const std::uint64_t what = rng.below(10);
    if (live.empty() || what == 0) {
      if (c.live_sequences() < 8) live.emplace(c.add_sequence(), Shadow{});
      continue;
    }
    auto it = live.begin();
    std::advance(it, std::ptrdiff_t(rng.below(live.size())));
    const SeqId s = it->first;
    Shadow& sh = it->second;
    const std::size_t n = c.length(s);
    if (what == 1 && live.size() < 8) {  // fork
      live.emplace(c.fork(s), sh);
    } else if (what == 2 && live.size() > 2) {  // free
      c.free_sequence(s);
      live.erase(it);
      continue;
    } else if (what == 3 && n > 0) {  // rollback: the last append + max_rollback always works
      const std::size_t back = rng.below(std::min(n, sh.last_append + 4) + 1);
      if (sh.rolled) {
        try {
          c.truncate(s, n - back);
        } catch (const Error& e) {
          REQUIRE(std::string(e.what()).find("cannot roll") != std::string::npos);
          REQUIRE(c.length(s) == n);
          continue;
        }
      } else {
        c.truncate(s, n - back);
      }
      for (std::size_t l = 0; l < 2; ++l) {
        sh.k[l].resize((n - back) * width);
        sh.v[l].resize((n - back) * width);
      }
      sh.rolled = true;
    } else {  // append a token or a chunk to every layer
      const std::size_t m = rng.below(4) == 0 ? 1 + rng.below(70) : 1;
      for (std::size_t l = 0; l < 2; ++l) {
        const auto k = test::random_normal(m * width, rng.next()), v = test::random_normal(m * width, rng.next());
        c.append(l, s, ConstMatrixView<float>(k.data(), m, width), ConstMatrixView<float>(v.data(), m, width));
        sh.k[l].insert(sh.k[l].end(), k.begin(), k.end());
        sh.v[l].insert(sh.v[l].end(), v.begin(), v.end());
      }
      sh.last_append = m;
      sh.rolled = false;
    }
    for (auto& [id, shd] : live) {
      const std::size_t len = c.length(id);
      REQUIRE(len * width == shd.k[0].size());
      if (len == 0) continue;
      const VisibleTokens vis = visible_tokens(len - 1, 2, 8);
      for (std::size_t l = 0; l < 2; ++l)
        for (std::size_t p = 0; p < len; ++p) {
          const std::size_t h = p % 2;
          float k[32], v[32];
          c.read_token(l, id, h, p, k, v);
          const bool exact = p < vis.sink_end || p >= vis.window_begin;
          const auto kr = exact ? std::vector<float>(shd.k[l].begin() + std::ptrdiff_t(p * width + h * 32),
                                                     shd.k[l].begin() + std::ptrdiff_t(p * width + h * 32 + 32))
                                : reference(shd.k[l], p, h, cb.key(l, h));
          const auto vr = exact ? std::vector<float>(shd.v[l].begin() + std::ptrdiff_t(p * width + h * 32),
                                                     shd.v[l].begin() + std::ptrdiff_t(p * width + h * 32 + 32))
                                : reference(shd.v[l], p, h, cb.value(l, h));
          REQUIRE(std::equal(k, k + 32, kr.begin()));
          REQUIRE(std::equal(v, v + 32, vr.begin()));
          ++checks;
        }
      // And attention against the oracle for the last token.
      const auto q = test::random_normal(qwidth, step);
      std::vector<float> out(qwidth);
      c.attend(1, id, ConstMatrixView<float>(q.data(), 1, qwidth), MatrixView<float>(out.data(), 1, qwidth));
      for (std::size_t h = 0; h < 2; ++h)
        CHECK(test::relative_error(out.data() + h * width,
                                   test::oracle_attend(c.head_view(1, id, h), q.data() + h * width, 2, len - 1,
                                                       1.0f / std::sqrt(32.0f))) < 1e-5);
    }
  }
  MESSAGE(checks, " token checks");
  for (auto& [id, shd] : live) c.free_sequence(id);
  CHECK(c.memory().codes_in_use == 0);
  CHECK(c.memory().full_in_use == 0);
}

TEST_CASE("paged cache: memory figures equal what the memory resource handed out") {
  CountingResource counting;
  const KVCodebooks cb = small_codebooks(4);
  {
    PagedCacheOptions o = small_options();
    o.memory = &counting;
    PagedKVCache<float> c(cb, o);
    auto check = [&] {
      const MemoryUsage m = c.memory();
      CHECK(m.codes + m.full + m.tables == counting.outstanding);
      CHECK(m.codebooks == cb.memory());
      CHECK(m.codes == 400 * c.plan().code_page_bytes());
      CHECK(m.full == 400 * c.plan().full_page_bytes());
    };
    check();
    const std::size_t allocations = counting.allocations;
    std::vector<SeqId> ids;
    for (int i = 0; i < 5; ++i) {
      ids.push_back(c.add_sequence());
      append_stream(c, ids.back(), i, 0, 50 + 60 * std::size_t(i));
    }
    ids.push_back(c.fork(ids[2]));
    check();
    const MemoryUsage m = c.memory();
    std::size_t code_pages = 0;  // a fork shares all pages
    for (int i = 0; i < 5; ++i) code_pages += c.plan().code_pages_for(50 + 60 * std::size_t(i));
    CHECK(m.codes_in_use == code_pages * c.plan().code_page_bytes());
    MESSAGE("allocations after construction: ", counting.allocations - allocations, " (page tables as they grow)");
  }
  CHECK(counting.outstanding == 0);
}

TEST_CASE("paged cache: an engine-supplied pool holds every page; nothing of it is allocated") {
  CountingResource counting;
  const KVCodebooks cb = small_codebooks(5);
  PagedCacheOptions o = small_options();
  o.memory = &counting;
  const MemoryPlan plan(cb, o, sizeof(float));
  std::vector<std::byte> storage(plan.pool_bytes(o) + 64);
  std::byte* aligned = storage.data() + (64 - reinterpret_cast<std::uintptr_t>(storage.data()) % 64) % 64;
  o.pool_memory = std::span<std::byte>(aligned, plan.pool_bytes(o));
  PagedKVCache<float> c(cb, o);
  CHECK(counting.outstanding == c.memory().tables);  // only tables came from the resource
  const SeqId s = c.add_sequence();
  append_stream(c, s, 1, 0, 200);
  PagedKVCache<float> r(cb, small_options());
  const SeqId rs = r.add_sequence();
  append_stream(r, rs, 1, 0, 200);
  CHECK(attend_seq(c, s, 3, 4) == attend_seq(r, rs, 3, 4));
  o.pool_memory = std::span<std::byte>(aligned, plan.pool_bytes(o) - 1);
  CQ_CHECK_THROWS_CONTAINING((PagedKVCache<float>(cb, o)), "the engine's pool memory holds");
}

TEST_CASE("paged cache: the memory plan sizes a pool that holds exactly its sequences") {
  const KVCodebooks cb = small_codebooks(6);
  const MemoryPlan plan(cb, small_options(), sizeof(float));
  const PagedCacheOptions o = plan.pool_for(4, 500, 1);
  PagedKVCache<float> c(cb, o);
  std::vector<SeqId> ids;
  for (int i = 0; i < 4; ++i) ids.push_back(c.add_sequence());
  for (std::size_t t = 0; t < 500; ++t)
    for (SeqId s : ids) append_stream(c, s, s, t, 1);
  CHECK(c.memory().codes_in_use <= c.memory().codes);
  // One more token for one sequence needs a fresh code page only if the plan had no slack: the
  // plan gave whole pages for 500 tokens, so token 501 fits unless 500 - S is a page multiple.
  CHECK(plan.code_pages_for(500) == (500 - 2 + 63) / 64);
}

TEST_CASE("paged cache: bad input is refused with a message, and nothing changes") {
  const KVCodebooks cb = small_codebooks(7);
  PagedCacheOptions o = small_options();
  o.code_pages = 3;
  o.full_pages = 40;
  o.max_sequences = 3;
  PagedKVCache<float> c(cb, o);
  const SeqId a = c.add_sequence();
  append_stream(c, a, 1, 0, 2 + 2 * 64);  // sinks + two code pages
  const auto before = attend_seq(c, a, 2, 3);
  const MemoryUsage mem = c.memory();
  // A full pool: a third and a fourth code page are needed for 70 more tokens.
  auto k = stream_rows(1, 0, false, 130, 70), v = stream_rows(1, 0, true, 130, 70);
  const SeqId b = c.add_sequence();
  append_stream(c, b, 2, 0, 40);  // takes the third code page
  CQ_CHECK_THROWS_CONTAINING(c.append(0, a, ConstMatrixView<float>(k.data(), 70, width), ConstMatrixView<float>(v.data(), 70, width)),
                             "the pool is full");
  CHECK(c.length(a) == 130);
  CHECK(attend_seq(c, a, 2, 3) == before);
  // Unknown and freed sequences.
  CQ_CHECK_THROWS_CONTAINING(c.length(7), "sequence 7 is not a live sequence");
  const SeqId d = c.add_sequence();
  c.free_sequence(d);
  CQ_CHECK_THROWS_CONTAINING(c.append(0, d, ConstMatrixView<float>(k.data(), 1, width), ConstMatrixView<float>(v.data(), 1, width)),
                             "is not a live sequence");
  CQ_CHECK_THROWS_CONTAINING(c.free_sequence(d), "is not a live sequence");
  // A fork of a fork past the sequence slots, then past the pool.
  const SeqId f1 = c.fork(b);
  CQ_CHECK_THROWS_CONTAINING(c.fork(f1), "all 3 sequence slots are in use");
  auto k1 = stream_rows(3, 0, false, 40, 1), v1 = stream_rows(3, 0, true, 40, 1);
  CQ_CHECK_THROWS_CONTAINING(c.append(0, f1, ConstMatrixView<float>(k1.data(), 1, width), ConstMatrixView<float>(v1.data(), 1, width)),
                             "the pool is full");  // copying the shared code page needs a fourth
  c.free_sequence(f1);
  // Truncate past the kept history.
  for (std::size_t t = 0; t < 20; ++t) append_stream(c, b, 2, 40 + t, 1);
  CQ_CHECK_THROWS_CONTAINING(c.truncate(b, 30), "cannot roll sequence");
  CQ_CHECK_THROWS_CONTAINING(c.truncate(b, 61), "61 tokens exceed layer 0's 60");
  CHECK(c.length(b) == 60);
  c.truncate(b, 60 - 4);  // max_rollback
  // Positions that go backwards or skip.
  std::size_t pos[2] = {56, 58};
  CQ_CHECK_THROWS_CONTAINING(c.append(0, b, ConstMatrixView<float>(k.data(), 2, width), ConstMatrixView<float>(v.data(), 2, width), pos),
                             "row 1 of sequence 1 has position 58 (positions skip; the next position is 57)");
  pos[0] = 55;
  CQ_CHECK_THROWS_CONTAINING(c.append(0, b, ConstMatrixView<float>(k.data(), 1, width), ConstMatrixView<float>(v.data(), 1, width), pos),
                             "has position 55 (positions go backwards; the next position is 56)");
  pos[0] = 56;
  pos[1] = 57;
  c.append(0, b, ConstMatrixView<float>(k.data(), 2, width), ConstMatrixView<float>(v.data(), 2, width), pos);
  CHECK(c.length(b, 0) == 58);
  CHECK(c.length(b, 1) == 56);
  // A batch naming a sequence twice, and indptr that does not cover the rows.
  const SeqId twice[2] = {a, a};
  const std::size_t ptr[3] = {0, 1, 2};
  CQ_CHECK_THROWS_CONTAINING(c.append(1, twice, ptr, ConstMatrixView<float>(k.data(), 2, width), ConstMatrixView<float>(v.data(), 2, width)),
                             "appears twice");
  const std::size_t bad_ptr[3] = {0, 1, 1};
  CQ_CHECK_THROWS_CONTAINING(c.append(1, twice, bad_ptr, ConstMatrixView<float>(k.data(), 2, width), ConstMatrixView<float>(v.data(), 2, width)),
                             "indptr must run from 0 to the 2 rows");
  CHECK(c.memory().codes_in_use >= mem.codes_in_use);
  // Codebooks for another shape, options that overflow, a RoPE mismatch.
  KVCodebooks other(2, 2, 64, {{{4, 6}, {8, 5}}});
  CQ_CHECK_THROWS_CONTAINING(other.set(0, 0, test::random_codebook(32, 4, 6, 1), test::random_codebook(32, 8, 5, 2)),
                             "key codebook of layer 0 head 0 is dim 32, C 4, 6 bits; the layer needs dim 64, C 4, 6 bits");
  PagedCacheOptions huge = small_options();
  huge.window = SIZE_MAX;
  CQ_CHECK_THROWS_CONTAINING((PagedKVCache<float>(cb, huge)), "window 18446744073709551615 exceeds 2^40 tokens");
  huge = small_options();
  huge.code_pages = SIZE_MAX / 2;
  CQ_CHECK_THROWS_CONTAINING((PagedKVCache<float>(cb, huge)), "9223372036854775807 pages exceed the 32-bit page ids");
#if !CQ_TEST_SANITIZED  // sanitizer allocators abort on such a request instead of failing it
  huge = small_options();
  huge.full_pages = UINT32_MAX - 1;  // 2^32 pages of 8 KiB: no machine has that memory
  CQ_CHECK_THROWS_CONTAINING((PagedKVCache<float>(cb, huge)), "full-precision pages: cannot allocate");
#endif
  PagedCacheOptions pre = small_options();
  pre.pre_rope_keys = true;
  CQ_CHECK_THROWS_CONTAINING((PagedKVCache<float>(cb, pre)), "the cache takes pre-RoPE keys but the key codebooks were fitted on post-RoPE keys");
  RopeConfig r500;
  r500.theta = 500000.0;
  const KVCodebooks pre_cb = small_codebooks(8, KeyRope::pre, r500);
  CQ_CHECK_THROWS_CONTAINING((PagedKVCache<float>(pre_cb, pre)),
                             "the cache's RoPE (theta 10000, rotate_half) differs from the one the key codebooks were fitted with (theta 500000, rotate_half)");
  const KVCodebooks unknown = small_codebooks(8, KeyRope::unknown);
  CQ_CHECK_THROWS_CONTAINING((PagedKVCache<float>(unknown, small_options())), "do not record whether keys were coded");
}

#include "alloc_failure.hpp"

namespace {

// Everything observable of a cache's sequences: lengths, every token as read back, and attention
// of the last 3 positions of every layer.
template <class Cache>
std::vector<float> snapshot(const Cache& c, const std::vector<SeqId>& seqs) {
  std::vector<float> all;
  for (SeqId s : seqs) {
    if (!c.live(s)) {
      all.push_back(-1.0f);
      continue;
    }
    for (std::size_t l = 0; l < 2; ++l) {
      const std::size_t n = c.length(s, l);
      all.push_back(float(n));
      for (std::size_t p = 0; p < n; ++p)
        for (std::size_t h = 0; h < 2; ++h) {
          float k[32], v[32];
          c.read_token(l, s, h, p, k, v);
          all.insert(all.end(), k, k + 32);
          all.insert(all.end(), v, v + 32);
        }
    }
    if (c.length(s, 0) >= 3 && c.length(s, 1) >= 3) {
      const auto a = attend_seq(c, s, 3, 77);
      all.insert(all.end(), a.begin(), a.end());
    }
  }
  return all;
}

}  // namespace

TEST_CASE("paged cache: a failed allocation in any mutating call leaves every sequence as it was") {
  // The input: a 30-token append after 20 tokens, with the N-th allocation failing, for
  // every N; then the same for the batched append, fork, reserve, add_sequence and truncate. After
  // each failure the cache must read back exactly as before, and the retry must give what a cache
  // that never failed gives.
  const KVCodebooks cb = small_codebooks(9);
  PagedKVCache<float> c(cb, small_options(32, 4));
  const SeqId a = c.add_sequence(), b = c.add_sequence();
  append_stream(c, a, 1, 0, 20);
  append_stream(c, b, 2, 0, 70);
  const SeqId f = c.fork(b);
  std::vector<SeqId> seqs{a, b, f};
  seqs.reserve(16);  // (the sweeps push ids: no allocation of the test's own may fail)
  auto sweep = [&](const std::string& what, auto&& call) {
    CAPTURE(what);
    const auto before = snapshot(c, seqs);
    const MemoryUsage m = c.memory();
    const std::size_t broken = test::for_each_allocation_failure(call, [&] {
      CHECK(snapshot(c, seqs) == before);
      CHECK(c.memory().codes_in_use == m.codes_in_use);
      CHECK(c.memory().full_in_use == m.full_in_use);
    });
    MESSAGE(what, ": ", broken, " injected failures");
  };
  const auto k = stream_rows(1, 0, false, 20, 30), v = stream_rows(1, 0, true, 20, 30);
  sweep("append 30 tokens", [&] {
    c.append(0, a, ConstMatrixView<float>(k.data(), 30, width), ConstMatrixView<float>(v.data(), 30, width));
  });
  sweep("append to layer 1", [&] {
    c.append(1, a, ConstMatrixView<float>(k.data(), 30, width), ConstMatrixView<float>(v.data(), 30, width));
  });
  const SeqId both[2] = {b, f};
  const std::size_t ptr[3] = {0, 1, 30};
  sweep("batched append into shared pages", [&] {
    c.append(0, both, ptr, ConstMatrixView<float>(k.data(), 30, width), ConstMatrixView<float>(v.data(), 30, width));
  });
  sweep("fork", [&] { seqs.push_back(c.fork(a)); });
  sweep("reserve", [&] { c.reserve(a, 200); });
  sweep("add_sequence", [&] { seqs.push_back(c.add_sequence()); });
  sweep("truncate", [&] { c.truncate(a, 48); });
  // The retried state equals a cache that never failed.
  PagedKVCache<float> r(cb, small_options(32, 4));
  const SeqId ra = r.add_sequence();
  append_stream(r, ra, 1, 0, 20);
  for (std::size_t l = 0; l < 2; ++l)
    r.append(l, ra, ConstMatrixView<float>(k.data(), 30, width), ConstMatrixView<float>(v.data(), 30, width));
  r.truncate(ra, 48);
  CHECK(snapshot(c, {a}) == snapshot(r, {ra}));
}

TEST_CASE("KVCache: a failed allocation in append (pool growth included) leaves the cache as it was") {
  // One layer, one KV head, D 32, CQ-8c8b; 20 tokens, then a 30-token append failing at every N.
  KVCacheConfig cfg;
  cfg.head_dim = 32;
  cfg.spec = {{8, 8}, {8, 8}};
  cfg.page_tokens = 32;
  KVCache<float> cache(cfg);
  cache.set_codebooks(0, 0, test::random_codebook(32, 8, 8, 1), test::random_codebook(32, 8, 8, 2));
  const auto k = test::random_normal(50 * 32, 3), v = test::random_normal(50 * 32, 4);
  cache.append(0, ConstMatrixView<float>(k.data(), 20, 32), ConstMatrixView<float>(v.data(), 20, 32));
  auto state = [&] {
    std::vector<float> s{float(cache.size())};
    for (std::size_t p = 0; p < cache.size(); ++p) {
      float kk[32], vv[32];
      cache.read_token(0, 0, p, kk, vv);
      s.insert(s.end(), kk, kk + 32);
      s.insert(s.end(), vv, vv + 32);
    }
    return s;
  };
  const auto before = state();
  const std::size_t broken = test::for_each_allocation_failure(
      [&] { cache.append(0, ConstMatrixView<float>(k.data() + 20 * 32, 30, 32), ConstMatrixView<float>(v.data() + 20 * 32, 30, 32)); },
      [&] { CHECK(state() == before); });
  CHECK(broken >= 1);
  CHECK(cache.size() == 50);
  KVCache<float> clean(cfg);
  clean.set_codebooks(0, 0, test::random_codebook(32, 8, 8, 1), test::random_codebook(32, 8, 8, 2));
  clean.append(0, ConstMatrixView<float>(k.data(), 50, 32), ConstMatrixView<float>(v.data(), 50, 32));
  for (std::size_t p = 0; p < 50; ++p) {
    float k1[32], v1[32], k2[32], v2[32];
    cache.read_token(0, 0, p, k1, v1);
    clean.read_token(0, 0, p, k2, v2);
    REQUIRE(std::equal(k1, k1 + 32, k2));
    REQUIRE(std::equal(v1, v1 + 32, v2));
  }
}

#include "work_stealing_executor.hpp"

TEST_CASE("paged cache: concurrent attend calls on a work-stealing executor equal serial calls (thread safety)") {
  // Two caches attended from two threads through one work-stealing executor: a thread waiting in
  // parallel_for runs pieces of the other call. Nothing of a call may live in thread-local state
  // across parallel_for (Executor's contract); results must equal the serial ones exactly.
  const KVCodebooks cb = small_codebooks(10);
  PagedKVCache<float> c1(cb, small_options()), c2(cb, small_options());
  std::vector<SeqId> s1, s2;
  for (std::size_t i = 0; i < 3; ++i) {
    s1.push_back(c1.add_sequence());
    s2.push_back(c2.add_sequence());
    for (std::size_t t = 0; t < 1500 + 300 * i; t += 100) append_stream(c1, s1.back(), 10 + i, t, 100);  // long: in pieces
    for (std::size_t t = 0; t < 2100 - 400 * i; t += 100) append_stream(c2, s2.back(), 20 + i, t, 100);
  }
  const std::size_t ptr[4] = {0, 1, 2, 3};
  auto run = [&](const PagedKVCache<float>& c, const std::vector<SeqId>& s, Executor* exec, std::uint64_t seed) {
    const auto q = test::random_normal(3 * qwidth, seed);
    std::vector<float> out(3 * qwidth);
    for (std::size_t l = 0; l < 2; ++l)
      c.attend(l, s, ptr, ConstMatrixView<float>(q.data(), 3, qwidth), MatrixView<float>(out.data(), 3, qwidth),
               {.executor = exec});
    return out;
  };
  const auto want1 = run(c1, s1, nullptr, 5), want2 = run(c2, s2, nullptr, 6);
  test::WorkStealingExecutor ws(3);
  for (int rep = 0; rep < 5; ++rep) {
    std::vector<float> got1, got2;
    std::thread t([&] { got1 = run(c1, s1, &ws, 5); });
    got2 = run(c2, s2, &ws, 6);
    t.join();
    REQUIRE(test::relative_error(got1.data(), std::vector<double>(want1.begin(), want1.end())) < 1e-6);
    REQUIRE(test::relative_error(got2.data(), std::vector<double>(want2.begin(), want2.end())) < 1e-6);
  }
}
