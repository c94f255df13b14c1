// Chunked prefill on the device cache (cuda::PagedKVCache::attend_prefill) against the double
// oracle: each chunk row over everything its sequence holds in the CPU cache (codes, sinks, window,
// as the CPU cache's views say) and, causally, over the chunk's own rows in full precision, within
// 1e-3 relative error on top of the rounding of the output to the cache's dtype. Sequences of one batch: a long prefix (many 64-token tiles, a partial last
// one), an empty one, one inside its sinks and window, one ending mid-page; then the chunks are
// appended and a second chunk attends over the grown caches. Both ways of the kernel (coded rows
// decoded once into the workspace, or per tile in shared memory) give the same outputs.
#include "../attention_oracle.hpp"
#include "cache_glue.hpp"
#include "gpu_glue.hpp"

#include <cq/cache/paged_kv_cache.hpp>

#include <doctest/doctest.h>

#include <cmath>
#include <string>

using namespace cq;

namespace {

template <element_type T>
double check_prefill(std::size_t C, std::size_t P, std::size_t kv_heads, int q_heads, std::uint64_t seed) {
  constexpr std::size_t D = 128;
  const std::size_t H = kv_heads, group = std::size_t(q_heads) / H;
  KVCodebooks codebooks(1, H, D, std::vector<LayerSpec>{{{C, 8}, {C, 8}}}, KeyRope::post);
  for (std::size_t h = 0; h < H; ++h)
    codebooks.set(0, h, test::random_codebook(D, C, 8, seed + 2 * h), test::random_codebook(D, C, 8, seed + 2 * h + 1));
  PagedCacheOptions o;
  o.page_tokens = P;
  o.full_page_rows = 16;
  o.window = 8;
  o.sinks = 4;
  const PagedCacheOptions opt = MemoryPlan(codebooks, o, sizeof(T)).pool_for(4, 3000, 3000);
  PagedKVCache<T> cpu(codebooks, opt);
  gpu_test::DeviceCache<T> gpu(codebooks, opt);
  std::vector<SeqId> seqs;
  for (int i = 0; i < 4; ++i) {
    seqs.push_back(cpu.add_sequence());
    REQUIRE(gpu.add_sequence() == seqs.back());
  }
  const std::size_t width = H * D;
  auto append = [&](const std::vector<std::size_t>& indptr, const std::vector<T>& k, const std::vector<T>& v) {
    const std::size_t rows = indptr.back();
    cpu.append(0, seqs, indptr, ConstMatrixView<T>(k.data(), rows, width), ConstMatrixView<T>(v.data(), rows, width));
    gpu.append(0, seqs, indptr, k, v);
  };
  double worst = 0.0;
  auto prefill = [&](const std::vector<std::size_t>& indptr) {
    const std::size_t rows = indptr.back();
    const std::vector<T> k = test::convert<T>(test::random_normal(rows * width, ++seed));
    const std::vector<T> v = test::convert<T>(test::random_normal(rows * width, ++seed));
    const std::vector<float> q = test::random_normal(rows * std::size_t(q_heads) * D, ++seed);
    std::vector<float> lse, lse_in_kernel;
    const std::vector<float> out = gpu.prefill(0, seqs, indptr, q_heads, q, k, v, &lse);
    REQUIRE(out.size() == q.size());
    // With no workspace for decoded rows the kernel decodes each tile itself, from the same halves:
    // the same outputs, bit for bit.
    gpu.set_prefill_workspace_limit(0);
    const std::vector<float> in_kernel = gpu.prefill(0, seqs, indptr, q_heads, q, k, v, &lse_in_kernel);
    gpu.set_prefill_workspace_limit(std::size_t(512) << 20);
    CHECK(in_kernel == out);
    CHECK(lse_in_kernel == lse);
    for (std::size_t i = 0; i < seqs.size(); ++i)
      for (std::size_t h = 0; h < H; ++h) {
        std::vector<std::vector<float>> keys, values;
        const std::size_t n = cpu.length(seqs[i], 0);
        if (n > 0) test::oracle_rows(cpu.head_view(0, seqs[i], h), n - 1, keys, values);
        for (std::size_t r = indptr[i]; r < indptr[i + 1]; ++r) {
          std::vector<float> kr(D), vr(D), qh(group * D);
          for (std::size_t d = 0; d < D; ++d)
            kr[d] = to_float(k[r * width + h * D + d]), vr[d] = to_float(v[r * width + h * D + d]);
          keys.push_back(kr);
          values.push_back(vr);
          for (std::size_t j = 0; j < group * D; ++j)  // the queries the device saw, in T
            qh[j] = to_float(T(q[(r * q_heads + h * group) * D + j]));
          const auto ref = test::oracle_over(keys, values, qh.data(), group, D, 1.0f / std::sqrt(float(D)));
          // The output is in T: its own rounding (bf16: ~1e-3 relative) comes on top of the 1e-3.
          std::vector<float> rounded(ref.size());
          for (std::size_t j = 0; j < ref.size(); ++j) rounded[j] = to_float(T(float(ref[j])));
          const double e = test::relative_error(out.data() + (r * q_heads + h * group) * D, ref);
          const double rounding = test::relative_error(rounded.data(), ref);
          CAPTURE(i);
          CAPTURE(r);
          CAPTURE(h);
          CAPTURE(rounding);
          CHECK(e < 1e-3 + rounding);
          worst = std::max(worst, e - rounding);
        }
      }
    for (float x : lse) CHECK(std::isfinite(x));
    append(indptr, k, v);
  };
  // Prefixes: 2101 tokens, none, 5 (sinks and window only), 700.
  {
    const std::vector<std::size_t> indptr{0, 2101, 2101, 2106, 2806};
    append(indptr, test::convert<T>(test::random_normal(2806 * width, ++seed)),
           test::convert<T>(test::random_normal(2806 * width, ++seed)));
  }
  prefill({0, 300, 430, 431, 508});  // chunks of 300, 130, 1 and 77 rows
  prefill({0, 65, 65, 129, 130});    // then more over the grown caches (one sequence has no chunk)
  return worst;
}

void require_gpu() { REQUIRE_MESSAGE(!gpu_test::device_name().empty(), "no CUDA device"); }

}  // namespace

