#include "attention_oracle.hpp"

using namespace cq;

namespace {

KVCacheConfig small_config(std::size_t window = 8, std::size_t sinks = 2) {
  KVCacheConfig cfg;
  cfg.layers = 2;
  cfg.kv_heads = 2;
  cfg.head_dim = 32;
  cfg.layer_specs = {{{4, 6}, {8, 5}}, {{2, 4}, {4, 8}}};  // K and V differ, layers differ
  cfg.window = window;
  cfg.sinks = sinks;
  cfg.max_rollback = 16;
  return cfg;
}

template <class Cache>
void install_codebooks(Cache& cache, std::uint64_t seed) {
  const auto& cfg = cache.config();
  for (std::size_t l = 0; l < cfg.layers; ++l)
    for (std::size_t h = 0; h < cfg.kv_heads; ++h) {
      const LayerSpec& s = cfg.layer_spec(l);
      cache.set_codebooks(l, h, test::random_codebook(cfg.head_dim, s.key.channels, s.key.bits, seed + l * 10 + h),
                          test::random_codebook(cfg.head_dim, s.value.channels, s.value.bits, seed + l * 10 + h + 5));
    }
}

// Attention outputs of every layer for the last `rows` positions, with `q_heads` query heads.
template <class Cache>
std::vector<float> attend_all(const Cache& cache, std::size_t rows, std::uint64_t seed, Executor* exec = nullptr) {
  const auto& cfg = cache.config();
  const std::size_t width = 2 * cfg.kv_heads * cfg.head_dim;  // GQA group 2
  std::vector<float> all;
  for (std::size_t l = 0; l < cfg.layers; ++l) {
    const auto q = test::random_normal(rows * width, seed + l);
    std::vector<float> out(rows * width);
    AttendOptions opt;
    opt.executor = exec;
    cache.attend(l, ConstMatrixView<float>(q.data(), rows, width), MatrixView<float>(out.data(), rows, width), opt);
    all.insert(all.end(), out.begin(), out.end());
  }
  return all;
}

}  // namespace

TEST_CASE("KVCache never loses or duplicates a token across window flushes") {
  KVCache<float> cache(small_config());
  install_codebooks(cache, 1);
  const std::size_t width = 2 * 32, total = 300;
  std::vector<float> keys[2], values[2];
  for (std::size_t l = 0; l < 2; ++l) {
    keys[l] = test::random_normal(total * width, 10 + l);
    values[l] = test::random_normal(total * width, 20 + l);
  }
  std::size_t t = 0;
  while (t < total) {
    const std::size_t take = std::min<std::size_t>(total - t, t % 3 == 0 ? 1 : 1 + t % 29);
    for (std::size_t l = 0; l < 2; ++l)
      cache.append(l, ConstMatrixView<float>(keys[l].data() + t * width, take, width),
                   ConstMatrixView<float>(values[l].data() + t * width, take, width));
    t += take;
    // Every position: exact inside sinks and window, otherwise exactly the quantizer's
    // reconstruction of what was appended.
    for (std::size_t l = 0; l < 2; ++l)
      for (std::size_t h = 0; h < 2; ++h) {
        const KVHeadView<float> v = cache.head_view(l, h);
        for (std::size_t p = 0; p < t; ++p) {
          float k[32], val[32], kq[32], vq[32];
          cache.read_token(l, h, p, k, val);
          const float* ka = keys[l].data() + p * width + h * 32;
          const float* va = values[l].data() + p * width + h * 32;
          const bool exact = p < 2 || p + 8 >= t;
          if (exact) {
            REQUIRE(std::equal(k, k + 32, ka));
            REQUIRE(std::equal(val, val + 32, va));
          } else {
            PackedCodes kc(v.key_codebook.groups, v.key_codebook.bits, 1), vc(v.value_codebook.groups, v.value_codebook.bits, 1);
            encode_rows<backend::Scalar>(v.key_codebook, ConstMatrixView<float>(ka, 1, 32), kc.view(), 0);
            encode_rows<backend::Scalar>(v.value_codebook, ConstMatrixView<float>(va, 1, 32), vc.view(), 0);
            backend::Scalar::decode(v.key_codebook, kc.view(), 0, MatrixView<float>(kq, 1, 32));
            backend::Scalar::decode(v.value_codebook, vc.view(), 0, MatrixView<float>(vq, 1, 32));
            REQUIRE(std::equal(k, k + 32, kq));
            REQUIRE(std::equal(val, val + 32, vq));
          }
        }
      }
  }
  CHECK(cache.size(0) == total);
  CHECK(cache.size(1) == total);
}

