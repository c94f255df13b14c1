// cq::cuda::PagedKVCache against the CPU cache, on the H200: the same calls on both (batched
// prefill chunks, decode steps, fork with copy-on-write, rollback, freed and re-added sequences,
// a refused append on a full pool) must leave the device pool equal to the CPU pool byte for byte
// (codes: ties between equidistant centroids aside), and decode attention through the device cache
// within 1e-3 relative error of the double-precision oracle over the CPU cache's views.
#include "../attention_oracle.hpp"
#include "cache_glue.hpp"
#include "gpu_glue.hpp"

#include <cq/cache/paged_kv_cache.hpp>

#include <doctest/doctest.h>

#include <cmath>
#include <memory>
#include <numeric>
#include <string>

using namespace cq;

namespace {

template <element_type T>
struct Pair {
  PagedKVCache<T>& cpu;
  gpu_test::DeviceCache<T>& gpu;
  const KVCodebooks& cb;
  std::uint64_t seed = 0;
  float soft_cap = 0.0f;  // the logit soft cap of check_attention's calls

  /// Appends `counts[i]` random rows to seqs[i] in every layer, on both caches.
  void append(const std::vector<SeqId>& seqs, const std::vector<std::size_t>& counts, bool heads_outer = false) {
    std::vector<std::size_t> indptr{0};
    for (std::size_t c : counts) indptr.push_back(indptr.back() + c);
    const std::size_t width = cb.kv_heads() * cb.head_dim(), rows = indptr.back();
    for (std::size_t l = 0; l < cb.layers(); ++l) {
      const std::vector<T> k = test::convert<T>(test::random_normal(rows * width, ++seed));
      const std::vector<T> v = test::convert<T>(test::random_normal(rows * width, ++seed));
      cpu.append(l, seqs, indptr, ConstMatrixView<T>(k.data(), rows, width), ConstMatrixView<T>(v.data(), rows, width));
      gpu.append(l, seqs, indptr, k, v, heads_outer);
      for (SeqId s : seqs) REQUIRE(gpu.length(s, l) == cpu.length(s, l));
    }
  }

  /// The device pool against the CPU's: codes may differ only at ties (counted, at most 1 in 2000
  /// codes plus 2), full-precision rows not at all.
  void check_pools(SeqId live) {
    const std::vector<std::uint8_t> got = gpu.pool();
    const MemoryUsage m = cpu.memory();
    REQUIRE(got.size() == m.codes + m.full);
    const KVHeadView<T> v = cpu.head_view(0, live, 0);
    const auto* codes = v.key_codes.pool;
    const auto* full = reinterpret_cast<const std::uint8_t*>(v.sink_keys.pool);
    std::size_t differ = 0;
    for (std::size_t i = 0; i < m.codes; ++i) differ += got[i] != codes[i];
    CHECK(differ <= 2 + m.codes_in_use / 2000);
    CHECK(std::memcmp(got.data() + m.codes, full, m.full) == 0);
  }