TEST_CASE("cuda prefill: chunks over the device cache's codes, sinks and window and their own rows, within 1e-3 of the oracle") {
  require_gpu();
  struct Case {
    std::size_t C, P, kv_heads;
    int q_heads;
    bool bf16;
  };
  for (const Case& c : {Case{8, 64, 2, 8, false}, Case{4, 32, 2, 14, true}, Case{2, 256, 2, 2, false},
                        Case{8, 128, 1, 16, true}, Case{4, 64, 4, 4, false}}) {
    const double worst = c.bf16 ? check_prefill<bfloat16>(c.C, c.P, c.kv_heads, c.q_heads, 100 + c.C)
                                : check_prefill<half>(c.C, c.P, c.kv_heads, c.q_heads, 200 + c.C);
    MESSAGE("prefill ", c.bf16 ? "bf16" : "fp16", ", ", 128 / c.C, " groups, pages of ", c.P, ", ", c.q_heads, "/",
            c.kv_heads, " heads: largest relative error ", worst);
  }
}

TEST_CASE("cuda prefill: what the kernel does not serve is refused, nothing launched") {
  require_gpu();
  KVCodebooks cb(1, 1, 128, std::vector<LayerSpec>{{{8, 8}, {8, 8}}}, KeyRope::post);
  cb.set(0, 0, test::random_codebook(128, 8, 8, 1), test::random_codebook(128, 8, 8, 2));
  PagedCacheOptions o;
  const PagedCacheOptions opt = MemoryPlan(cb, o, 4).pool_for(1, 256, 64);
  gpu_test::DeviceCache<float> f32(cb, opt);
  const SeqId s = f32.add_sequence();
  const std::size_t indptr[2] = {0, 2};
  const std::vector<float> q(2 * 128, 0.5f), kv(2 * 128, 0.25f);
  CQ_CHECK_THROWS_CONTAINING(f32.prefill(0, std::span<const SeqId>(&s, 1), indptr, 1, q, kv, kv),
                             "prefill serves F16 and BF16 caches");
  gpu_test::DeviceCache<half> f16(cb, MemoryPlan(cb, o, 2).pool_for(1, 256, 64));
  const SeqId t = f16.add_sequence();
  const std::vector<half> hk = test::convert<half>(kv);
  CQ_CHECK_THROWS_CONTAINING(f16.prefill(0, std::span<const SeqId>(&t, 1), indptr, 0, q, hk, hk), "q_heads 0");
  const std::size_t empty[2] = {0, 0};
  CQ_CHECK_THROWS_CONTAINING(f16.prefill(0, std::span<const SeqId>(&t, 1), empty, 1, q, hk, hk), "0 chunk rows");
  CQ_CHECK_THROWS_CONTAINING(f16.prefill(1, std::span<const SeqId>(&t, 1), indptr, 1, q, hk, hk), "layer");
  KVCodebooks wide(1, 1, 128, std::vector<LayerSpec>{{{8, 8}, {4, 8}}}, KeyRope::post);
  wide.set(0, 0, test::random_codebook(128, 8, 8, 1), test::random_codebook(128, 4, 8, 2));
  gpu_test::DeviceCache<half> mixed(wide, MemoryPlan(wide, o, 2).pool_for(1, 256, 64));
  const SeqId m = mixed.add_sequence();
  CQ_CHECK_THROWS_CONTAINING(mixed.prefill(0, std::span<const SeqId>(&m, 1), indptr, 1, q, hk, hk),
                             "the same for keys and values");
}