TEST_CASE("KVCache attention equals the oracle for every KV head and GQA query head") {
  auto cache = test::random_cache<float>(small_config(), 200, 3);
  const std::size_t width = 2 * 2 * 32;
  const auto q = test::random_normal(width, 4);
  std::vector<float> out(width);
  cache.attend(1, ConstMatrixView<float>(q.data(), 1, width), MatrixView<float>(out.data(), 1, width));
  for (std::size_t h = 0; h < 2; ++h) {
    const auto ref = test::oracle_attend(cache.head_view(1, h), q.data() + h * 64, 2, 199, 1.0f / std::sqrt(32.0f));
    CHECK(test::relative_error(out.data() + h * 64, ref) < 1e-5);
  }
}

TEST_CASE("chunked prefill equals token-by-token decoding") {
  KVCacheConfig cfg = small_config(8, 2);
  KVCache<float> chunked(cfg), stepped(cfg);
  install_codebooks(chunked, 5);
  install_codebooks(stepped, 5);
  const std::size_t width = 64, n = 120, qwidth = 128;
  const auto k = test::random_normal(n * width, 6), v = test::random_normal(n * width, 7);
  const auto q = test::random_normal(n * qwidth, 8);
  for (std::size_t l = 0; l < 2; ++l) {
    // Chunked: append 100, then a chunk of 20 with its 20 queries at once.
    chunked.append(l, ConstMatrixView<float>(k.data(), 100, width), ConstMatrixView<float>(v.data(), 100, width));
    chunked.append(l, ConstMatrixView<float>(k.data() + 100 * width, 20, width), ConstMatrixView<float>(v.data() + 100 * width, 20, width));
    std::vector<float> a(20 * qwidth), b(qwidth);
    chunked.attend(l, ConstMatrixView<float>(q.data() + 100 * qwidth, 20, qwidth), MatrixView<float>(a.data(), 20, qwidth));
    // Stepped: one token at a time, attending after each.
    stepped.append(l, ConstMatrixView<float>(k.data(), 100, width), ConstMatrixView<float>(v.data(), 100, width));
    for (std::size_t i = 0; i < 20; ++i) {
      stepped.append(l, ConstMatrixView<float>(k.data() + (100 + i) * width, 1, width),
                     ConstMatrixView<float>(v.data() + (100 + i) * width, 1, width));
      stepped.attend(l, ConstMatrixView<float>(q.data() + (100 + i) * qwidth, 1, qwidth), MatrixView<float>(b.data(), 1, qwidth));
      for (std::size_t j = 0; j < qwidth; ++j) REQUIRE(a[i * qwidth + j] == doctest::Approx(b[j]).epsilon(1e-6));
    }
  }
}

TEST_CASE("a full fixed-capacity cache throws and stays exactly as it was") {
  KVCacheConfig cfg = small_config();
  cfg.capacity = 50;
  KVCache<float> cache(cfg);
  install_codebooks(cache, 9);
  const auto k = test::random_normal(60 * 64, 10);
  for (std::size_t l = 0; l < 2; ++l)
    cache.append(l, ConstMatrixView<float>(k.data(), 45, 64), ConstMatrixView<float>(k.data(), 45, 64));
  const auto before = attend_all(cache, 3, 11);
  const MemoryUsage mem = cache.memory();
  CQ_CHECK_THROWS_CONTAINING(cache.append(0, ConstMatrixView<float>(k.data(), 6, 64), ConstMatrixView<float>(k.data(), 6, 64)),
                             "the cache is full: layer 0 holds 45 of 50 tokens and cannot take 6 more");
  CHECK(cache.size(0) == 45);
  CHECK(cache.memory().total() == mem.total());
  CHECK(attend_all(cache, 3, 11) == before);
  cache.append(0, ConstMatrixView<float>(k.data(), 5, 64), ConstMatrixView<float>(k.data(), 5, 64));  // exactly full
  CHECK(cache.size(0) == 50);
  CQ_CHECK_THROWS_CONTAINING(cache.append(0, ConstMatrixView<float>(k.data(), 1, 64), ConstMatrixView<float>(k.data(), 1, 64)),
                             "holds 50 of 50 tokens");
}