  /// Attention in every layer of each sequence's last token, or of its last rows[i] tokens (causal,
  /// speculative verification): the device against the oracle.
  double check_attention(const std::vector<SeqId>& seqs, int q_heads, DType q_type, DType out_type,
                         std::vector<std::size_t> rows = {}) {
    const std::size_t D = cb.head_dim(), H = cb.kv_heads(), group = std::size_t(q_heads) / H;
    std::vector<std::size_t> indptr{0};
    for (std::size_t i = 0; i < seqs.size(); ++i) indptr.push_back(indptr.back() + (rows.empty() ? 1 : rows[i]));
    double worst = 0.0;
    for (std::size_t l = 0; l < cb.layers(); ++l) {
      const std::vector<float> q = test::random_normal(indptr.back() * std::size_t(q_heads) * D, ++seed);
      std::vector<float> lse;
      const std::vector<float> out =
          gpu.attend(l, seqs, q_heads, q, q_type, out_type, &lse, rows.empty() ? std::span<const std::size_t>{} : indptr,
                     soft_cap);
      REQUIRE(out.size() == q.size());
      for (std::size_t i = 0; i < seqs.size(); ++i)
        for (std::size_t r = indptr[i]; r < indptr[i + 1]; ++r)
          for (std::size_t h = 0; h < H; ++h) {
            // The oracle gets the queries the device saw (rounded to q_type).
            std::vector<float> qh(q.begin() + std::ptrdiff_t((r * q_heads + h * group) * D),
                                  q.begin() + std::ptrdiff_t((r * q_heads + (h + 1) * group) * D));
            if (q_type == DType::f16)
              for (float& x : qh) x = float(half(x));
            const std::size_t pos = cpu.length(seqs[i], l) - (indptr[i + 1] - indptr[i]) + (r - indptr[i]);
            const auto ref = test::oracle_attend(cpu.head_view(l, seqs[i], h), qh.data(), group, pos,
                                                 1.0f / std::sqrt(float(D)), soft_cap);
            const double e = test::relative_error(out.data() + (r * q_heads + h * group) * D, ref);
            CAPTURE(l);
            CAPTURE(i);
            CAPTURE(r);
            CAPTURE(h);
            CHECK(e < 1e-3);
            worst = std::max(worst, e);
          }
      for (float x : lse) CHECK(std::isfinite(x));
    }
    return worst;
  }
};

/// Keys before RoPE (rope set) or after it.
template <element_type T>
void check_device_cache(std::size_t layers, std::size_t C_key, std::size_t C_value, std::size_t P, std::uint64_t seed,
                        int q_heads = 8, const RopeConfig* rope = nullptr) {
  constexpr std::size_t H = 2, D = 128;
  KVCodebooks codebooks(layers, H, D, std::vector<LayerSpec>{{{C_key, 8}, {C_value, 8}}},
                        rope ? KeyRope::pre : KeyRope::post, rope ? *rope : RopeConfig{});
  for (std::size_t l = 0; l < layers; ++l)
    for (std::size_t h = 0; h < H; ++h)
      codebooks.set(l, h, test::random_codebook(D, C_key, 8, seed + 10 * l + 2 * h),
                    test::random_codebook(D, C_value, 8, seed + 10 * l + 2 * h + 1));
  PagedCacheOptions o;
  o.page_tokens = P;
  o.full_page_rows = 16;
  o.window = 8;
  o.sinks = 4;
  o.max_rollback = 4;
  if (rope) o.pre_rope_keys = true, o.rope = *rope;
  const MemoryPlan plan(codebooks, o, sizeof(T));
  const PagedCacheOptions opt = plan.pool_for(5, 420, 60);
  // The CPU cache in zeroed memory, as the device pool starts (pages never taken compare too).
  std::vector<std::byte> cpu_memory(plan.pool_bytes(opt) + page_alignment);
  PagedCacheOptions cpu_opt = opt;
  void* aligned = cpu_memory.data();
  std::size_t room = cpu_memory.size();
  cpu_opt.pool_memory = {static_cast<std::byte*>(std::align(page_alignment, plan.pool_bytes(opt), aligned, room)),
                         plan.pool_bytes(opt)};
  PagedKVCache<T> cpu(codebooks, cpu_opt);
  gpu_test::DeviceCache<T> gpu(codebooks, opt);
  Pair<T> both{cpu, gpu, codebooks, seed * 1000};
  auto add = [&](std::size_t first_position = 0) {
    const SeqId s = cpu.add_sequence(first_position);
    REQUIRE(gpu.add_sequence(first_position) == s);
    return s;
  };
  double worst = 0.0;
  // Prefill chunks in one batch: a long one, one inside the sinks, one that ends mid-page.
  const SeqId a = add(), b = add(), c = add();
  both.append({a, b, c}, {150, 3, 77});
  both.check_pools(a);
  worst = std::max(worst, both.check_attention({a, b, c}, q_heads, DType::f32, DType::f32));
  // Decode steps, rows given [kv_heads, rows, head_dim] on odd steps.
  for (int step = 0; step < 5; ++step) {
    both.append({a, b, c}, {1, 1, 1}, step % 2 == 1);
    worst = std::max(worst, both.check_attention({c, a, b}, q_heads, DType::f16, DType::f16));
  }
  both.check_pools(a);
  // Speculative verification: draft tokens appended, then each attended causally with its own
  // window (b: a short sequence), then rolled back.
  both.append({a, b, c}, {5, 3, 4});
  worst = std::max(worst, both.check_attention({a, b, c}, q_heads, DType::f32, DType::f32, {5, 3, 4}));
  // The same with logits soft-capped (Gemma 2), speculative and decode.
  both.soft_cap = 0.8f;
  worst = std::max(worst, both.check_attention({a, b, c}, q_heads, DType::f16, DType::f32, {5, 3, 4}));
  worst = std::max(worst, both.check_attention({a, b, c}, q_heads, DType::f32, DType::f32));
  both.soft_cap = 0.0f;
  for (auto [s, n] : {std::pair{a, std::size_t(3)}, std::pair{b, std::size_t(2)}, std::pair{c, std::size_t(4)}}) {
    cpu.truncate(s, cpu.length(s, 0) - n);
    gpu.truncate(s, gpu.length(s, 0) - n);
  }
  // Fork: both sides write into shared code and full-precision pages (copy-on-write).
  const SeqId d = cpu.fork(a);
  REQUIRE(gpu.fork(a) == d);
  both.append({d, a}, {1, 2});
  both.check_pools(a);
  worst = std::max(worst, both.check_attention({a, d}, q_heads, DType::f32, DType::f16));
  // Rollback of the last append, then more tokens; a freed sequence's pages reused by a new one.
  cpu.truncate(a, cpu.length(a, 0) - 2);
  gpu.truncate(a, gpu.length(a, 0) - 2);
  both.append({a, d}, {3, 40});
  cpu.free_sequence(b);
  gpu.free_sequence(b);
  const SeqId e = add(rope ? 1000003 : 10);  // pre-RoPE: token 0 far along (positions past 10^6)
  cpu.reserve(e, 50);
  gpu.reserve(e, 50);
  both.append({e, c}, {50, 33});
  both.check_pools(a);
  worst = std::max(worst, both.check_attention({a, c, d, e}, q_heads, DType::f32, DType::f32));
  // A forked page read by one side's copy-on-write copy and freed and taken again by the other side
  // in the same batch: the device must copy before it zeroes. g takes 60 tokens; h = fork(g) goes
  // 8 tokens further; g rolls back into the full page of rows 36..51 (sinks 4, pages of 16 rows
  // from row 4). Then in one batch g writes row 44 of that page (a copy), and h, whose window now
  // starts past it, drops it (freed: g let go of it) and takes a page for row 68, which the free
  // list hands out first: the same page. (With one layer: with more, the copy happens in the first
  // layer's append and the drop in the last one's, which are separate launches.)
  cpu.free_sequence(c);
  gpu.free_sequence(c);
  cpu.free_sequence(d);
  gpu.free_sequence(d);
  const SeqId g = add();
  both.append({g}, {60});
  const SeqId h = cpu.fork(g);
  REQUIRE(gpu.fork(g) == h);
  both.append({h}, {8});
  cpu.truncate(g, 44);
  gpu.truncate(g, 44);
  both.append({g, h}, {1, 1});
  both.check_pools(a);
  worst = std::max(worst, both.check_attention({g, h, a}, q_heads, DType::f32, DType::f32));
  cpu.free_sequence(g);
  gpu.free_sequence(g);
  cpu.free_sequence(h);
  gpu.free_sequence(h);
  // A full pool: refused on both, nothing changed on either.
  const std::size_t before = gpu.length(e, 0);
  const std::vector<T> rows(1000 * H * D, T(0.5f));
  const std::size_t indptr[2] = {0, 1000};
  CHECK_THROWS_AS(gpu.append(0, std::span<const SeqId>(&e, 1), indptr, rows, rows), Error);
  CHECK_THROWS_AS(cpu.append(0, e, ConstMatrixView<T>(rows.data(), 1000, H * D), ConstMatrixView<T>(rows.data(), 1000, H * D)),
                  Error);
  CHECK(gpu.length(e, 0) == before);
  both.check_pools(a);
  // Attention from an empty sequence, and a layer out of range, are refused.
  const SeqId f = add();
  const std::vector<float> q(std::size_t(q_heads) * D, 0.1f);
  CHECK_THROWS_AS(gpu.attend(0, std::span<const SeqId>(&f, 1), q_heads, q, DType::f32, DType::f32), Error);
  CHECK_THROWS_AS(gpu.attend(layers, std::span<const SeqId>(&a, 1), q_heads, q, DType::f32, DType::f32), Error);
  CHECK_THROWS_AS(gpu.attend(0, std::span<const SeqId>(&g, 1), q_heads, q, DType::f32, DType::f32), Error);  // freed
  CHECK_THROWS_AS(gpu.attend(0, std::span<const SeqId>(&a, 1), 3, q, DType::f32, DType::f32), Error);
  for (float bad : {-1.0f, std::numeric_limits<float>::infinity(), std::nanf("")})
    CQ_CHECK_THROWS_CONTAINING(gpu.attend(0, std::span<const SeqId>(&a, 1), q_heads, q, DType::f32, DType::f32, nullptr,
                                          {}, bad),
                               "must be 0 (none) or finite and positive");
  MESSAGE("device cache ", sizeof(T) * 8, "-bit rows, ", D / C_key, "/", D / C_value, " key/value groups, pages of ", P,
          ", ", q_heads, "/", H, " heads, ", rope ? describe(*rope) + " keys before RoPE" : std::string("keys after RoPE"),
          ": largest relative error ", worst);
}

void require_gpu() { REQUIRE_MESSAGE(!gpu_test::device_name().empty(), "no CUDA device"); }

}  // namespace

