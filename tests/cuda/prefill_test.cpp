// Chunked prefill on the device cache (cuda::PagedKVCache::attend_prefill) against the double
// oracle: each chunk row over everything its sequence holds in the CPU cache (codes, sinks, window,
// as the CPU cache's views say) and, causally, over the chunk's own rows in full precision, within
// 1e-3 relative error on top of the rounding of the output to the cache's dtype. Sequences of one batch: a long prefix (many 64-token tiles, a partial last
// one), an empty one, one inside its sinks and window, one ending mid-page; then the chunks are
// appended and a second chunk attends over the grown caches. Both ways of the kernel (coded rows
// decoded once into the workspace, or per tile in shared memory) give the same outputs.
#include "../attention_oracle.hpp"
#include "../conformance/attention_cases.hpp"
#include "cache_glue.hpp"
#include "gpu_glue.hpp"

#include <cq/cache/paged_kv_cache.hpp>

#include <doctest/doctest.h>

#include <cmath>
#include <numeric>
#include <string>

using namespace cq;

namespace {

/// One prefill check's cache and chunks: a sequence per prefix length, then each chunk (an indptr
/// over the sequences) attends and is appended. Keys before RoPE when rope is set (the cache's
/// codes, sinks, window and the chunk's keys, rotated by the kernel to their positions).
struct PrefillSetup {
  std::size_t C = 8, P = 64, kv_heads = 2, window = 8, sinks = 4;
  int q_heads = 8;
  const RopeConfig* rope = nullptr;
  float soft_cap = 0.0f;  // logit soft cap (0: none)
  std::vector<std::size_t> prefix;
  std::vector<std::vector<std::size_t>> chunks;
};

template <element_type T>
double check_prefill(const PrefillSetup& ps, std::uint64_t seed) {
  constexpr std::size_t D = 128;
  const std::size_t C = ps.C, H = ps.kv_heads, group = std::size_t(ps.q_heads) / H, B = ps.prefix.size();
  const int q_heads = ps.q_heads;
  const RopeConfig* rope = ps.rope;
  KVCodebooks codebooks(1, H, D, std::vector<LayerSpec>{{{C, 8}, {C, 8}}}, rope ? KeyRope::pre : KeyRope::post,
                        rope ? *rope : RopeConfig{});
  for (std::size_t h = 0; h < H; ++h)
    codebooks.set(0, h, test::random_codebook(D, C, 8, seed + 2 * h), test::random_codebook(D, C, 8, seed + 2 * h + 1));
  PagedCacheOptions o;
  o.page_tokens = ps.P;
  o.full_page_rows = 16;
  o.window = ps.window;
  o.sinks = ps.sinks;
  if (rope) o.pre_rope_keys = true, o.rope = *rope;
  std::size_t longest = 0, most_rows = 1;  // longest sequence; most rows of one append
  for (std::size_t i = 0; i < B; ++i) {
    std::size_t n = ps.prefix[i];
    for (const auto& c : ps.chunks) n += c[i + 1] - c[i];
    longest = std::max(longest, n);
  }
  for (const auto& c : ps.chunks) most_rows = std::max(most_rows, c.back());
  most_rows = std::max(most_rows, std::accumulate(ps.prefix.begin(), ps.prefix.end(), std::size_t(0)));
  const PagedCacheOptions opt = MemoryPlan(codebooks, o, sizeof(T)).pool_for(B, longest, most_rows);
  PagedKVCache<T> cpu(codebooks, opt);
  gpu_test::DeviceCache<T> gpu(codebooks, opt);
  std::vector<SeqId> seqs;
  for (std::size_t i = 0; i < B; ++i) {
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
    const std::vector<float> out = gpu.prefill(0, seqs, indptr, q_heads, q, k, v, &lse, ps.soft_cap);
    REQUIRE(out.size() == q.size());
    // With no workspace for decoded rows the kernel decodes each tile itself, from the same halves:
    // the same outputs, bit for bit.
    // Keys before RoPE are rotated as they are decoded into the workspace: without it, refused.
    gpu.set_prefill_workspace_limit(0);
    if (rope) {
      CQ_CHECK_THROWS_CONTAINING(gpu.prefill(0, seqs, indptr, q_heads, q, k, v), "keys coded before RoPE");
    } else {
      const std::vector<float> in_kernel = gpu.prefill(0, seqs, indptr, q_heads, q, k, v, &lse_in_kernel, ps.soft_cap);
      CHECK(in_kernel == out);
      CHECK(lse_in_kernel == lse);
    }
    gpu.set_prefill_workspace_limit(std::size_t(512) << 20);
    for (std::size_t i = 0; i < seqs.size(); ++i)
      for (std::size_t h = 0; h < H; ++h) {
        std::vector<std::vector<float>> keys, values;
        const std::size_t n = cpu.length(seqs[i], 0);
        const auto view = cpu.head_view(0, seqs[i], h);
        if (n > 0) test::oracle_rows(view, n - 1, keys, values);
        for (std::size_t r = indptr[i]; r < indptr[i + 1]; ++r) {
          std::vector<float> kr(D), vr(D), qh(group * D);
          for (std::size_t d = 0; d < D; ++d)
            kr[d] = to_float(k[r * width + h * D + d]), vr[d] = to_float(v[r * width + h * D + d]);
          if (view.rope) view.rope->rotate(kr.data(), view.position_offset + n + (r - indptr[i]));  // after the cached
          keys.push_back(kr);
          values.push_back(vr);
          for (std::size_t j = 0; j < group * D; ++j)  // the queries the device saw, in T
            qh[j] = to_float(T(q[(r * q_heads + h * group) * D + j]));
          const auto ref = test::oracle_over(keys, values, qh.data(), group, D, 1.0f / std::sqrt(float(D)), ps.soft_cap);
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
  {
    std::vector<std::size_t> indptr{0};
    for (std::size_t n : ps.prefix) indptr.push_back(indptr.back() + n);
    if (indptr.back() > 0) {
      const std::vector<T> k = test::convert<T>(test::random_normal(indptr.back() * width, ++seed));
      const std::vector<T> v = test::convert<T>(test::random_normal(indptr.back() * width, ++seed));
      append(indptr, k, v);
    }
  }
  for (const auto& chunk : ps.chunks) prefill(chunk);
  return worst;
}

/// Prefixes of 2101 tokens, none, 5 (sinks and window only) and 700; chunks of 300, 130, 1 and 77
/// rows, then more over the grown caches (one sequence without a chunk).
PrefillSetup ragged(std::size_t C, std::size_t P, std::size_t kv_heads, int q_heads, const RopeConfig* rope = nullptr) {
  PrefillSetup ps;
  ps.C = C, ps.P = P, ps.kv_heads = kv_heads, ps.q_heads = q_heads, ps.rope = rope;
  ps.prefix = {2101, 0, 5, 700};
  ps.chunks = {{0, 300, 430, 431, 508}, {0, 65, 65, 129, 130}};
  return ps;
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
    const PrefillSetup ps = ragged(c.C, c.P, c.kv_heads, c.q_heads);
    const double worst = c.bf16 ? check_prefill<bfloat16>(ps, 100 + c.C) : check_prefill<half>(ps, 200 + c.C);
    MESSAGE("prefill ", c.bf16 ? "bf16" : "fp16", ", ", 128 / c.C, " groups, pages of ", c.P, ", ", c.q_heads, "/",
            c.kv_heads, " heads: largest relative error ", worst);
  }
}

TEST_CASE("cuda prefill: keys coded before RoPE, rotated to their positions by the kernel, within 1e-3 of the oracle") {
  require_gpu();
  const RopeConfig llama = gpu_test::llama3_rope();
  const RopeConfig gptj = gpu_test::interleaved_yarn_rope();
  RopeConfig plain;
  struct Case {
    std::size_t C, P, kv_heads;
    int q_heads;
    bool bf16;
    const RopeConfig* rope;
    const char* name;
  };
  for (const Case& c : {Case{8, 64, 2, 8, false, &llama, "llama3"}, Case{4, 32, 2, 14, true, &gptj, "interleaved yarn"},
                        Case{2, 256, 1, 4, false, &plain, "rotate_half"}, Case{8, 32, 2, 2, true, &gptj, "interleaved yarn"}}) {
    const PrefillSetup ps = ragged(c.C, c.P, c.kv_heads, c.q_heads, c.rope);
    const double worst = c.bf16 ? check_prefill<bfloat16>(ps, 300 + c.C) : check_prefill<half>(ps, 400 + c.C);
    MESSAGE("prefill, keys before RoPE (", std::string(c.name), "), ", c.bf16 ? "bf16" : "fp16", ", ", 128 / c.C,
            " groups, pages of ", c.P, ", ", c.q_heads, "/", c.kv_heads, " heads: largest relative error ", worst);
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

TEST_CASE("cuda prefill: the attention conformance cases the prefill kernel serves, within 1e-3 of the oracle") {
  require_gpu();
  // Each case's sequences hold all but their last `queries` tokens; those come as one chunk.
  double worst = 0.0;
  std::size_t runs = 0;
  for (const test::AttentionCase& c : test::attention_cases()) {
    if (c.D != 128 || c.bits != 8 || c.C > 8) continue;  // what PrefillAttention::plan serves
    if (c.rope && c.rope->style == RopeStyle::rotate_half && c.rope->rotary_dim % c.D != 0)
      continue;  // the device cache's RoPE: rotate_half over every channel (make_device_rope)
    PrefillSetup ps;
    ps.C = c.C, ps.P = c.page_tokens, ps.kv_heads = c.kv_heads, ps.window = c.window, ps.sinks = c.sinks;
    ps.q_heads = int(c.kv_heads * c.group);
    ps.rope = c.rope ? &*c.rope : nullptr;
    ps.soft_cap = c.soft_cap;
    std::vector<std::size_t> chunk{0};
    for (std::size_t n : c.lengths) {
      const std::size_t rows = std::min(c.queries, n);
      ps.prefix.push_back(n - rows);
      chunk.push_back(chunk.back() + rows);
    }
    if (chunk.back() == 0) continue;
    ps.chunks = {chunk};
    CAPTURE(c.name());
    worst = std::max(worst, check_prefill<half>(ps, c.seed));
    ++runs;
  }
  MESSAGE("prefill over ", runs, " conformance cases: largest relative error ", worst);
  CHECK(runs >= 30);
}