TEST_CASE("truncate then re-append equals never having appended") {
  const KVCacheConfig cfg = small_config(8, 2);
  const std::size_t width = 64;
  const auto k = test::random_normal(200 * width, 12), v = test::random_normal(200 * width, 13);
  const auto k2 = test::random_normal(30 * width, 14), v2 = test::random_normal(30 * width, 15);
  for (std::size_t cut : {std::size_t{150}, std::size_t{140}, std::size_t{3}, std::size_t{0}}) {
    CAPTURE(cut);
    KVCache<float> a(cfg), b(cfg);
    install_codebooks(a, 16);
    install_codebooks(b, 16);
    for (std::size_t l = 0; l < 2; ++l) {
      // a: 150 tokens (last 10 speculative), rolled back to `cut`, then 30 new ones.
      a.append(l, ConstMatrixView<float>(k.data(), 150, width), ConstMatrixView<float>(v.data(), 150, width));
    }
    a.truncate(cut);
    for (std::size_t l = 0; l < 2; ++l) {
      a.append(l, ConstMatrixView<float>(k2.data(), 30, width), ConstMatrixView<float>(v2.data(), 30, width));
      b.append(l, ConstMatrixView<float>(k.data(), cut, width), ConstMatrixView<float>(v.data(), cut, width));
      b.append(l, ConstMatrixView<float>(k2.data(), 30, width), ConstMatrixView<float>(v2.data(), 30, width));
    }
    CHECK(a.size(0) == cut + 30);
    CHECK(attend_all(a, 5, 17) == attend_all(b, 5, 17));
    for (std::size_t l = 0; l < 2; ++l)
      for (std::size_t p = 0; p < cut + 30; ++p) {
        float ka[32], va[32], kb[32], vb[32];
        a.read_token(l, 1, p, ka, va);
        b.read_token(l, 1, p, kb, vb);
        REQUIRE(std::equal(ka, ka + 32, kb));
        REQUIRE(std::equal(va, va + 32, vb));
      }
  }
}

TEST_CASE("truncate refuses to roll back past the full-precision history, unchanged") {
  KVCache<float> cache(small_config(8, 2));  // max_rollback 16
  install_codebooks(cache, 18);
  const auto k = test::random_normal(400 * 64, 19);
  for (std::size_t l = 0; l < 2; ++l)
    for (std::size_t t = 0; t < 400; ++t)
      cache.append(l, ConstMatrixView<float>(k.data() + t * 64, 1, 64), ConstMatrixView<float>(k.data() + t * 64, 1, 64));
  const auto before = attend_all(cache, 1, 20);
  CQ_CHECK_THROWS_CONTAINING(cache.truncate(300), "cannot roll sequence 0 back to 300 tokens");
  CQ_CHECK_THROWS_CONTAINING(cache.truncate(401), "401 tokens exceed layer 0's 400");
  CHECK(cache.size(0) == 400);
  CHECK(attend_all(cache, 1, 20) == before);
  cache.truncate(384);  // exactly max_rollback back
  CHECK(cache.size(1) == 384);
  cache.truncate(2);  // only sinks remain: always possible
  CHECK(cache.size(0) == 2);
}