TEST_CASE("cuda paged cache: the CPU cache's pools byte for byte and decode attention within 1e-3, through fork, rollback and a full pool") {
  require_gpu();
  check_device_cache<half>(1, 8, 8, 64, 11);
  check_device_cache<bfloat16>(2, 4, 2, 32, 12);
  check_device_cache<float>(2, 2, 8, 256, 13);
  check_device_cache<half>(3, 8, 4, 128, 14);
}

TEST_CASE("cuda paged cache: keys before RoPE, rotated in the kernel, within 1e-3 of the oracle (rotate_half, interleaved partial rotary, YaRN; MHA and GQA)") {
  require_gpu();
  const RopeConfig llama = gpu_test::llama3_rope();
  check_device_cache<half>(1, 8, 8, 64, 21, 8, &llama);
  const RopeConfig gptj = gpu_test::interleaved_yarn_rope();
  check_device_cache<bfloat16>(2, 4, 4, 32, 22, 2, &gptj);  // MHA
  RopeConfig plain;
  check_device_cache<float>(1, 2, 2, 256, 23, 16, &plain);  // GQA 8
  check_device_cache<half>(2, 8, 8, 32, 24, 14, &llama);    // GQA 7
}

TEST_CASE("cuda paged cache: options the GPU cannot serve are refused") {
  require_gpu();
  KVCodebooks post(1, 1, 64, std::vector<LayerSpec>{{{8, 8}, {8, 8}}}, KeyRope::post);
  post.set(0, 0, test::random_codebook(64, 8, 8, 1), test::random_codebook(64, 8, 8, 2));
  PagedCacheOptions o;
  o.code_pages = 4;
  o.full_pages = 4;
  o.page_tokens = 96;  // a multiple of 32, not a power of two
  CQ_CHECK_THROWS_CONTAINING(gpu_test::DeviceCache<half>(post, o), "page_tokens 96");
  o.page_tokens = 64;
  o.full_page_rows = 12;
  CQ_CHECK_THROWS_CONTAINING(gpu_test::DeviceCache<half>(post, o), "full_page_rows 12");
  o.full_page_rows = 16;
  o.pre_rope_keys = true;
  CQ_CHECK_THROWS_CONTAINING(gpu_test::DeviceCache<half>(post, o), "fitted on post-RoPE keys");
  // Keys before RoPE where the rotating kernel does not serve: head_dim 64, key and value groups
  // unlike, rotate_half over part of the channels.
  KVCodebooks pre64(1, 1, 64, std::vector<LayerSpec>{{{8, 8}, {8, 8}}}, KeyRope::pre);
  pre64.set(0, 0, test::random_codebook(64, 8, 8, 1), test::random_codebook(64, 8, 8, 2));
  CQ_CHECK_THROWS_CONTAINING(gpu_test::DeviceCache<half>(pre64, o), "head_dim 64");
  KVCodebooks mixed(1, 1, 128, std::vector<LayerSpec>{{{8, 8}, {4, 8}}}, KeyRope::pre);
  mixed.set(0, 0, test::random_codebook(128, 8, 8, 1), test::random_codebook(128, 4, 8, 2));
  CQ_CHECK_THROWS_CONTAINING(gpu_test::DeviceCache<half>(mixed, o), "values 4c8b");
  RopeConfig partial;
  partial.rotary_dim = 64;
  KVCodebooks half_rotary(1, 1, 128, std::vector<LayerSpec>{{{8, 8}, {8, 8}}}, KeyRope::pre, partial);
  half_rotary.set(0, 0, test::random_codebook(128, 8, 8, 1), test::random_codebook(128, 8, 8, 2));
  o.rope = partial;
  CQ_CHECK_THROWS_CONTAINING(gpu_test::DeviceCache<half>(half_rotary, o), "rotate_half with rotary_dim 64");
  o.rope = {};
  CQ_CHECK_THROWS_CONTAINING(gpu_test::DeviceCache<half>(half_rotary, o), "differs from the one");
  o.pre_rope_keys = false;
  std::vector<std::byte> host(1 << 20);
  o.pool_memory = host;
  CQ_CHECK_THROWS_CONTAINING(gpu_test::DeviceCache<half>(post, o), "pool_memory names host memory");
}