TEST_CASE("memory accounting by part") {
  KVCacheConfig cfg;
  cfg.layers = 1;
  cfg.kv_heads = 2;
  cfg.head_dim = 64;
  cfg.spec = {{8, 8}, {4, 8}};
  cfg.window = 16;
  cfg.sinks = 4;
  cfg.max_rollback = 0;
  cfg.full_page_rows = 16;
  auto cache = test::random_cache<float>(cfg, 1000, 21);
  const MemoryUsage m = cache.memory();
  // Code pages of 256 tokens: per head 8 blocks x (8 key groups + 16 value groups) x 32 bytes.
  const std::size_t code_page = 2 * 8 * (8 + 16) * 32;
  CHECK(m.codes_in_use == (1000 - 4 + 255) / 256 * code_page);
  CHECK(m.codes >= m.codes_in_use);
  // Full-precision pages of 16 rows: per head 16 key and 16 value rows of 64 floats. One page
  // holds the 4 sinks; the window (16) and the last append (at most 41 rows) span the others.
  const std::size_t full_page = 2 * 2 * 16 * 64 * sizeof(float);
  CHECK(m.full_in_use >= (1 + 1) * full_page);
  CHECK(m.full_in_use <= (1 + (16 + 41 + 15) / 16 + 1) * full_page);
  // Codebooks: centroids and their transposed copy, counted once.
  std::size_t books = 0;
  for (std::size_t h = 0; h < 2; ++h) books += cache.key_codebook(0, h).allocated_bytes() + cache.value_codebook(0, h).allocated_bytes();
  CHECK(m.codebooks == books);
  CHECK(m.codebooks >= 2 * (64 * 256 + 64 * 256) * sizeof(float));
}

TEST_CASE("concurrent attend calls on one cache equal serial calls") {
  auto cache = test::random_cache<float>(small_config(), 500, 22);
  std::vector<std::vector<float>> serial(4), parallel(4);
  for (std::size_t i = 0; i < 4; ++i) serial[i] = attend_all(cache, 1 + i, 30 + i);
  std::vector<std::thread> threads;
  for (std::size_t i = 0; i < 4; ++i)
    threads.emplace_back([&, i] {
      for (int rep = 0; rep < 3; ++rep) parallel[i] = attend_all(cache, 1 + i, 30 + i);
    });
  for (auto& t : threads) t.join();
  CHECK(serial == parallel);
  ThreadPool pool(3);  // and an executor spreading (head, query) items over threads
  CHECK(attend_all(cache, 4, 33, &pool) == serial[3]);
}

TEST_CASE("KVCache rejects bad input with a message, unchanged") {
  CQ_CHECK_THROWS_CONTAINING(KVCache<float>([] {
                               KVCacheConfig c;
                               c.head_dim = 30;
                               c.spec.key = {8, 8};
                               return c;
                             }()),
                             "dim 30 is not a multiple of channels per group 8");
  KVCache<float> cache(small_config());
  const auto k = test::random_normal(10 * 64, 23);
  CQ_CHECK_THROWS_CONTAINING(cache.append(0, ConstMatrixView<float>(k.data(), 2, 64), ConstMatrixView<float>(k.data(), 2, 64)),
                             "layer 0 has no codebooks yet");
  install_codebooks(cache, 24);
  CQ_CHECK_THROWS_CONTAINING(cache.set_codebooks(0, 0, test::random_codebook(32, 8, 8, 1), test::random_codebook(32, 8, 5, 2)),
                             "key codebook of layer 0 head 0 is dim 32, C 8, 8 bits; the layer needs dim 32, C 4, 6 bits");
  CQ_CHECK_THROWS_CONTAINING(cache.append(0, ConstMatrixView<float>(k.data(), 2, 32), ConstMatrixView<float>(k.data(), 2, 32)),
                             "both must be tokens x (kv_heads * head_dim) = tokens x 64");
  CQ_CHECK_THROWS_CONTAINING(cache.append(2, ConstMatrixView<float>(k.data(), 2, 64), ConstMatrixView<float>(k.data(), 2, 64)),
                             "append: layer 2 out of range (layers = 2)");
  auto bad = k;
  bad[64 + 7] = std::numeric_limits<float>::quiet_NaN();
  CQ_CHECK_THROWS_CONTAINING(cache.append(0, ConstMatrixView<float>(k.data(), 2, 64), ConstMatrixView<float>(bad.data(), 2, 64)),
                             "append: values(1, 7) = nan is not finite");
  CHECK(cache.size(0) == 0);
  cache.append(0, ConstMatrixView<float>(k.data(), 3, 64), ConstMatrixView<float>(k.data(), 3, 64));
  std::vector<float> q(4 * 128), out(4 * 128);
  CQ_CHECK_THROWS_CONTAINING(cache.attend(0, ConstMatrixView<float>(q.data(), 4, 128), MatrixView<float>(out.data(), 4, 128)),
                             "4 query rows but sequence 0 holds 3 tokens in layer 0");
  CQ_CHECK_THROWS_CONTAINING(cache.attend(0, ConstMatrixView<float>(q.data(), 1, 96), MatrixView<float>(out.data(), 1, 96)),
                             "q has 96 columns");
  CQ_CHECK_THROWS_CONTAINING(cache.attend(0, ConstMatrixView<float>(q.data(), 1, 128), MatrixView<float>(out.data(), 1, 64)),
                             "out is 1 x 64, q is 1 x 128");
}

TEST_CASE("ThreadPool: every index runs once, exceptions reach the caller, pools come and go") {
  for (std::size_t threads : {1u, 2u, 3u, 5u}) {
    ThreadPool pool(threads);
    CHECK(pool.concurrency() == threads);
    for (std::size_t n : {0u, 1u, 7u, 1000u}) {
      std::vector<std::atomic<int>> hits(n);
      pool.parallel_for(n, [&](std::size_t i) { hits[i]++; });
      for (auto& h : hits) REQUIRE(h == 1);
    }
    CHECK_THROWS_WITH(pool.parallel_for(50, [](std::size_t i) {
      if (i == 17) throw std::runtime_error("item 17");
    }),
                      "item 17");
    std::atomic<int> after{0};
    pool.parallel_for(10, [&](std::size_t) { after++; });  // still usable after an exception
    CHECK(after == 10);
  }
  for (int i = 0; i < 200; ++i) {  // idle pools created and destroyed (a late-start hang once)
    ThreadPool pool(3);
    if (i % 2) pool.parallel_for(3, [](std::size_t) {});
  }
}

TEST_CASE("half-precision caches store no derived value: a key at half's edge, rotated, stays finite") {
  // Issue input: KVCache<half>, D 64, pre-RoPE keys, window 8; token 32's key channels 0 and 32 are
  // 50000 (a finite half). Rotated, the pair reaches ~69260 (beyond half's 65504): it must never
  // be stored in half. Attention must equal the same cache in float.
  KVCacheConfig cfg;
  cfg.head_dim = 64;
  cfg.spec = {{4, 8}, {4, 8}};
  cfg.window = 8;
  cfg.pre_rope_keys = true;
  KVCache<half> h(cfg);
  KVCache<float> f(cfg);
  const Codebook kc = test::random_codebook(64, 4, 8, 1), vc = test::random_codebook(64, 4, 8, 2);
  h.set_codebooks(0, 0, kc, vc);
  f.set_codebooks(0, 0, kc, vc);
  auto k = test::random_normal(40 * 64, 3), v = test::random_normal(40 * 64, 4);
  k[32 * 64 + 0] = 50000.0f;
  k[32 * 64 + 32] = 50000.0f;
  const auto kh = test::convert<half>(k), vh = test::convert<half>(v);
  const auto kf = test::convert<float>(std::vector<float>(kh.begin(), kh.end())), vf = test::convert<float>(std::vector<float>(vh.begin(), vh.end()));
  h.append(0, ConstMatrixView<half>(kh.data(), 40, 64), ConstMatrixView<half>(vh.data(), 40, 64));
  f.append(0, ConstMatrixView<float>(kf.data(), 40, 64), ConstMatrixView<float>(vf.data(), 40, 64));
  const auto q = test::random_normal(64, 5, 1e-5f);  // small query: the huge key does not swamp the softmax
  std::vector<float> oh(64), of(64);
  h.attend(0, ConstMatrixView<float>(q.data(), 1, 64), MatrixView<float>(oh.data(), 1, 64));
  f.attend(0, ConstMatrixView<float>(q.data(), 1, 64), MatrixView<float>(of.data(), 1, 64));
  for (float x : oh) REQUIRE(std::isfinite(x));
  CHECK(test::relative_error(oh.data(), std::vector<double>(of.begin(), of.end())) < 1e-5);
  // The row reads back as appended (before RoPE), not rotated.
  float key[64], value[64];
  h.read_token(0, 0, 32, key, value);
  CHECK(key[0] == float(half(50000.0f)));  // 49984, as stored
}