namespace {

/// begin_decode_step + append_step/attend_step, eagerly and replayed in a CUDA graph, against the
/// append/attend calls, with keys after RoPE (codebooks of different widths per layer) or before it
/// (8c8b then 4c8b, LLaMA-3's RoPE, the second sequence starting at position 70000).
void check_decode_steps(bool pre_rope) {
  constexpr std::size_t layers = 2, H = 2, D = 128, steps = 40;
  constexpr int q_heads = 8;
  RopeConfig llama;
  llama.theta = 500000.0;
  const std::vector<LayerSpec> specs = pre_rope ? std::vector<LayerSpec>{{{8, 8}, {8, 8}}, {{4, 8}, {4, 8}}}
                                                : std::vector<LayerSpec>{{{8, 8}, {4, 8}}, {{4, 8}, {8, 8}}};
  KVCodebooks codebooks(layers, H, D, specs, pre_rope ? KeyRope::pre : KeyRope::post, pre_rope ? llama : RopeConfig{});
  for (std::size_t l = 0; l < layers; ++l)
    for (std::size_t h = 0; h < H; ++h)
      codebooks.set(l, h, test::random_codebook(D, specs[l].key.channels, 8, 50 + 4 * l + 2 * h),
                    test::random_codebook(D, specs[l].value.channels, 8, 51 + 4 * l + 2 * h));
  PagedCacheOptions o;
  o.page_tokens = 64;
  o.full_page_rows = 16;
  o.window = 8;
  o.sinks = 4;
  if (pre_rope) o.pre_rope_keys = true, o.rope = llama;
  const PagedCacheOptions opt = MemoryPlan(codebooks, o, sizeof(half)).pool_for(3, 300, 150);
  const std::vector<std::size_t> prefill = {150, 70, 3};
  const std::size_t width = H * D, rows = 223;
  const std::vector<half> pk = test::convert<half>(test::random_normal(rows * width, 61));
  const std::vector<half> pv = test::convert<half>(test::random_normal(rows * width, 62));
  const std::vector<half> keys = test::convert<half>(test::random_normal(steps * 3 * width, 63));
  const std::vector<half> values = test::convert<half>(test::random_normal(steps * 3 * width, 64));
  const std::vector<float> q = test::random_normal(steps * 3 * q_heads * D, 65);
  std::vector<std::vector<float>> out(3);
  std::vector<std::vector<std::uint8_t>> pools(3);
  int captures = 0;
  for (int mode = 0; mode < 3; ++mode) {
    gpu_test::DeviceCache<half> gpu(codebooks, opt);
    std::vector<SeqId> seqs;
    for (int i = 0; i < 3; ++i) seqs.push_back(gpu.add_sequence(pre_rope && i == 1 ? 70000 : 0));
    const std::size_t indptr[4] = {0, 150, 220, 223};
    for (std::size_t l = 0; l < layers; ++l) gpu.append(l, seqs, indptr, pk, pv);
    out[std::size_t(mode)] = gpu.decode_steps(seqs, q_heads, keys, values, q, steps, mode, 512, mode == 2 ? &captures : nullptr);
    pools[std::size_t(mode)] = gpu.pool();
    CHECK_THROWS_AS(gpu.decode_steps(seqs, q_heads, keys, values, q, 1, 1, 150 + steps), Error);  // past max_context
  }
  CHECK(pools[1] == pools[0]);
  CHECK(pools[2] == pools[0]);
  CHECK(out[2] == out[1]);  // the same launches, replayed
  CHECK(captures == 1);     // the step's buffers stayed put
  double worst = 0.0;       // the step's plan (contexts up to 512) against attend's own
  const std::size_t n = q_heads * D;
  for (std::size_t r = 0; r < out[0].size() / n; ++r) {
    const std::vector<double> ref(out[0].begin() + std::ptrdiff_t(r * n), out[0].begin() + std::ptrdiff_t((r + 1) * n));
    worst = std::max(worst, test::relative_error(out[1].data() + r * n, ref));
  }
  CHECK(worst < 1e-5);
  MESSAGE("decode steps, keys ", std::string(pre_rope ? "before" : "after"),
          " RoPE: the step API against append/attend, largest relative difference ", worst);
}

}  // namespace

TEST_CASE("cuda paged cache: decode steps through begin_decode_step, eager and in a CUDA graph, equal the append/attend calls") {
  require_gpu();
  check_decode_steps(false);
  check_decode_steps(true);
}
